"""Export, the Predictor and batch prediction through the real `clip-har` command: parity per backend, tampering,
video input, bad models and inputs, and data-parallel prediction under torchrun."""
import json, shutil, socket
from pathlib import Path
import numpy as np
import pandas as pd
import pytest
from PIL import Image
from conftest import clip_har, clip_har_here, run, run_paths, BIN

from clip_har.core import TINY_MODEL, HAR_LABELS, fixtures_dir

SMOKE = ['--set', f'model.name={TINY_MODEL}', '--set', 'model.pretrained=null', '--set', 'device=cpu', '--set', 'track.backends=[]',
         '--set', 'train.patience=null', '--set', 'data.batch_size=8', '--set', 'train.stages=[{name: all, train: all, epochs: 1, lr: 1.0e-2}]']
# a random tiny model's logits sit close together: fp16 and int8 flip more top-1 labels than a trained ViT's would
TINY_LIMITS = ['--set', 'export.thresholds.fp16.agreement=0.9', '--set', 'export.thresholds.int8.agreement=0.5']

_paths = run_paths

@pytest.fixture(scope='module')
def exported(tmp_path_factory):
    "The fixtures prepared, a tiny model trained for one epoch, and exported to ONNX (fp32, fp16, int8) and TorchScript."
    tmp = tmp_path_factory.mktemp('export')
    for cmd in (['prepare', '--set', f'data.source={fixtures_dir()}', '--set', 'data.valid_pct=0.34', '--set', 'data.test_pct=0.2'],
                ['train'], ['export', '--set', 'export.formats=[onnx, torchscript]', '--set', 'export.precisions=[fp32, fp16, int8]', *TINY_LIMITS]):
        r = clip_har(*cmd, *_paths(tmp), *SMOKE, '-q')
        assert r.returncode == 0, (cmd, r.stderr[-3000:])
    return tmp

def test_every_backend_agrees_with_pytorch(exported):
    from clip_har.inference import Predictor
    from clip_har.data import image_batch
    exp = exported/'out'/'export'
    assert sorted(p.name for p in exp.iterdir()) == ['onnx-fp16', 'onnx-fp32', 'onnx-int8', 'summary.json', 'summary.md', 'torchscript-fp32']
    photos = sorted(fixtures_dir().rglob('*.jpg'))
    ref = Predictor(exported/'out'/'train'/'wise_ft.pt', precision='fp32')  # parity is measured against fp32 PyTorch
    p_ref = ref.scores(image_batch(photos, ref.preprocess).numpy())
    for folder in sorted(p for p in exp.iterdir() if p.is_dir()):
        pr = Predictor(folder)
        p = pr.scores(image_batch(photos, pr.preprocess).numpy())
        man = json.loads((folder/'manifest.json').read_text())
        agree = float((p.argmax(1) == p_ref.argmax(1)).mean())
        print(f"{folder.name}: export-time parity {man['parity']}, agreement on all {len(photos)} fixtures {agree:.3f}")
        assert agree >= man['thresholds']['agreement'] and man['labels'] == list(HAR_LABELS)
        assert set(man['files']) == {f.name for f in folder.iterdir()} - {'manifest.json'}

def test_predict_a_folder_with_a_corrupt_image_and_a_gif(exported, tmp_path):
    "A bad file is listed, not fatal; a GIF gives one pooled row; a re-run has nothing left to do."
    src = tmp_path/'in'; src.mkdir()
    photos = sorted(fixtures_dir().rglob('*.jpg'))[:6]
    for p in photos: shutil.copy(p, src/p.name)
    (src/'truncated.jpg').write_bytes(photos[0].read_bytes()[:300])
    (src/'empty.png').write_bytes(b'')
    frames = [Image.open(p).convert('RGB').resize((80, 80)) for p in photos[:4]]
    frames[0].save(src/'clip.gif', save_all=True, append_images=frames[1:], duration=100)
    args = ['predict', src, '--model', exported/'out'/'export'/'onnx-fp32', '--out', tmp_path/'preds.parquet', '--top-k', '3']
    r = clip_har(*args, '-q')
    assert r.returncode == 0, r.stderr[-2000:]
    s = json.loads(r.stdout.strip().splitlines()[-1])
    assert s['predicted'] == 7 and s['failed'] == 2 and {Path(p).name for p in s['failed_inputs']} == {'truncated.jpg', 'empty.png'}
    df = pd.read_parquet(tmp_path/'preds.parquet')
    assert len(df) == 9 and df[df.error.isna()].label.isin(HAR_LABELS).all() and all(len(t) == 3 for t in df[df.error.isna()].top_labels)
    again = clip_har(*args)
    assert again.returncode == 0 and '9 inputs already predicted, 0 to go' in again.stderr, again.stderr[-2000:]

