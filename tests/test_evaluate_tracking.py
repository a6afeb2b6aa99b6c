"""Evaluation and tracking for real: a tracking server on loopback, the registry, the pyfunc model (loaded and served),
the HTML report in chromium, DVC's metrics and plots, and the errors users can cause."""
import base64, json, re, socket, subprocess, tempfile, time, urllib.request
from pathlib import Path
import pandas as pd
import pytest
import yaml
from conftest import clip_har, clip_har_here, copy_checkout, env, run, run_paths, prepare_real_images, start, stop, BIN, ROOT

from clip_har.core import TINY_MODEL, HAR_LABELS, fixtures_dir, har_mini_dir, network_use

SMOKE = ['--set', f'model.name={TINY_MODEL}', '--set', 'model.pretrained=null', '--set', 'device=cpu', '--set', 'train.patience=null',
         '--set', 'data.batch_size=8', '--set', 'train.label_smoothing=0', '--set', 'train.stages=[{name: all, train: all, epochs: 2, lr: 1.0e-2}]']

def _free_port() -> int:
    with socket.socket() as s: s.bind(('127.0.0.1', 0)); return s.getsockname()[1]

_paths = run_paths

def _images(n=6) -> list[Path]:
    "Real HAR photos: from har-mini when it is here, else the committed fixtures."
    root = har_mini_dir() or fixtures_dir()
    return sorted(p for p in root.rglob('*') if p.suffix.lower() in ('.jpg', '.jpeg', '.png'))[:n]

@pytest.fixture(scope='module')
def prepared(tmp_path_factory):
    "The fixtures, with a test split, prepared once for this module (what is recorded, reported and refused does not need har-mini)."
    return prepare_real_images(tmp_path_factory.mktemp('eval'), har_mini=False)

def _wait_http(url, proc, seconds=120):
    deadline = time.time() + seconds
    while time.time() < deadline:
        if proc.poll() is not None: raise AssertionError(f'{url}: the server exited ({proc.returncode}): {proc.stderr.read()[-3000:]}')
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200: return
        except OSError: time.sleep(0.5)
    raise AssertionError(f'{url}: no answer in {seconds} s')

