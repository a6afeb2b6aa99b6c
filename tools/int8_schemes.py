"""int8 schemes side by side for an fp32 ONNX export's image graph: top-1 agreement and max |logit diff| against fp32 on
har-mini photos, latency at batch 1 and 8, size and time to quantise. How ONNX int8 became dynamic MatMul/Gemm quantization
(nbs/06_export.ipynb). Usage: .venv/bin/python tools/int8_schemes.py EXPORT_FOLDER WORK_FOLDER N_PHOTOS
e.g. .venv/bin/python tools/int8_schemes.py outputs/export/onnx-fp32 /tmp/int8 200   (needs ../shared/data/har-mini)"""
import sys, time, json, warnings
from pathlib import Path
import numpy as np
warnings.simplefilter('ignore')
from onnxruntime.quantization import quantize_static, quantize_dynamic, CalibrationDataReader, QuantFormat, QuantType, CalibrationMethod
from onnxruntime.quantization.shape_inference import quant_pre_process
from clip_har.export import onnx_session, read_export
from clip_har.data import image_batch
from clip_har.core import har_mini_dir
exp = Path(sys.argv[1]); out = Path(sys.argv[2]); out.mkdir(exist_ok=True)
man = read_export(exp); src = exp/man['graphs']['image']
photos = sorted(har_mini_dir().rglob('*.jpg'))
rng = np.random.default_rng(0); idx = rng.permutation(len(photos))
cal = image_batch([photos[i] for i in idx[:64]], man['preprocess']).numpy()
val = image_batch([photos[i] for i in idx[64:64 + int(sys.argv[3]) ]], man['preprocess']).numpy()
def run(path, x): s = onnx_session(path); return np.concatenate([s.run(None, {'image': x[i:i+16]})[0] for i in range(0, len(x), 16)]), s
ref, _ = run(src, val)
class R(CalibrationDataReader):
    def __init__(self): self.it = iter([{'image': cal[i:i+8]} for i in range(0, len(cal), 8)])
    def get_next(self): return next(self.it, None)
pre = out/'pre.onnx'; quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
schemes = {
 'static QDQ, all ops (today)': lambda d: quantize_static(str(pre), d, R(), quant_format=QuantFormat.QDQ, per_channel=True, weight_type=QuantType.QInt8, activation_type=QuantType.QUInt8),
 'static QDQ, MatMul/Gemm only': lambda d: quantize_static(str(pre), d, R(), quant_format=QuantFormat.QDQ, per_channel=True, weight_type=QuantType.QInt8, activation_type=QuantType.QUInt8, op_types_to_quantize=['MatMul', 'Gemm']),
 'static QDQ, MatMul/Gemm, percentile': lambda d: quantize_static(str(pre), d, R(), quant_format=QuantFormat.QDQ, per_channel=True, weight_type=QuantType.QInt8, activation_type=QuantType.QUInt8, op_types_to_quantize=['MatMul', 'Gemm'], calibrate_method=CalibrationMethod.Percentile),
 'dynamic, MatMul/Gemm, per-channel': lambda d: quantize_dynamic(str(pre), d, weight_type=QuantType.QInt8, per_channel=True, op_types_to_quantize=['MatMul', 'Gemm']),
}
x1, x8 = val[:1], val[:8]
def lat(s, x, n): 
    s.run(None, {'image': x}); t = []
    for _ in range(n): t0 = time.perf_counter(); s.run(None, {'image': x}); t.append(time.perf_counter() - t0)
    return 1000 * float(np.median(t))
_, s32 = run(src, val[:2])
rows = [dict(scheme='fp32', agreement=1.0, max_abs=0.0, ms_b1=lat(s32, x1, 10), ms_b8=lat(s32, x8, 3), mb=src.stat().st_size / 2**20)]
for name, f in schemes.items():
    d = out/(name.split(',')[0].replace(' ', '_') + str(len(rows)) + '.onnx')
    t0 = time.time(); f(str(d)); tq = time.time() - t0
    got, s = run(d, val)
    rows.append(dict(scheme=name, agreement=float((got.argmax(1) == ref.argmax(1)).mean()), max_abs=float(np.abs(got - ref).max()),
                     ms_b1=lat(s, x1, 10), ms_b8=lat(s, x8, 3), mb=d.stat().st_size / 2**20, quantize_s=tq))
    print(rows[-1], flush=True)
import pandas as pd
print(f"\n{man['model']} ({exp}), {len(val)} har-mini photos; logit spread (std of top-1 minus top-2): {np.std(np.sort(ref,1)[:,-1]-np.sort(ref,1)[:,-2]):.3f}")
print(pd.DataFrame(rows).round(4).to_markdown(index=False))
