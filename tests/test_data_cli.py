"""The data layer through the real `clip-har` command: sources, validation report, prepare, bad input."""
import json, shutil
from pathlib import Path
import pandas as pd
import pytest
from PIL import Image
from conftest import ROOT, clip_har, clip_har_here

from clip_har.core import HAR_LABELS, fixtures_dir, network_use
from clip_har.data import read_items, content_labels

def test_har_mini_same_items_as_folder_csv_and_parquet(har_mini, tmp_path):
    "har-mini read as image folder, CSV and parquet (with image bytes) holds the same 1,200 images and labels."
    import datasets
    folder = read_items(har_mini)
    csv = read_items(har_mini/'labels.csv')
    assert len(folder) == len(csv) == 1200
    blobs = [Path(p).read_bytes() for p in folder.path]
    ds = datasets.Dataset.from_dict({'image': [{'bytes': b, 'path': Path(p).name} for b, p in zip(blobs, folder.path)],
                                     'labels': [HAR_LABELS.index(l) for l in folder.label]},
                                    features=datasets.Features({'image': datasets.Image(), 'labels': datasets.ClassLabel(names=list(HAR_LABELS))}))
    ds.to_parquet(tmp_path/'har.parquet')
    parquet = read_items(tmp_path/'har.parquet', cache_dir=tmp_path/'cache')
    want = content_labels(folder)
    assert content_labels(csv) == want
    assert content_labels(parquet) == want
    assert sorted(folder.label.unique()) == list(HAR_LABELS)
    assert folder.split.value_counts().to_dict() == {'train': 900, 'valid': 300}

def _damaged_copy(src: Path, dest: Path) -> dict:
    "Copy `src` and damage it: 3 corrupt files, 2 duplicates across splits, 1 grayscale image."
    shutil.copytree(src, dest)
    train = sorted((dest/'train'/'calling').glob('*.jpg'))
    truncated, zero, text = train[0], train[1], dest/'train'/'clapping'/'not_an_image.jpg'
    truncated.write_bytes(truncated.read_bytes()[:600])
    zero.write_bytes(b'')
    text.write_text('this is text, not a JPEG')
    dups = []
    for label in ('eating', 'running'):
        orig = sorted((dest/'train'/label).glob('*.jpg'))[-1]
        copy = dest/'valid'/label/f'dup_of_{orig.name}'
        shutil.copy(orig, copy); dups.append((orig, copy))
    gray = sorted((dest/'train'/'sitting').glob('*.jpg'))[-1]
    Image.open(gray).convert('L').save(gray)
    return dict(corrupt=[truncated, zero, text], dups=dups, gray=gray)

def test_validate_names_every_problem(tmp_path):
    "`clip-har validate` lists corrupt files, cross-split duplicates and a grayscale image, and exits 0."
    from clip_har.core import har_mini_dir
    src = har_mini_dir() or fixtures_dir()
    bad = _damaged_copy(src, tmp_path/'har')
    n_files = len(read_items(tmp_path/'har'))
    r = clip_har('validate', tmp_path/'har', '--out', tmp_path/'report', '-q')
    assert r.returncode == 0, r.stderr
    rep = json.loads((tmp_path/'report'/'report.json').read_text())
    assert sorted(u['path'] for u in rep['unreadable']) == sorted(str(p) for p in bad['corrupt'])
    assert rep['n_bad'] == 3 and rep['n_ok'] == n_files - 3
    cross = [sorted(d['paths']) for d in rep['cross_split_duplicates']]
    assert sorted(cross) == sorted(sorted(map(str, pair)) for pair in bad['dups'])
    assert [c['path'] for c in rep['converted_modes']] == [str(bad['gray'])]
    assert rep['converted_modes'][0]['mode'] == 'L'
    assert sum(rep['class_counts'].values()) == n_files - 3
    assert (tmp_path/'report'/'class_balance.png').stat().st_size > 5000
    md = (tmp_path/'report'/'report.md').read_text()
    assert 'not_an_image.jpg' in md and 'Duplicates across splits (2)' in md
    summary = json.loads(r.stdout)
    assert summary['n_bad'] == 3 and summary['cross_split_duplicate_groups'] == 2
    assert all(p.exists() for p in bad['corrupt']), 'validation must never delete files'

