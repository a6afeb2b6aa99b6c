"""The pipeline as users run it: `clip-har pipeline --demo` in a fresh copy of the checkout (papermill runs each stage's
notebook, DVC chains them), what it leaves, what `dvc repro` does next, the retrain gate both ways, retraining on a
feedback export, the errors users can cause, and the CI/CD and container files."""
import json, shutil, time
from pathlib import Path

import httpx, pytest, yaml

from conftest import BIN, ROOT, clip_har, clip_har_here, copy_checkout, run
from clip_har.core import TINY_MODEL, fixtures_dir, network_use

ARTIFACTS = ['data/prepared/manifest.csv', 'data/prepared/validation/report.json', 'outputs/zeroshot/metrics.json', 'outputs/train/model.pt',
             'outputs/train/wise_ft.pt', 'outputs/train/history.csv', 'outputs/evaluate/report.html', 'outputs/evaluate/metrics.json',
             'outputs/hub/README.md', 'outputs/hub/clip_har.json', 'outputs/export/onnx-fp32/manifest.json', 'outputs/export/onnx-int8/manifest.json',
             'outputs/benchmark/benchmark.md', 'outputs/benchmark/benchmark.png']
RECORDS = ['01_data', '03_model', '05_train', '08_evaluate', '06_export', '07_inference']

DEMO_SETS = ['--set', f'data.source={fixtures_dir()}', '--set', "train.stages=[{name: all, train: all, epochs: 1, lr: 1.0e-2}]",
             '--set', 'export.precisions=[fp32, int8]']

def stages_run(out: str) -> list[str]:
    "The stages a `dvc repro` ran, from its output."
    return [l.split("'")[1] for l in out.splitlines() if l.startswith("Running stage '")]

@pytest.fixture(scope='module')
def demo(tmp_path_factory) -> Path:
    "A fresh copy of the checkout after `clip-har pipeline --demo` on the committed fixtures (1 epoch; ONNX fp32 and int8)."
    repo = copy_checkout(tmp_path_factory.mktemp('pipeline')/'repo')
    for f in ('dvc.lock', 'params.yaml'): (repo/'demo'/f).unlink(missing_ok=True)  # a local demo's (untracked): not in a fresh clone
    t0 = time.time()
    r = clip_har('pipeline', '--demo', '-q', *DEMO_SETS, cwd=repo, timeout=1500)
    print(f'demo pipeline on the fixtures: {time.time() - t0:.0f} s')
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert json.loads(r.stdout.strip().splitlines()[-1])['ran'] == ['prepare', 'zeroshot', 'train', 'evaluate', 'export', 'benchmark']
    return repo/'demo'

def test_the_demo_leaves_every_artifact_and_run_record(demo):
    missing = [a for a in ARTIFACTS if not (demo/a).is_file()]
    assert not missing, missing
    assert json.loads((demo/'outputs/evaluate/metrics.json').read_text())['smoke_run'] is True
    assert 'smoke' in (demo/'outputs/hub/README.md').read_text().lower()
    assert 'random weights' in (demo/'outputs/benchmark/benchmark.md').read_text()
    for name in RECORDS:  # each stage's executed notebook, with outputs
        nb = json.loads((demo/'outputs'/'runs'/f'{name}.ipynb').read_text())
        assert nb['metadata']['papermill']['parameters']['params_file'].endswith('params.yaml')
        assert any(c.get('outputs') for c in nb['cells'] if c['cell_type'] == 'code')
        assert nb['metadata']['clip_har']['test_cells_left_out'] > 0 and not any('test_eq(' in ''.join(c['source']) for c in nb['cells'])
    shown = {name: json.dumps([o for c in json.loads((demo/'outputs'/'runs'/f'{name}.ipynb').read_text())['cells'] for o in c.get('outputs', [])])
             for name in RECORDS}  # what each stage showed: its summary line and its plots, as a reader of the record sees them
    assert 'Data validation' in shown['01_data'] and 'image/png' in shown['01_data']
    assert 'zero-shot on' in shown['03_model'] and 'image/png' in shown['03_model']
    assert 'valid accuracy' in shown['05_train'] and 'image/png' in shown['05_train']  # the WiSE-FT curve
    assert 'clip_har evaluation' in shown['08_evaluate'] and 'id=\\"per-class\\"' in shown['08_evaluate'] and 'data:image/png;base64,' in shown['08_evaluate']
    import mlflow  # the run records are logged to the training run
    run_id = json.loads((demo/'outputs/train/train_metrics.json').read_text())['mlflow_run_id']
    client = mlflow.MlflowClient(f"sqlite:///{demo/'outputs'/'mlflow.db'}")
    logged = {Path(a.path).name for a in client.list_artifacts(run_id, 'notebooks')}
    assert {f'{n}.ipynb' for n in RECORDS} <= logged, logged