def test_open_vocabulary_prediction(exported, tmp_path):
    r = clip_har('predict', fixtures_dir()/'valid'/'eating', '--model', exported/'out'/'export'/'onnx-fp32', '--labels', 'juggling, eating a meal, sleeping',
                 '--out', tmp_path/'ov.parquet', '-q')
    assert r.returncode == 0, r.stderr[-2000:]
    assert set(pd.read_parquet(tmp_path/'ov.parquet').label) <= {'juggling', 'eating a meal', 'sleeping'}

@pytest.mark.parametrize('model, extra, message', [
    ('missing', [], 'no such model file or export folder'),
    ('onnx-fp32', ['--backend', 'coreml'], "unknown backend 'coreml'"),
    ('onnx-fp32', ['--backend', 'tensorrt'], 'TensorRT is not installed here'),
    ('tampered', [], 'image.fp32.onnx does not match its sha256 in manifest.json'),
    ('corrupt', [], 'image.fp32.onnx does not match its sha256'),
    ('no-manifest', [], 'no manifest.json here'),
])
def test_bad_models_are_clear_errors(exported, tmp_path, model, extra, message):
    exp = exported/'out'/'export'
    if model in ('tampered', 'corrupt', 'no-manifest'):
        shutil.copytree(exp/'onnx-fp32', tmp_path/model)
        f = tmp_path/model/'image.fp32.onnx'
        if model == 'tampered':
            with open(f, 'r+b') as h: h.seek(-4, 2); h.write(b'\x00\x01\x02\x03')
        if model == 'corrupt': f.write_bytes(b'garbage')
        if model == 'no-manifest': (tmp_path/model/'manifest.json').unlink()
        path = tmp_path/model
    else: path = exp/model
    r = clip_har_here('predict', fixtures_dir()/'valid'/'eating', '--model', path, *extra, '--out', tmp_path/'p.parquet', '-q')
    assert r.returncode == 2 and message in r.stderr and 'Traceback' not in r.stderr, r.stderr[-2000:]

def test_a_failing_parity_check_fails_the_export(exported, tmp_path):
    r = clip_har_here('export', *_paths(exported), *SMOKE, '--set', 'export.precisions=[fp32]', '--set', 'export.thresholds.fp32.max_abs=1.0e-12',
                 '--out', tmp_path/'strict', '-q')
    assert r.returncode == 2 and 'onnx fp32: max |logit difference|' in r.stderr, r.stderr[-2000:]
    assert not any((tmp_path/'strict').glob('*/manifest.json'))

def test_predict_data_parallel_under_torchrun(exported, tmp_path):
    with socket.socket() as s: s.bind(('127.0.0.1', 0)); port = s.getsockname()[1]
    r = run(BIN/'torchrun', '--nproc_per_node', '2', '--master_port', str(port), BIN/'clip-har', 'predict', fixtures_dir(),
            '--model', exported/'out'/'export'/'onnx-fp32', '--out', tmp_path/'dp.parquet', '-q', timeout=600, OMP_NUM_THREADS='1')
    assert r.returncode == 0, r.stderr[-3000:]
    df = pd.read_parquet(tmp_path/'dp.parquet')
    assert len(df) == 45 and df.path.is_unique and df.error.isna().all()
    assert not list(tmp_path.glob('dp.rank*'))

def test_evaluate_scores_an_export_through_its_backend(exported, tmp_path):
    "`clip-har evaluate --model <export>` measures the int8 model on the same split as the PyTorch one."
    scores = {}
    for model, command in (('train/wise_ft.pt', clip_har_here), ('export/onnx-int8/manifest.json', clip_har)):  # the PyTorch one in this process
        r = command('evaluate', *_paths(exported), *SMOKE, '--model', exported/'out'/model, '--out', tmp_path/model.replace('/', '_'), '-q')
        assert r.returncode == 0, r.stderr[-2000:]
        scores[model] = json.loads(r.stdout.strip().splitlines()[-1])
    print({k: round(v['top1'], 3) for k, v in scores.items()})
    assert scores['export/onnx-int8/manifest.json']['model'] == f'{TINY_MODEL} (onnx int8)'
    assert scores['export/onnx-int8/manifest.json']['n'] == scores['train/wise_ft.pt']['n'] > 0
