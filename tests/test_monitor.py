"""Closing the loop as a deployment runs it: `clip-har serve` on loopback recording every answer into SQLite and into a
real PostgreSQL server (Debian's, started for the test), feedback over HTTP and through `InferenceClient`, a store that
dies mid-traffic, drift that stays low for reference traffic and jumps for one class, and `clip-har monitor`."""
import base64, io, json, os, re, shutil, subprocess, tempfile, time
from pathlib import Path

import httpx, numpy as np, pytest
from PIL import Image

from conftest import ROOT, PROM, clip_har, drift_reference, eventually, run, start, start_prometheus, stop, tool
from clip_har.core import HAR_LABELS, TINY_MODEL, file_sha256, fixtures_dir
from clip_har.data import image_batch
from clip_har.inference import Predictor, random_classifier
from clip_har.metrics import monitor_reference
from clip_har.monitor import PredictionStore
from clip_har.serve import ClientError, InferenceClient, free_port, load_test

PHOTOS = sorted(fixtures_dir().rglob('*.jpg'))
JPG = PHOTOS[0].read_bytes()

def b64(data:bytes) -> str: return base64.b64encode(data).decode()

def metric(url:str, name:str) -> float:
    "One sample of the server's /metrics (0 when absent)."
    for line in httpx.get(url + '/metrics').text.splitlines():
        if line.startswith(name + ' ') or line.startswith(name + '{') and line.split(' ')[0] == name: return float(line.split()[-1])
    return 0.0

@pytest.fixture(scope='module')
def model(tmp_path_factory) -> Path:
    return random_classifier(TINY_MODEL, tmp_path_factory.mktemp('monitor')/'model.pt')

@pytest.fixture(params=['sqlite', 'postgresql'])
def store_url(request, tmp_path) -> str:
    return f'sqlite:///{tmp_path}/records.db' if request.param == 'sqlite' else request.getfixturevalue('postgres').url

def gif_bytes() -> bytes:
    b = io.BytesIO(); frames = [Image.open(p).convert('RGB').resize((64, 64)) for p in PHOTOS[:3]]
    frames[0].save(b, 'GIF', save_all=True, append_images=frames[1:], duration=100); return b.getvalue()

def test_every_prediction_route_records_once_and_takes_feedback(model, store_url):
    proc, url, log = start(model, f'serve.record_url={store_url}')
    ids = {}
    try:
        with httpx.Client(base_url=url, timeout=60) as c:
            answers = {'/predict': c.post('/predict', json={'image': b64(JPG)}),
                       '/predict/image': c.post('/predict/image', files={'file': ('a.jpg', JPG, 'image/jpeg')}),
                       '/predict/batch': c.post('/predict/batch', json={'images': [b64(p.read_bytes()) for p in PHOTOS[:3]]}),
                       '/predict/video': c.post('/predict/video', files={'file': ('clip.gif', gif_bytes(), 'image/gif')})}
            for route, r in answers.items():
                assert r.status_code == 200, (route, r.text)
                ids[route] = r.json().get('prediction_ids') or [r.json()['prediction_id']]
                assert r.headers['x-prediction-id'] == ','.join(ids[route]) and all(re.fullmatch('[0-9a-f]{32}', i) for i in ids[route])
            assert len(ids['/predict/batch']) == 3
            top = answers['/predict/image'].json()['predictions'][0]['class_name']
            other = next(l for l in c.get('/labels').json()['labels'] if l != top)
            with InferenceClient(url) as client:
                assert client.feedback(ids['/predict/image'][0], other) == {'prediction_id': ids['/predict/image'][0], 'label': other, 'predicted': top, 'correct': False, 'repeated': False}
                with pytest.raises(ClientError) as e: client.feedback(ids['/predict/image'][0], top)
                assert e.value.status == 409 and 'already has feedback' in e.value.message
            assert c.post('/feedback', json={'prediction_id': ids['/predict'][0], 'label': top}).status_code == 200
            for body, status in [({'prediction_id': 'f' * 32, 'label': top}, 404), ({'prediction_id': ids['/predict/batch'][0], 'label': 'juggling'}, 422),
                                 ({'prediction_id': ids['/predict/batch'][0]}, 422), ({'prediction_id': 'x', 'label': top, 'extra': 1}, 422),
                                 ({'prediction_id': 'x' * 65, 'label': top}, 422)]:
                r = c.post('/feedback', json=body)
                assert r.status_code == status and r.json()['status'] == status and r.json()['error'], (body, r.text)
            r = c.post('/feedback', content=b'prediction_id=x', headers={'content-type': 'application/x-www-form-urlencoded'})
            assert r.status_code == 415, r.text
    finally: assert stop(proc)
    df = PredictionStore(store_url).records()
    for route, pids in ids.items():
        rows = df[df.id.isin(pids)]
        assert len(rows) == len(pids) and set(rows.route) == {route}, (route, rows)
    video = df[df.id == ids['/predict/video'][0]].iloc[0]
    assert video.sha256 == __import__('hashlib').sha256(gif_bytes()).hexdigest()  # the upload is what is recorded, not its frames
    by_id = df.set_index('id')
    assert (by_id.correct[ids['/predict/image'][0]], by_id.truth[ids['/predict/image'][0]], by_id.correct[ids['/predict'][0]]) == (False, other, True)
    assert PredictionStore(store_url).records(images=True).image.isna().all()  # images are kept only with serve.record_images