def test_dvc_after_the_demo(demo, tmp_path):
    "Nothing to redo; metrics and plots show; a sweep point (`dvc exp run -S train.epochs=2`) reruns train and what follows, not prepare."
    again = run(BIN/'dvc', 'repro', cwd=demo, check=True)
    assert 'Running stage' not in again.stdout and 'up to date' in again.stdout, again.stdout
    shown = run(BIN/'dvc', 'metrics', 'show', cwd=demo, check=True).stdout
    top1 = json.loads((demo/'outputs/evaluate/metrics.json').read_text())['top1']
    assert 'top1' in shown and f'{top1:.5f}'[:5] in shown, shown
    run(BIN/'dvc', 'plots', 'show', '-o', tmp_path/'plots', cwd=demo, check=True)
    assert 'confusion matrix (evaluate split)' in (tmp_path/'plots'/'index.html').read_text()
    changed = run(BIN/'dvc', 'exp', 'run', '-S', 'train.epochs=2', cwd=demo, check=True, timeout=1200).stdout
    assert stages_run(changed) == ['train', 'evaluate', 'export', 'benchmark'], changed
    assert yaml.safe_load((demo/'params.yaml').read_text())['train']['epochs'] == 2  # the experiment is in the workspace
    import csv, io
    exps = list(csv.DictReader(io.StringIO(run(BIN/'dvc', 'exp', 'show', '--csv', cwd=demo, check=True).stdout)))
    exp = next(e for e in exps if e['Experiment'])  # the experiment's row: its params and its metrics, for comparing sweep points
    top1 = json.loads((demo/'outputs/evaluate/metrics.json').read_text())['top1']
    assert exp['train.epochs'] == '2' and abs(float(exp['top1']) - top1) < 1e-9, exp

def _centroid_model(src: Path, dst: Path, rows, shift: int = 0) -> Path:
    """A copy of a trained classifier whose head is the nearest class centroid of `rows`' images (the test split itself:
    with one image per class it scores 1.0 there), with the centroids moved `shift` classes along (then it scores 0)."""
    import torch, torch.nn.functional as F
    from clip_har.data import image_batch
    from clip_har.model import load_classifier, read_classifier_meta, save_classifier
    clf, meta = load_classifier(src).eval(), read_classifier_meta(src)
    with torch.no_grad():
        emb = F.normalize(clf.visual(image_batch(list(rows.path), clf.preprocess)).float(), dim=-1)
        cents = torch.zeros_like(clf.head.fc.weight)
        for i, label in enumerate(clf.labels):
            mine = emb[torch.tensor((rows.label == label).values)]
            if len(mine): cents[(i + shift) % len(clf.labels)] = F.normalize(mine.mean(0), dim=-1)
        clf.head.fc.weight.copy_(100 * cents); clf.head.fc.bias.zero_()
    save_classifier(clf, meta, dst)
    return dst

def _register(cfg, path: Path) -> int:
    import mlflow
    from clip_har.tracking import log_classifier
    mlflow.set_tracking_uri(cfg.track.mlflow_uri); mlflow.set_experiment(cfg.track.experiment)
    with mlflow.start_run(run_name=path.stem): return int(log_classifier(path, cfg.track.register_as)['version'])

def test_the_retrain_gate_both_ways(demo, tmp_path, monkeypatch):
    from clip_har.core import load_config
    from clip_har.data import read_manifest
    from clip_har.pipeline import retrain_gate
    monkeypatch.chdir(demo)
    cfg = load_config('params.yaml')
    test = read_manifest('data/prepared/manifest.csv').query("split == 'test'")  # paths made absolute
    assert test.label.value_counts().max() == 1  # the fixtures' test split: one photo per class
    model = Path('outputs/train/wise_ft.pt')
    worse = _register(cfg, _centroid_model(model, tmp_path/'shifted.pt', test, shift=1))  # every photo gets its neighbour's label
    d = retrain_gate(cfg, worse)
    print(d['reason'])
    assert d['champion'] == 1 and d['candidate_score'] == 0.0 and not d['promoted']
    import mlflow
    client = mlflow.MlflowClient(cfg.track.mlflow_uri)
    assert client.get_registered_model(cfg.track.register_as).aliases['champion'] in (1, '1')
    client.set_registered_model_alias(cfg.track.register_as, 'champion', str(worse))  # a bad champion ...
    better = _register(cfg, _centroid_model(model, tmp_path/'centroids.pt', test))  # ... beaten by one fitted to the split
    d = retrain_gate(cfg, better)
    print(d['reason'])
    assert d['promoted'] and d['candidate_score'] == 1.0 and d['champion_score'] == 0.0
    assert client.get_registered_model(cfg.track.register_as).aliases['champion'] in (better, str(better))
    assert json.loads(Path('outputs/retrain/decision.json').read_text())['promoted'] is True

