"""The real default job, rehearsed offline: a Hugging Face cache laid out as a first online `make run` leaves it (the HAR
dataset's Hub snapshot and `datasets` cache, open_clip's ViT-B-16/openai weights file with random values), then the
network that loads from it compared with open_clip's own reference build, our preprocessing with open_clip's reference
transform, the errors of a half-filled cache, and `make run` itself, unmodified, on a copy of the checkout."""
import json, re, shutil, time, warnings
from pathlib import Path

import pytest

from conftest import BIN, ROOT, clip_har, copy_checkout, run

PER_CLASS = 3  # photos per class (each also mirrored): 90 images, the default split 60 / 15 / 15, one batch of 32 fits
STAGES = ['prepare', 'zeroshot', 'train', 'evaluate', 'export', 'benchmark']

@pytest.fixture(scope='module')
def hf_home(tmp_path_factory) -> Path:
    "HF_HOME as a first online run leaves it: dataset snapshot + datasets cache + ViT-B-16/openai weights (random values)."
    from clip_har.pipeline import rehearsal_dataset, rehearsal_weights
    home = tmp_path_factory.mktemp('rehearsal')/'hf'
    rehearsal_dataset(home, per_class=PER_CLASS)
    rehearsal_weights(home, 'ViT-B-16', 'openai')
    return home

@pytest.fixture(scope='module')
def photos():
    "Every fixture photo (every har-mini photo when it is here)."
    from clip_har.core import fixtures_dir, har_mini_dir
    return sorted((har_mini_dir() or fixtures_dir()).rglob('*.jpg'))

@pytest.fixture(scope='module')
def reference(hf_home: Path):
    "open_clip's own build of OpenAI's ViT-B-16 (the -quickgelu config) and its evaluation transform, from the same file (built once for the module)."
    import open_clip
    model, _, transform = open_clip.create_model_and_transforms('ViT-B-16-quickgelu', pretrained='openai', cache_dir=str(hf_home/'hub'))
    return model.eval(), transform, open_clip.get_tokenizer('ViT-B-16-quickgelu')

@pytest.fixture(scope='module')
def clip_b16(hf_home: Path):
    "Our ViT-B-16/openai from the rehearsal cache, as the default job loads it, with every warning an error: open_clip's \"QuickGELU mismatch\" (or any other) fails the tests that use it."
    from clip_har.model import load_clip
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        return load_clip('ViT-B-16', 'openai', cache_dir=hf_home/'hub')

def embeddings(model, images, tokens):
    import torch
    with torch.no_grad(): return model.encode_image(images), model.encode_text(tokens)

def test_vit_b16_openai_is_the_network_its_weights_were_trained_as(reference, clip_b16, photos, tmp_path):
    "Tag, checkpoint file and local-dir: folder all build OpenAI's network (QuickGELU), equal to open_clip's reference within 1e-5."
    import open_clip, torch
    from clip_har.data import image_batch
    from clip_har.model import encode_text, load_clip, save_clip_folder, uses_quick_gelu
    ref, transform, tok = reference
    two = photos[:2]  # every build runs the same arithmetic on any photo; the next test compares the preprocessing of all of them
    images = torch.stack([transform(__import__('PIL.Image', fromlist=['Image']).open(p).convert('RGB')) for p in two])
    tokens = tok(['a photo of a person running.', 'a photo of someone texting on a phone.'])
    want = embeddings(ref, images, tokens)
    clip = clip_b16  # loaded with every warning an error
    assert uses_quick_gelu(clip.model) and clip.quick_gelu
    ckpt = tmp_path/'vit_b16_openai.pt'
    torch.save(clip.model.state_dict(), ckpt)
    folder = save_clip_folder(clip, tmp_path/'folder')
    builds = {'tag': clip.model, 'checkpoint + quick_gelu=True': load_clip('ViT-B-16', str(ckpt), quick_gelu=True).model,
              'checkpoint, -quickgelu name': load_clip('ViT-B-16-quickgelu', str(ckpt)).model,
              'checkpoint beside its open_clip_config.json': load_clip('ViT-B-16', str(folder/'open_clip_model.safetensors')).model,
              'local-dir:': load_clip(f'local-dir:{folder}', None).model}
    for name, model in builds.items():
        got = embeddings(model, images, tokens)
        diffs = [float((g - w).abs().max()) for g, w in zip(got, want)]
        print(f'{name}: max |image emb diff| {diffs[0]:.2e}, max |text emb diff| {diffs[1]:.2e}')
        assert max(diffs) <= 1e-5, (name, diffs)
    with torch.no_grad(): trimmed = float((encode_text(clip.model, tokens) - want[1]).abs().max())
    print(f"text tower run only to the longest prompt's end: max |text emb diff| {trimmed:.2e}")
    assert trimmed <= 1e-5
    gelu = open_clip.create_model('ViT-B-16', pretrained=str(ckpt))  # the plain config: GELU, the network the weights were not trained as
    off = float((embeddings(gelu, images, tokens)[0] - want[0]).abs().max())
    print(f'the same weights built with GELU: max |image emb diff| {off:.3f}')
    assert off > 1e-3
    ours = image_batch(two, clip.preprocess)
    assert float((ours - images).abs().max()) == 0.0