def test_a_store_that_dies_mid_traffic_costs_no_prediction(model, postgres):
    proc, url, log = start(model, f'serve.record_url={postgres.url}')
    images = [p.read_bytes() for p in PHOTOS]
    try:
        assert load_test(url, images, n=60, concurrency=8)['errors'] == 0
        assert eventually(lambda: metric(url, 'clip_har_prediction_records_total{outcome="written"}') >= 60)
        postgres.ctl('stop', '-m', 'fast')
        down = load_test(url, images, n=120, concurrency=8)
        assert down['errors'] == 0 and down['statuses'] == {'200': 120}, down
        assert eventually(lambda: metric(url, 'clip_har_prediction_records_total{outcome="failed"}') > 0)
        postgres.ctl('start')
        written = metric(url, 'clip_har_prediction_records_total{outcome="written"}')
        assert load_test(url, images, n=40, concurrency=8)['errors'] == 0
        assert eventually(lambda: metric(url, 'clip_har_prediction_records_total{outcome="written"}') >= written + 40)
    finally: assert stop(proc)
    text = log.read_text()
    assert text.count('prediction records are not being written') == 1 and 'recording again after' in text, text[-3000:]

def test_drift_is_low_for_reference_traffic_and_high_for_one_class(model, tmp_path):
    pred = Predictor(model)
    probs = pred.scores(image_batch(PHOTOS, pred.preprocess).numpy())
    ref = monitor_reference(probs, pred.labels, 'test', file_sha256(model))
    (tmp_path/'reference.json').write_text(json.dumps(ref))
    top = probs.argmax(1)
    common = [p.read_bytes() for p, t in zip(PHOTOS, top) if t == np.bincount(top).argmax()]
    store = f'sqlite:///{tmp_path}/records.db'
    proc, url, _ = start(model, f'serve.record_url={store}', f'serve.reference={tmp_path}/reference.json', 'serve.monitor_window=135')
    try:
        assert load_test(url, [p.read_bytes() for p in PHOTOS], n=135, concurrency=1)['errors'] == 0  # each photo three times
        calm = metric(url, 'clip_har_drift_psi{signal="class"}'), metric(url, 'clip_har_drift_psi{signal="confidence"}')
        assert load_test(url, common, n=135, concurrency=4)['errors'] == 0
        shifted = metric(url, 'clip_har_drift_psi{signal="class"}')
    finally: assert stop(proc)
    print(f'class PSI {calm[0]:.4f} (confidence {calm[1]:.4f}) for reference traffic; {shifted:.2f} for one class only')
    assert calm[0] < 0.01 and calm[1] < 0.01 and shifted > 0.25  # 0.25: where the shipped alert fires
    r = clip_har('monitor', '--url', store, '--reference', tmp_path/'reference.json', '--since', 'all', '--json')
    rep = json.loads(r.stdout)
    assert r.returncode == 0 and rep['predictions'] == 270 and rep['class_psi'] > 0.1, r.stdout + r.stderr
    r = clip_har('monitor', '--url', store, '--since', 'all', '--plot', tmp_path/'monitor.png')
    assert r.returncode == 0 and 'predictions: 270' in r.stdout, r.stdout
    from PIL import Image
    assert Image.open(tmp_path/'monitor.png').size[0] >= 900  # the four plots