def test_clip_har_retrain_keeps_a_champion_the_new_model_does_not_beat(demo):
    "After the gate tests the champion scores 1.0 on the test split: `clip-har retrain` reruns nothing, scores the last trained version against it, and keeps it."
    import mlflow
    from clip_har.core import load_config
    cfg = load_config(demo/'params.yaml')
    client = mlflow.MlflowClient(f"sqlite:///{demo/'outputs'/'mlflow.db'}")
    champion = int(client.get_registered_model(cfg.track.register_as).aliases['champion'])
    r = clip_har('retrain', '--demo', '-q', *DEMO_SETS, '--set', 'train.epochs=2', cwd=demo.parent, timeout=900)  # the params test_dvc_after_the_demo left
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert 'Running stage' not in r.stdout, r.stdout
    d = json.loads(r.stdout.strip().splitlines()[-1])
    trained = json.loads((demo/'outputs/train/train_metrics.json').read_text())['registered']['version']
    assert (d['candidate'], d['champion'], d['champion_score'], d['promoted'], d['after_gate']) == (int(trained), champion, 1.0, False, []), d
    assert int(client.get_registered_model(cfg.track.register_as).aliases['champion']) == champion

def test_a_failing_stage_names_its_notebook_and_cell_and_keeps_it(demo, tmp_path):
    r = clip_har('pipeline', '--stage', 'prepare', '--set', f'data.source={tmp_path}/no-such-folder', '--set', f'paths.out_dir={tmp_path}/out',
                 '--set', f'paths.data_dir={tmp_path}/data', cwd=demo)
    assert r.returncode == 2 and 'Traceback' not in r.stderr, r.stderr
    assert 'stage prepare: 01_data.ipynb failed in cell' in r.stderr and 'DataSourceError' in r.stderr
    kept = tmp_path/'out'/'runs'/'01_data.ipynb'
    assert f'the executed notebook is kept at {kept}' in r.stderr.replace(str(kept.resolve()), str(kept)), r.stderr
    assert kept.is_file() and 'papermill' in json.loads(kept.read_text())['metadata']
    assert (kept.parent/'01_data.kernel.log').is_file() and '[IPKernelApp]' not in r.stderr  # the kernel's own stderr goes to its log

@pytest.mark.parametrize('args, message', [
    (['--stage', 'train', '--set', 'train.epochz=3'], "unknown key 'train.epochz'"),
    (['--stage', 'train', '--set', 'data.batch_size=-4'], "'data.batch_size'"),
    (['--stage', 'deploy'], "unknown stage 'deploy'; the stages are prepare, zeroshot, train, evaluate, export, benchmark"),
    (['--set', 'data.batch_size=8'], 'the main job reads params.yaml as it is'),
])
def test_bad_parameters_are_one_line_errors(args, message):
    r = clip_har_here('pipeline', *args, cwd=ROOT)
    assert r.returncode == 2 and message in r.stderr and 'Traceback' not in r.stderr, r.stderr

def test_the_main_job_offline_fails_at_once_naming_the_fix():
    "Offline, `clip-har pipeline` with params.yaml as it is stops before any stage, asking nothing of the network and waiting for nothing."
    with network_use() as net:
        r = clip_har_here('pipeline', cwd=ROOT)
    assert r.returncode == 2 and 'cannot be reached from here. Fix:' in r.stderr and 'make demo' in r.stderr, r.stderr
    print(r.stderr.strip())
    assert (net.lookups, net.connects, net.sleeps) == ([], [], []), (net.lookups, net.connects, net.sleeps)
    assert 'Running stage' not in r.stdout + r.stderr

def test_dvc_files_are_generated_from_the_stage_table():
    from clip_har.pipeline import dvc_yaml
    assert yaml.safe_load((ROOT/'dvc.yaml').read_text()) == dvc_yaml()
    assert yaml.safe_load((ROOT/'demo'/'dvc.yaml').read_text()) == dvc_yaml('../')