@pytest.fixture()
def mlflow_server(tmp_path):
    "A real `mlflow server` on 127.0.0.1 with a sqlite backend, stopped after the test."
    port = _free_port()
    proc = subprocess.Popen([str(BIN/'mlflow'), 'server', '--backend-store-uri', f'sqlite:///{tmp_path}/server.db',
                             '--artifacts-destination', str(tmp_path/'artifacts'), '--host', '127.0.0.1', '--port', str(port), '--workers', '1'],
                            cwd=tmp_path, env=env(MLFLOW_SERVER_ENABLE_JOB_EXECUTION='false'),  # as docker/compose.yaml runs it: no job runner
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f'http://127.0.0.1:{port}'
    try:
        _wait_http(f'{url}/health', proc)
        yield url
    finally:
        proc.terminate()
        try: proc.wait(30)
        except subprocess.TimeoutExpired: proc.kill()

def test_training_against_a_tracking_server_registers_a_model_that_serves(prepared, mlflow_server, tmp_path):
    "Train and evaluate against `mlflow server` over HTTP; read the run and the registered model back; load and serve it."
    track = ['--set', f'track.mlflow_uri={mlflow_server}', '--set', 'track.backends=[mlflow]', '--set', 'track.register_as=har-clip']
    r = clip_har('train', *_paths(prepared), *SMOKE, *track, '--out', tmp_path/'train', '-q')
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads((tmp_path/'train'/'train_metrics.json').read_text())
    assert summary['registered'] == {'model_uri': 'models:/har-clip/1', 'version': 1, 'aliases': ['champion', 'candidate']}
    r = clip_har('evaluate', *_paths(prepared), *SMOKE, *track, '--model', tmp_path/'train'/'model.pt', '--out', tmp_path/'eval', '-q')
    assert r.returncode == 0, r.stderr[-3000:]

    import mlflow
    client = mlflow.MlflowClient(mlflow_server)
    run_ = client.get_run(summary['mlflow_run_id'])
    assert run_.info.status == 'FINISHED' and run_.data.params['model.name'] == TINY_MODEL
    assert len(client.get_metric_history(run_.info.run_id, 'accuracy')) == 2
    assert run_.data.tags['manifest_sha256'] == __import__('hashlib').sha256((prepared/'data'/'prepared'/'manifest.csv').read_bytes()).hexdigest()
    assert {'model.pt', 'history.csv', 'train_metrics.json'} <= {a.path for a in client.list_artifacts(run_.info.run_id)}
    mv = client.get_model_version_by_alias('har-clip', 'champion')
    assert mv.version == '1' and len(mv.tags['git_commit']) == 40 and float(mv.tags['valid_accuracy']) == pytest.approx(summary['valid_accuracy'], abs=1e-4)
    ev = [r for r in client.search_runs([run_.info.experiment_id]) if r.info.run_name.startswith('evaluate-')]
    assert len(ev) == 1 and 'test_top1' in ev[0].data.metrics  # --model given: evaluation is a run of its own
    assert 'evaluation/report.html' in {a.path for a in client.list_artifacts(ev[0].info.run_id, 'evaluation')}

    table = clip_har('runs', *track, '-q')
    versions = table.stdout.split('Registered versions')[1]
    assert table.returncode == 0 and summary['mlflow_run_id'] in table.stdout and re.search(r'\|\s+1\s+\|\s+candidate,champion', versions), table.stdout
    (tmp_path/'deployment.yaml').write_text((ROOT/'docker'/'k8s'/'deployment.yaml').read_text())  # the GitOps change a promotion makes
    promoted = clip_har('promote', '1', '--alias', 'production', '--manifest', tmp_path/'deployment.yaml', *track, '-q')
    assert promoted.returncode == 0 and json.loads(promoted.stdout.splitlines()[-1])['release']['was'] == '/models/onnx-fp32', promoted.stderr
    assert yaml.safe_load((tmp_path/'deployment.yaml').read_text())['spec']['template']['spec']['containers'][0]['args'][:2] == ['--model', '/models/har-clip/1/onnx-fp32']
    assert client.get_model_version_by_alias('har-clip', 'production').version == '1'
    bad = clip_har_here('promote', '99', *track, '-q')
    assert bad.returncode == 2 and 'cannot promote version 99 of har-clip' in bad.stderr, bad.stderr

    mlflow.set_tracking_uri(mlflow_server)
    model = mlflow.pyfunc.load_model('models:/har-clip@champion')
    imgs = _images()
    preds = model.predict(pd.DataFrame({'image': [str(p) for p in imgs]}), params={'top_k': 3})
    print(f"pyfunc on {len(imgs)} images from {'har-mini' if har_mini_dir() else 'the fixtures'}: {list(preds.label)}")
    assert len(preds) == len(imgs) and set(preds.label) <= set(HAR_LABELS) and all(len(t) == 3 for t in preds.top_labels)
    assert ((preds.score > 0) & (preds.score <= 1)).all()

    port = _free_port()
    proc = subprocess.Popen([str(BIN/'mlflow'), 'models', 'serve', '-m', 'models:/har-clip@champion', '--env-manager', 'local',
                             '-h', '127.0.0.1', '-p', str(port)], cwd=tmp_path, env=env(MLFLOW_TRACKING_URI=mlflow_server),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        _wait_http(f'http://127.0.0.1:{port}/ping', proc, 180)
        body = {'dataframe_split': {'columns': ['image'], 'data': [[base64.b64encode(p.read_bytes()).decode()] for p in imgs[:2]]}}
        req = urllib.request.Request(f'http://127.0.0.1:{port}/invocations', json.dumps(body).encode(), {'Content-Type': 'application/json'})
        with urllib.request.urlopen(req, timeout=60) as resp: served = json.loads(resp.read())['predictions']
        assert [p['label'] for p in served] == list(preds.label[:2])
        fixtures = sorted(fixtures_dir().rglob('*.jpg'))  # the registered model, served by MLflow and by `clip-har serve`: the same top-1
        body = {'dataframe_split': {'columns': ['image'], 'data': [[base64.b64encode(p.read_bytes()).decode()] for p in fixtures]}}
        req = urllib.request.Request(f'http://127.0.0.1:{port}/invocations', json.dumps(body).encode(), {'Content-Type': 'application/json'})
        with urllib.request.urlopen(req, timeout=120) as resp: by_mlflow = [p['label'] for p in json.loads(resp.read())['predictions']]
        registered = next(Path(mlflow.artifacts.download_artifacts('models:/har-clip@champion', dst_path=str(tmp_path/'registered'))).rglob('*.pt'))
        ours, url, _ = start(registered, 'serve.record=false', 'precision=fp32')  # the arithmetic the pyfunc runs (bf16 on CPUs with it would flip near-ties)
        try:
            import httpx
            by_us = [httpx.post(url + '/predict/image', files={'file': (p.name, p.read_bytes(), 'image/jpeg')}).json()['predictions'][0]['class_name'] for p in fixtures]
        finally: assert stop(ours)
        print(f'{len(fixtures)} fixture photos: mlflow models serve and clip-har serve agree on {sum(a == b for a, b in zip(by_mlflow, by_us))}')
        assert by_mlflow == by_us and len(set(by_us)) > 1
        bad = urllib.request.Request(f'http://127.0.0.1:{port}/invocations', json.dumps({'dataframe_split': {'columns': ['image'], 'data': [['bm90IGFuIGltYWdl']]}}).encode(),
                                     {'Content-Type': 'application/json'})
        with pytest.raises(urllib.error.HTTPError) as e: urllib.request.urlopen(bad, timeout=60)
        assert e.value.code == 400 and 'not a readable image' in e.value.read().decode()
    finally:
        proc.terminate(); proc.wait(30)

@pytest.fixture(scope='module')
def evaluated(prepared):
    "A tiny training run, evaluated with the report written."
    r = clip_har('train', *_paths(prepared), *SMOKE, '--set', 'track.backends=[]', '-q')
    assert r.returncode == 0, r.stderr[-3000:]
    r = clip_har('evaluate', *_paths(prepared), *SMOKE, '--set', 'track.backends=[]', '-q')
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])