DRIFT_DESCRIPTION = __import__('yaml').safe_load((PROM/'alerts.yml').read_text())['groups'][0]['rules'][0]['annotations']['description']

def test_alert_rules_and_prometheus_config_pass_promtool():
    promtool = tool('promtool')
    for args in (['check', 'rules', PROM/'alerts.yml'], ['check', 'config', PROM/'prometheus.yml'], ['test', 'rules', PROM/'alerts.test.yml']):
        r = run(promtool, *args, cwd=PROM)
        assert r.returncode == 0, (args, r.stdout, r.stderr)
    assert 'SUCCESS' in r.stdout + r.stderr

def used_metrics() -> set:
    "The clip_har metric names the alert rules and the Grafana dashboard query (histograms and counters by their base name)."
    text = (PROM/'alerts.yml').read_text() + (ROOT/'docker'/'grafana'/'dashboards'/'clip-har.json').read_text()
    return {re.sub('_(bucket|sum|count|total)$', '', m) for m in re.findall(r'clip_har_[a-z_]+', text)}

def served_metrics(url:str) -> set:
    "The metric names a server's /metrics has samples of (by the same base names)."
    lines = [l for l in httpx.get(url + '/metrics').text.splitlines() if l and not l.startswith('#')]
    return {re.sub('_(bucket|sum|count|total|created)$', '', l.split('{')[0].split(' ')[0]) for l in lines}

def test_prometheus_sees_drift_move_and_the_rule_fires_on_that_series(model, tmp_path):
    promtool = tool('promtool')
    common = drift_reference(model, tmp_path, PHOTOS)
    proc, url, _ = start(model, f'serve.record_url=sqlite:///{tmp_path}/records.db', f'serve.reference={tmp_path}/reference.json', 'serve.monitor_window=90')
    prom, api = start_prometheus(tmp_path, {url.split('//')[1]: {}})
    def seen():
        try: res = httpx.get(api, params={'query': 'clip_har_drift_psi{signal="class"}'}, timeout=2).json()['data']['result']
        except (httpx.HTTPError, KeyError, ValueError): return None
        return float(res[0]['value'][1]) if res else None
    try:
        assert load_test(url, [p.read_bytes() for p in PHOTOS], n=90, concurrency=1)['errors'] == 0  # each photo twice: the reference
        calm = eventually(lambda: (v := seen()) is not None and v == v and (v, )) [0]  # a scrape after the traffic (not NaN)
        assert load_test(url, common, n=90, concurrency=4)['errors'] == 0
        shifted = eventually(lambda: (v := seen()) is not None and v > 0.25 and v)
        with httpx.Client(base_url=url) as c:  # one piece of feedback, so that every metric has a sample
            pid = c.post('/predict/image', files={'file': ('a.jpg', JPG, 'image/jpeg')}).json()['prediction_id']
            assert c.post('/feedback', json={'prediction_id': pid, 'label': c.get('/labels').json()['labels'][0]}).status_code == 200
        missing = used_metrics() - served_metrics(url)
    finally:
        prom.terminate(); prom.wait(30); assert stop(proc)
    print(f'Prometheus saw class PSI {calm:.4f} for reference traffic and {shifted:.2f} for one class only')
    assert calm < 0.05 and shifted > 0.25, (calm, shifted, (tmp_path/'prometheus.log').read_text()[-2000:])
    assert not missing, f'the alerts or the dashboard query metrics the server does not export: {missing}'
    calm, shifted = round(calm, 6), round(shifted, 6)  # the series as measured, replayed through promtool
    alert = {'exp_labels': {'severity': 'warning', 'instance': 'api:8000', 'signal': 'class'},
             'exp_annotations': {'summary': f'clip-har on api:8000: class drift, PSI {shifted:.2f} (> 0.25)', 'description': DRIFT_DESCRIPTION}}
    test = {'rule_files': [str(PROM/'alerts.yml')], 'evaluation_interval': '1m', 'tests': [{
        'interval': '1m', 'input_series': [{'series': 'clip_har_drift_psi{instance="api:8000", job="clip-har", signal="class"}', 'values': f'{calm}x14 {shifted}x20'}],
        'alert_rule_test': [{'eval_time': '14m', 'alertname': 'ClipHarPredictionDrift', 'exp_alerts': []},
                            {'eval_time': '30m', 'alertname': 'ClipHarPredictionDrift', 'exp_alerts': [alert]}]}]}
    (tmp_path/'measured.test.yml').write_text(json.dumps(test))  # JSON is YAML
    r = run(promtool, 'test', 'rules', tmp_path/'measured.test.yml')
    assert r.returncode == 0 and 'SUCCESS' in r.stdout + r.stderr, r.stdout + r.stderr