def test_ci_cd_workflows_and_containers():
    "The workflows validate against GitHub's schema (check-jsonschema's vendored copy); the images are non-root."
    flows = sorted((ROOT/'.github'/'workflows').glob('*.y*ml'))
    assert {f.stem for f in flows} >= {'test', 'docs', 'containers', 'retrain'}
    r = run(BIN/'check-jsonschema', '--builtin-schema', 'vendor.github-workflows', *flows)
    assert r.returncode == 0, r.stdout + r.stderr
    retrain = yaml.safe_load((ROOT/'.github/workflows/retrain.yaml').read_text())
    assert retrain[True]['schedule'] and 'clip-har retrain' in json.dumps(retrain)  # YAML reads `on:` as True
    assert 'bash .ci/run' in (ROOT/'.github/workflows/test.yaml').read_text()
    audit = yaml.safe_load((ROOT/'.github/workflows/test.yaml').read_text())['jobs']['audit']
    assert any('pip-audit' in s.get('run', '') and '--skip-editable' in s['run'] for s in audit['steps'])
    scan = next(s for s in yaml.safe_load((ROOT/'.github/workflows/containers.yaml').read_text())['jobs']['build']['steps'] if 'trivy' in s.get('uses', ''))
    assert (scan['with']['severity'], scan['with']['exit-code']) == ('HIGH,CRITICAL', '1')  # the build fails on them
    images = {name: (ROOT/'docker'/f'{name}.Dockerfile').read_text() for name in ('train', 'serve', 'dashboard')}
    assert all('\nUSER 10001' in text for text in images.values()), 'every image runs as a non-root user'
    assert all('HEALTHCHECK' in images[name] for name in ('serve', 'dashboard')), 'the long-running services have health checks'
    assert 'ENTRYPOINT ["clip-har"]' in images['train'] and 'HEALTHCHECK' not in images['train']  # a batch job: it ends, nothing to probe
    assert 'nvidia/cuda' in (ROOT/'docker/train.Dockerfile').read_text()
    build = yaml.safe_load((ROOT/'.github/workflows/containers.yaml').read_text())['jobs']['build']
    assert build['strategy']['matrix']['image'] == ['train', 'serve', 'dashboard']
    assert any(step.get('with', {}).get('file') == 'docker/${{ matrix.image }}.Dockerfile' for step in build['steps'])

def test_feedback_export_feeds_retrain_without_duplicates(demo, tmp_path):
    "Corrections recorded by a real `clip-har serve` (images kept) are exported and retrained on: new images join the data once, images the data holds are not added again, and the new model's lineage names the export."
    import io, mlflow, pandas as pd
    from PIL import Image
    from conftest import start, stop
    shutil.copytree(demo/'outputs'/'export'/'onnx-fp32', tmp_path/'model')
    photos = sorted(fixtures_dir().rglob('*.jpg'))
    mirrored = []
    for p in photos[:2]:  # new content: the data has these photos, not their mirror images
        b = io.BytesIO(); Image.open(p).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(b, 'JPEG'); mirrored.append(b.getvalue())
    said = [(mirrored[0], 'running'), (mirrored[1], 'eating'), (photos[2].read_bytes(), photos[2].parent.name),
            (photos[3].read_bytes(), photos[3].parent.name), (photos[4].read_bytes(), 'sleeping')]  # the last three: known images
    proc, url, _ = start(tmp_path/'model', f'serve.record_url=sqlite:///{tmp_path}/records.db', 'serve.record_images=true')
    try:
        with httpx.Client(base_url=url, timeout=60) as c:
            for data, label in said:
                pid = c.post('/predict/image', files={'file': ('photo.jpg', data, 'image/jpeg')}).json()['prediction_id']
                assert c.post('/feedback', json={'prediction_id': pid, 'label': label}).status_code == 200
    finally: assert stop(proc)
    r = clip_har('feedback', 'export', '--out', tmp_path/'feedback', '--url', f'sqlite:///{tmp_path}/records.db')
    assert r.returncode == 0 and json.loads(r.stdout.strip().splitlines()[-1])['exported'] == 5, r.stdout + r.stderr
    assert len(pd.read_csv(tmp_path/'feedback'/'provenance.csv')) == 5
    r = clip_har('retrain', '--demo', '-q', *DEMO_SETS, '--feedback', tmp_path/'feedback', cwd=demo.parent, timeout=1500)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    d = json.loads(r.stdout.strip().splitlines()[-1])  # only a candidate that is the champion after the gate is exported and benchmarked
    assert d['after_gate'] == (['export', 'benchmark'] if d['promoted'] or d['champion'] == d['candidate'] else []), d
    assert stages_run(r.stdout) == ['prepare', 'zeroshot', 'train', 'evaluate'] + d['after_gate'], r.stdout
    df = pd.read_csv(demo/'data'/'prepared'/'manifest.csv')
    added = df[df.path.str.contains('feedback/')]
    assert len(df) == 47 and not df.sha256.duplicated().any(), (len(df), df[df.sha256.duplicated(keep=False)])
    assert sorted(added.label) == ['eating', 'running'], added
    run_id = json.loads((demo/'outputs'/'train'/'train_metrics.json').read_text())['mlflow_run_id']
    tags = mlflow.MlflowClient(f"sqlite:///{demo/'outputs'/'mlflow.db'}").get_run(run_id).data.tags
    assert tags['feedback_exports'] == str((tmp_path/'feedback').resolve()) and str((tmp_path/'feedback').resolve()) in tags['data_source'], tags