def _chromium(exe, *args):
    return subprocess.run([exe, '--headless', '--no-sandbox', '--disable-gpu', '--disable-background-networking', '--disable-component-update',
                           '--disable-sync', '--no-first-run', f'--user-data-dir={tempfile.mkdtemp()}', *args], capture_output=True, text=True, timeout=120)

def test_the_html_report_opens_in_chromium(chromium, evaluated):
    "The report shows the confusion matrix and the per-class table side by side in the first screen."
    report = Path(evaluated['report'])
    dom = _chromium(chromium, '--dump-dom', report.resolve().as_uri()).stdout
    assert 'alt="confusion matrix" src="data:image/png;base64,' in dom
    assert dom.count('<tr>', dom.index('id="per-class"')) >= 16  # header + 15 classes
    shot = ROOT/'outputs'/'screenshots'/'evaluation_report.png'; shot.parent.mkdir(parents=True, exist_ok=True)
    _chromium(chromium, f'--screenshot={shot}', '--window-size=1400,1000', '--hide-scrollbars', report.resolve().as_uri())
    from PIL import Image
    import numpy as np
    px = np.asarray(Image.open(shot).convert('RGB')).astype(int)
    left, right = px[100:900, :800], px[100:900, 850:1400]
    blue = ((left[..., 2] - left[..., 0]) > 5).mean()  # the matrix's blues (even its palest cells are blue-tinted)
    ink = (right.sum(-1) < 300).mean()  # the table's text and borders
    print(f'screenshot {shot}: {blue:.1%} blue pixels left, {ink:.1%} dark pixels right')
    assert blue > 0.25 and ink > 0.01

