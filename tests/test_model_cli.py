"""The model layer through the real `clip-har zeroshot` command, with weights the tests write (no hub here)."""
import json
from pathlib import Path
import pandas as pd
import pytest
import torch
from conftest import clip_har, clip_har_here

from clip_har.core import TINY_MODEL, TINY_MODEL_CFG, fixtures_dir, har_mini_dir
from clip_har.model import load_clip

@pytest.fixture(scope='module')
def tiny_checkpoint(tmp_path_factory) -> Path:
    "A checkpoint file of the tiny test CLIP (random weights, as no trained ones exist here)."
    path = tmp_path_factory.mktemp('ckpt')/'tiny.pt'
    torch.manual_seed(0)
    torch.save(load_clip(TINY_MODEL, None).model.state_dict(), path)
    return path

def _tiny(ckpt, tmp):
    return ['--set', f'model.name={TINY_MODEL}', '--set', f'model.pretrained={ckpt}', '--set', f'paths.cache_dir={tmp}/cache',
            '--set', f'paths.data_dir={tmp}/data', '--set', f'paths.out_dir={tmp}/out', '--set', 'device=cpu']

def test_zeroshot_offline_from_a_local_checkpoint(tiny_checkpoint, tmp_path):
    "prepare, then zeroshot with the tiny model from a checkpoint file: metrics, per-class table and confusion matrix."
    source = har_mini_dir() or fixtures_dir()
    r = clip_har('prepare', *_tiny(tiny_checkpoint, tmp_path), '--set', f'data.source={source}', '-q')
    assert r.returncode == 0, r.stderr
    r = clip_har('zeroshot', *_tiny(tiny_checkpoint, tmp_path), '-q')
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    out = tmp_path/'out'/'zeroshot'
    m = json.loads((out/'metrics.json').read_text())
    n_test = (pd.read_csv(tmp_path/'data'/'prepared'/'manifest.csv').split == 'test').sum()
    assert summary['n'] == m['n'] == n_test and m['pretrained'] == str(tiny_checkpoint) and m['smoke_run'] is True
    assert 0 <= m['top1'] <= m['top5'] <= 1
    assert sum(map(sum, m['confusion_matrix'])) == n_test
    per_class = pd.read_csv(out/'per_class.csv')
    assert list(per_class.label) == m['labels'] and per_class.support.sum() == n_test
    assert (out/'confusion_matrix.png').stat().st_size > 10_000
    again = clip_har('zeroshot', *_tiny(tiny_checkpoint, tmp_path), '-q')  # the text embeddings now come from the cache
    assert json.loads(again.stdout)['top1'] == summary['top1']
    assert len(list((tmp_path/'cache'/'text_embeddings').iterdir())) == 1

def _foreign_checkpoint(path: Path) -> Path:
    "A CLIP checkpoint of another architecture (other widths) than the tiny model."
    import open_clip
    cfg = {**TINY_MODEL_CFG, 'embed_dim': 32, 'vision_cfg': {**TINY_MODEL_CFG['vision_cfg'], 'width': 32}}
    torch.save(open_clip.model.CLIP(**cfg).state_dict(), path)
    return path

@pytest.mark.parametrize('overrides, message', [
    (['model.name=ViT-B-61', 'model.pretrained=null'], 'unknown open_clip model'),
    (['model.name=vit-b-32', 'model.pretrained=null'], 'close matches: ViT-B-32'),
    (['model.name=ViT-B-32', 'model.pretrained=laion9b'], "ViT-B-32 has no pretrained tag 'laion9b'; its tags: openai"),
    (['model.name=ViT-B-32', 'model.pretrained=openai'], 'No CLIP weights can be downloaded from here'),
    (['model.name=hf-hub:clip-har/missing'], 'No CLIP weights can be downloaded from here'),
    ([f'model.name={TINY_MODEL}', 'model.pretrained=/no/such/weights.pt'], 'no such checkpoint file'),
    (['data.labels=[]'], 'the label list is empty'),
    (['data.labels=[eating, running, eating]'], "duplicated labels: ['eating']"),
])
def test_zeroshot_bad_input(tmp_path, overrides, message):
    args = [a for o in overrides for a in ('--set', o)]
    r = clip_har_here('zeroshot', '--manifest', tmp_path/'m.csv', *args, '-q', cwd=tmp_path)
    assert r.returncode == 2 and message in r.stderr, r.stderr
    assert 'Traceback' not in r.stderr

def test_zeroshot_foreign_checkpoint_names_the_keys(tmp_path):
    ckpt = _foreign_checkpoint(tmp_path/'other.pt')
    r = clip_har('zeroshot', '--set', f'model.name={TINY_MODEL}', '--set', f'model.pretrained={ckpt}', '-q', cwd=tmp_path)
    assert r.returncode == 2 and 'does not fit this architecture' in r.stderr and 'of another shape' in r.stderr, r.stderr
    assert 'text_projection (32, 32) vs (32, 64)' in r.stderr