def test_preprocessing_is_open_clips_reference_transform(reference, clip_b16, photos):
    "Evaluation, prediction, export parity and serving all go through `image_batch`/`eval_dataloader`: per image within 0.01 of the reference."
    import torch, pandas as pd
    from PIL import Image
    from clip_har.core import HAR_LABELS
    from clip_har.data import eval_dataloader, image_batch
    from clip_har.serve import preprocess_images
    _, transform, _ = reference
    pp = clip_b16.preprocess
    per_image, worst = [], 0.0
    for i in range(0, len(photos), 64):
        chunk = photos[i:i + 64]
        ref = torch.stack([transform(Image.open(p).convert('RGB')) for p in chunk])
        ours = image_batch(chunk, pp)
        served = torch.from_numpy(preprocess_images([p.read_bytes() for p in chunk], pp, 10**8, [p.name for p in chunk]))
        loaded = torch.cat([x for x, _ in eval_dataloader(pd.DataFrame({'path': [str(p) for p in chunk], 'label': HAR_LABELS[0]}), HAR_LABELS, pp, 32)])
        for got in (ours, served, loaded.as_subclass(torch.Tensor)):
            d = (got - ref).abs().flatten(1).mean(1)
            worst = max(worst, float(d.max()))
        per_image.append((ours - ref).abs().flatten(1).mean(1))
    per_image = torch.cat(per_image)
    print(f'{len(photos)} photos: per-image mean |diff| vs open_clip mean {per_image.mean():.2e}, worst {worst:.2e} (image_batch, serving, eval_dataloader)')
    assert worst <= 0.01

@pytest.fixture
def checkout(tmp_path) -> Path:
    "A copy of the checkout of the test's own: `make run` fills one, and the half-filled cache test wants one untouched."
    return copy_checkout(tmp_path/'repo')

def test_a_half_filled_cache_names_what_is_missing(hf_home, checkout, tmp_path):
    "Dataset without weights, and weights without dataset: `make run`'s first step says which is missing, in seconds."
    only_data, only_weights = tmp_path/'cache-1', tmp_path/'cache-2'
    shutil.copytree(hf_home, only_data, symlinks=True); shutil.rmtree(only_data/'hub'/'models--timm--vit_base_patch16_clip_224.openai')
    (only_weights/'hub').mkdir(parents=True)
    shutil.copytree(hf_home/'hub'/'models--timm--vit_base_patch16_clip_224.openai', only_weights/'hub'/'models--timm--vit_base_patch16_clip_224.openai', symlinks=True)
    for home, missing, present in ((only_data, 'the ViT-B-16/openai weights', 'the dataset'), (only_weights, 'the dataset hf:Bingsu/Human_Action_Recognition', 'weights')):
        r = clip_har('pipeline', cwd=checkout, HF_HOME=str(home), timeout=120)
        print(r.stderr.strip())
        assert r.returncode == 2 and missing in r.stderr and present not in r.stderr, r.stderr
        assert 'Traceback' not in r.stderr
    assert not (checkout/'outputs').exists() and not (checkout/'data').exists()  # refused before any work

def test_make_run_unmodified_on_the_rehearsal_cache(hf_home, checkout):
    "`make run` as a user types it: all six stages with ViT-B-16/openai, progress lines, no traceback, no open_clip warning."
    for f in ('dvc.lock',): (checkout/f).unlink(missing_ok=True)
    venv, stamp = BIN.parent, checkout.parent/'installed'
    stamp.touch()  # this environment is installed already: the copy must never re-point its editable install at itself
    t0 = time.time()
    r = run('make', 'run', f'VENV={venv}', f'STAMP={stamp}', cwd=checkout, timeout=2700, HF_HOME=str(hf_home))
    log = r.stdout + r.stderr
    print(f'make run on the rehearsal cache: {time.time() - t0:.0f} s')
    (checkout.parent/'make-run.log').write_text(log)  # kept: the checkout is removed at the end
    try:
        assert r.returncode == 0, log[-6000:]
        assert re.findall(r"Running stage '(\w+)'", log) == STAGES, log[-3000:]
        assert 'Traceback' not in log and 'QuickGELU mismatch' not in log and not re.search(r'open_clip\S*: \w*Warning', log), log[-3000:]
        assert re.search(r'^\[train\] train head: epoch 1/1 · \d+/\d+ batches · [\d.]+ images/s · ETA', log, re.M), log[-3000:]  # the terminal saw training move
        out = checkout/'outputs'
        zs = json.loads((out/'zeroshot'/'metrics.json').read_text())
        assert (zs['model'], zs['pretrained'], zs['smoke_run']) == ('ViT-B-16', 'openai', False)
        meta = __import__('torch').load(out/'train'/'model.pt', map_location='cpu', weights_only=True)['meta']
        assert meta['quick_gelu'] is True and meta['preprocess']['resize_mode'] == 'shortest'
        summary = json.loads((out/'export'/'summary.json').read_text())
        written = {e['export'] for e in summary['exported']}
        assert 'onnx-fp32' in written and all((out/'export'/e/'manifest.json').is_file() for e in written)
        for e in summary['refused']: assert not (out/'export'/f"{e['backend']}-{e['precision']}").exists()  # refused: not written
        man = json.loads((out/'export'/'onnx-fp32'/'manifest.json').read_text())
        assert man['quick_gelu'] is True and man['preprocess']['interpolation'] == 'bicubic'
        bench = (out/'benchmark'/'benchmark.md').read_text()
        assert 'onnx-fp32' in bench and all(f"{e['backend']}-{e['precision']}" in bench for e in summary['refused'])
        print((out/'export'/'summary.md').read_text())
        size = lambda d: sum(f.stat().st_size for f in d.rglob('*') if f.is_file()) / 2**30
        print(f"outputs/train {size(out/'train'):.2f} GB (not in DVC's cache: {size(checkout/'.dvc'/'cache'):.2f} GB there), outputs/export {size(out/'export'):.2f} GB")
        assert size(checkout/'.dvc'/'cache') < size(out/'train')  # the training run is recorded by hash, not copied
    finally: shutil.rmtree(checkout, ignore_errors=True)  # several GB (checkpoints, models, exports, DVC's cache) on a disk the next runs share