def test_evaluate_writes_every_view(evaluated):
    out = Path(evaluated['report']).parent
    m = json.loads((out/'metrics.json').read_text())
    d = json.loads((out/'details.json').read_text())
    assert m['smoke_run'] is True and 0 <= m['top1'] <= 1 and m['n'] == d['n'] == sum(r['support'] for r in d['per_class'])
    assert len(d['confusion_matrix']) == 15 and len(d['reliability']) == 15 and m['temperature'] > 0
    for f in ('report.html', 'report.md', 'predictions.csv', 'mistakes.csv', 'per_class.csv', 'roc.png', 'reliability.png', 'mistakes.png',
              'confusion_matrix.png', 'confusion_counts.png', 'per_class.png'):
        assert (out/f).stat().st_size > 0, f
    assert '| top-1 accuracy |' in (out/'report.md').read_text()

def test_hub_folder_and_offline_push(prepared, evaluated, tmp_path):
    "`clip-har hub` writes a folder that loads back; `--push` offline fails fast, naming the fix."
    r = clip_har('hub', *_paths(prepared), *SMOKE, '--folder', tmp_path/'hub', '-q')
    assert r.returncode == 0, r.stderr[-2000:]
    from clip_har.tracking import load_hub_classifier
    clf = load_hub_classifier(tmp_path/'hub')
    assert clf.labels == list(HAR_LABELS)
    card = (tmp_path/'hub'/'README.md').read_text()
    assert f"| top-1 accuracy | {evaluated['top1']:.4f} |" in card and 'Smoke run' in card
    with network_use() as net:
        r = clip_har_here('hub', *_paths(prepared), *SMOKE, '--folder', tmp_path/'hub', '--push', 'someone/har-clip', '-q')
    assert r.returncode == 2 and 'cannot be reached from here' in r.stderr, r.stderr
    assert (net.lookups, net.connects, net.sleeps) == ([], [], []), (net.lookups, net.connects, net.sleeps)  # HF_HUB_OFFLINE: nothing tried, no waits

@pytest.mark.parametrize('change, message', [
    (lambda m: m.assign(label=m.label.where(m.index != 0, 'juggling')), "the data has labels the model does not know: ['juggling']"),
    (lambda m: m[m.split != 'test'], 'the test split is empty'),
])
def test_evaluate_bad_data(prepared, evaluated, tmp_path, change, message):
    m = pd.read_csv(prepared/'data'/'prepared'/'manifest.csv')
    m['path'] = [str((prepared/'data'/'prepared'/p).resolve()) for p in m.path]
    change(m).to_csv(tmp_path/'manifest.csv', index=False)
    r = clip_har_here('evaluate', *_paths(prepared), *SMOKE, '--manifest', tmp_path/'manifest.csv', '--out', tmp_path/'e', '-q')
    assert r.returncode == 2 and message in r.stderr and 'Traceback' not in r.stderr, r.stderr

def test_evaluate_missing_or_corrupt_model(prepared, tmp_path):
    r = clip_har_here('evaluate', *_paths(prepared), '--model', tmp_path/'none.pt', '-q')
    assert r.returncode == 2 and 'no such model file' in r.stderr, r.stderr
    (tmp_path/'bad.pt').write_bytes(b'not a torch file')
    r = clip_har_here('evaluate', *_paths(prepared), '--model', tmp_path/'bad.pt', '-q')
    assert r.returncode == 2 and 'not a readable model file' in r.stderr and 'Traceback' not in r.stderr, r.stderr