OLD_SCHEMA = ROOT/'tests'/'fixtures'/'store-schema-0001.postgresql.sql'  # the store as main made it before schema revisions

def old_store(postgres) -> str:
    "A PostgreSQL store built from the old schema, with three records and two pieces of feedback as the old service wrote them; its URL."
    import psycopg
    with psycopg.connect(f'host=127.0.0.1 port={postgres.port} user=clip dbname=postgres', autocommit=True) as admin:
        admin.execute('DROP DATABASE IF EXISTS old_store'); admin.execute('CREATE DATABASE old_store')
    labels = json.dumps(list(HAR_LABELS))
    rows = [(f'old{i}', 1000.0 + i, '/predict/image', TINY_MODEL, 'v-old', 'pytorch', labels, False, '["running"]', '[0.9]', 'running', 0.9, 'ab' * 32, 1234, 5.0)
            for i in range(3)]
    cols = 'id, ts, route, model, model_version, backend, label_set, open_vocabulary, labels, scores, predicted, confidence, sha256, bytes, latency_ms'
    with psycopg.connect(f'host=127.0.0.1 port={postgres.port} user=clip dbname=old_store') as db:
        db.execute(OLD_SCHEMA.read_text())
        for r in rows: db.execute(f'INSERT INTO predictions ({cols}) VALUES ({", ".join(["%s"] * len(r))})', r)
        for pid, ok in (('old0', True), ('old1', False)):
            db.execute('INSERT INTO feedback (prediction_id, ts, label, correct) VALUES (%s, %s, %s, %s)', (pid, 2000.0, 'running' if ok else 'sitting', ok))
    return postgres.url.rsplit('/', 1)[0] + '/old_store'

def test_todays_service_migrates_a_store_the_old_version_made(model, postgres, tmp_path):
    """In PostgreSQL (the store replicas share; 08b_monitor migrates SQLite): old records and feedback survive the migration to revision 0002,
    and today's service then records there (with request ids) and takes feedback, on its own answers and on the old ones."""
    import sqlalchemy as sa
    url = old_store(postgres)
    engine = sa.create_engine(url)
    def snapshot():
        with engine.connect() as c:
            return [tuple(r) for r in c.execute(sa.text('SELECT p.id, p.ts, p.predicted, p.model_version, f.label, f.correct FROM predictions p '
                                                        'LEFT JOIN feedback f ON f.prediction_id = p.id ORDER BY p.id'))]
    old = snapshot()
    proc, served, _ = start(model, f'serve.record_url={url}')
    try:
        with httpx.Client(base_url=served, timeout=60) as c:
            r = c.post('/predict/image', files={'file': ('a.jpg', JPG, 'image/jpeg')}, headers={'X-Request-ID': 'after-upgrade'})
            pid = r.json()['prediction_id']
            assert c.post('/feedback', json={'prediction_id': pid, 'label': r.json()['predictions'][0]['class_name']}).json()['correct'] is True
            assert c.post('/feedback', json={'prediction_id': 'old2', 'label': 'running'}).json()['correct'] is True  # an old record takes feedback too
    finally: assert stop(proc)
    with engine.connect() as c:
        assert c.execute(sa.text('SELECT version_num FROM alembic_version')).scalar() == '0002'
        assert c.execute(sa.text('SELECT request_id FROM predictions WHERE id = :i'), {'i': pid}).scalar() == 'after-upgrade'
    now = snapshot()
    assert [r for r in now if r[0].startswith('old') and r[0] != 'old2'] == [r for r in old if r[0] != 'old2'] and len(now) == len(old) + 1
    print(f'PostgreSQL: {len(old)} old rows intact after the migration; the new service wrote {len(now) - len(old)} record and 2 pieces of feedback')
    engine.dispose()