def test_prepare_on_har_mini(har_mini, tmp_path):
    "The full split: seeded, stratified, every class in every split, no image in two splits."
    r = clip_har('prepare', '--source', har_mini, '--out', tmp_path/'p', '--set', f'paths.cache_dir={tmp_path}/c', '-q')
    assert r.returncode == 0, r.stderr
    m = pd.read_csv(tmp_path/'p'/'manifest.csv')
    counts = m.groupby(['split', 'label']).size().unstack()
    assert counts.notna().all().all() and len(counts.columns) == 15
    assert abs(m.split.value_counts(normalize=True)['test'] - 0.15) < 0.02
    assert m.groupby('sha256').split.nunique().max() == 1
    r2 = clip_har('prepare', '--source', har_mini, '--out', tmp_path/'p2', '--set', f'paths.cache_dir={tmp_path}/c', '-q')
    assert (tmp_path/'p2'/'manifest.csv').read_text() == (tmp_path/'p'/'manifest.csv').read_text()

@pytest.mark.parametrize('make_source, message', [
    (lambda d: d/'missing', 'no such file or folder'),
    (lambda d: (d/'empty').mkdir() or d/'empty', 'no images found'),
    (lambda d: (d/'x.csv').write_text('file_name,cls\na.jpg,calling\n') and d/'x.csv', "no file column; it needs one of ['path', 'filename'"),
    (lambda d: (d/'y.csv').write_text('filename\na.jpg\n') and d/'y.csv', "no label column; it needs one of ['label', 'labels']"),
    (lambda d: (d/'z.parquet').write_bytes(b'not parquet') and d/'z.parquet', 'not a readable parquet file'),
])
def test_bad_sources_are_clear_errors(tmp_path, make_source, message):
    r = clip_har('validate', make_source(tmp_path), '--out', tmp_path/'r', '-q')
    assert r.returncode == 2 and message in r.stderr, r.stderr
    assert 'Traceback' not in r.stderr

@pytest.mark.parametrize('params, override, message', [
    ('data:\n  batchsize: 8\n', None, "unknown key 'data.batchsize' (did you mean 'batch_size'?)"),
    ('data:\n  valid_pct: 2\n', None, "'data.valid_pct': Input should be less than 1"),
    ('device: tpu\n', None, "'device': Input should be 'auto', 'cuda', 'mps' or 'cpu'"),
    ('seed: 1\n', 'data.augment=high', "'data.augment': Input should be a valid number"),
    ('seed: [1\n', None, 'not valid YAML'),
])
def test_bad_params_are_clear_errors(tmp_path, params, override, message):
    (tmp_path/'params.yaml').write_text(params)
    extra = ['--set', override] if override else []
    r = clip_har('prepare', '--params', tmp_path/'params.yaml', *extra, '-q', cwd=tmp_path)
    assert r.returncode == 2 and message in r.stderr, r.stderr

def test_unknown_label_in_a_source_is_an_error(tmp_path):
    shutil.copytree(fixtures_dir()/'train', tmp_path/'src')
    (tmp_path/'src'/'calling').rename(tmp_path/'src'/'juggling')
    r = clip_har('prepare', '--source', tmp_path/'src', '--out', tmp_path/'p', '-q')
    assert r.returncode == 2 and "labels ['juggling'] are not in data.labels" in r.stderr, r.stderr

def test_hub_source_offline_fails_fast_with_the_fix(tmp_path):
    "HF_HUB_OFFLINE set: the Hub is never asked. No network: one name lookup, connection attempts bounded by 3 s, no retry waits."
    from fastcore.xtras import modified_env
    for offline in ('1', ''):
        with modified_env(HF_HUB_OFFLINE=offline, HF_DATASETS_OFFLINE=offline), network_use() as net:
            r = clip_har_here('prepare', '--out', tmp_path/'p', '-q', cwd=ROOT)
        assert r.returncode == 2 and 'point data.source at a local copy' in r.stderr, r.stderr
        print(f'HF_HUB_OFFLINE={offline!r}: names looked up {net.lookups}, connections {net.connects}, sleeps {net.sleeps}')
        assert not net.sleeps
        if offline: assert not net.lookups and not net.connects
        else: assert len(net.lookups) == 1 and all(t is not None and 0 < t <= 3 for _, t in net.connects), (net.lookups, net.connects)
