"""The dashboard as users meet it: `clip-har dashboard` (Voila) on 127.0.0.1 driven by a real headless chromium (through
Playwright, on Debian's chromium binary), and the service's live webcam page fed by chromium's fake camera."""
import subprocess, time
from pathlib import Path

import httpx, pytest

from conftest import BIN, ROOT, env
from clip_har.core import TINY_MODEL, HAR_LABELS, fixtures_dir, har_mini_dir
from clip_har.serve import free_port

SHOTS = ROOT/'outputs'/'screenshots'

def wait_port(port, proc, log, timeout=120):
    "Until something listens on 127.0.0.1:port (Voila renders a page only once its kernel has run the notebook)."
    import socket
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, Path(log).read_text()[-3000:]
        with socket.socket() as s:
            if s.connect_ex(('127.0.0.1', port)) == 0: return
        time.sleep(0.3)
    raise TimeoutError(Path(log).read_text()[-3000:])

def wait_http(url, proc, log, timeout=180):
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, Path(log).read_text()[-3000:]
        try:
            if httpx.get(url, timeout=5).status_code == 200: return
        except httpx.HTTPError: pass
        time.sleep(0.5)
    raise TimeoutError(Path(log).read_text()[-3000:])

@pytest.fixture(scope='module')
def browser(chromium):
    "Headless chromium (Debian's) with a fake camera that needs no permission prompt."
    sync_api = pytest.importorskip('playwright.sync_api', reason='playwright is not installed (pip install playwright)')
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=chromium, args=['--no-sandbox', '--use-fake-device-for-media-stream',
                                                               '--use-fake-ui-for-media-stream', '--disable-gpu'])
        yield b
        b.close()

@pytest.fixture(scope='module')
def model(tmp_path_factory) -> Path:
    from clip_har.inference import random_classifier
    return random_classifier(TINY_MODEL, tmp_path_factory.mktemp('dash')/'out'/'train'/'model.pt')

def photo() -> Path:
    "A har-mini photo (a fixture photo without ../shared)."
    return sorted((har_mini_dir() or fixtures_dir()).rglob('*.jpg'))[7]

TOKEN = 'a-dashboard-token-for-the-test'

def test_beyond_loopback_the_dashboard_will_not_start_without_a_token():
    r = subprocess.run([str(BIN/'clip-har'), 'dashboard', '--host', '0.0.0.0', '--port', str(free_port())], cwd=ROOT,
                       env={k: v for k, v in env().items() if k != 'CLIP_HAR_DASHBOARD_TOKEN'}, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and 'Traceback' not in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and 'set CLIP_HAR_DASHBOARD_TOKEN' in r.stderr, r.stderr

def test_the_dashboard_in_chromium(browser, model, tmp_path):
    "Bound to every interface (reached here through 127.0.0.1): nothing without the token, everything with it."
    out = model.parent.parent
    port = free_port()
    log = tmp_path/'voila.log'
    proc = subprocess.Popen([str(BIN/'clip-har'), 'dashboard', '--host', '0.0.0.0', '--port', str(port), '--set', f'paths.out_dir={out}', '--set', 'track.backends=[]'],
                            cwd=ROOT, env=env(CLIP_HAR_DASHBOARD_TOKEN=TOKEN), stdout=open(log, 'w'), stderr=subprocess.STDOUT)
    try:
        url = f'http://127.0.0.1:{port}/'
        wait_port(port, proc, log)
        kernel = '0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0'
        for path in ('', 'api/kernels', f'api/kernels/{kernel}', f'api/kernels/{kernel}/channels', '?token=wrong'):
            r = httpx.get(url + path, timeout=60)
            assert r.status_code in (302, 401, 403) and '/login' in r.headers.get('location', '/login'), (path, r.status_code)
        assert TOKEN not in log.read_text()  # nor in the log
        page = browser.new_page(viewport={'width': 1280, 'height': 900})
        page.goto(url + f'?token={TOKEN}', timeout=180_000)
        page.wait_for_selector('.clip-har-model', timeout=180_000)
        assert TINY_MODEL in page.inner_text('.clip-har-model')
        def upload(path):  # as a user does: click the upload button, pick the file in the chooser
            with page.expect_file_chooser() as chooser: page.locator('.widget-upload').first.click()
            chooser.value.set_files(str(path))
        upload(photo())
        page.wait_for_selector('.clip-har-result', timeout=180_000)  # generous: CI runs on a busy machine
        result = page.locator('.clip-har-result').first
        assert result.get_attribute('data-label') in HAR_LABELS
        imgs = result.locator('img')
        assert imgs.count() == 2 and imgs.nth(0).get_attribute('src').startswith('data:image/jpeg') and imgs.nth(1).get_attribute('alt').startswith('chart')
        assert imgs.nth(1).evaluate('i => i.naturalWidth') > 200  # the chart is a real picture
        SHOTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(SHOTS/'dashboard_upload.png'))
        from PIL import Image
        shot = Image.open(SHOTS/'dashboard_upload.png')
        assert shot.size == (1280, 900) and len(shot.convert('L').getcolors(256)) > 50  # not a blank page
        # a non-image upload: a message in the page, and the app goes on working
        notes = tmp_path/'notes.txt'; notes.write_text('not a photo')
        upload(notes)
        page.wait_for_selector('.clip-har-error', timeout=180_000)  # generous: CI runs on a busy machine
        assert 'notes.txt: not a readable image' in page.inner_text('.clip-har-error')
        assert 'could not be read' in page.inner_text('.clip-har-message')
        upload(photo())
        page.wait_for_selector('.clip-har-result', timeout=180_000)  # generous: CI runs on a busy machine
        assert page.locator('.clip-har-error').count() == 0
        import psutil, zipfile
        tree = psutil.Process(proc.pid).children(recursive=True)  # voila and the page's kernel
        kernel = next(p for p in tree if 'ipykernel' in ' '.join(p.cmdline()))
        bomb = tmp_path/'bomb.zip'  # one member: 1 GiB of zeros, about 1 MB compressed
        with zipfile.ZipFile(bomb, 'w', zipfile.ZIP_DEFLATED) as z, z.open('zeros.png', 'w', force_zip64=True) as m:
            for _ in range(64): m.write(bytes(2**24))
        many = tmp_path/'many.zip'  # 100,000 tiny members (about 9 MB: under the upload limit)
        with zipfile.ZipFile(many, 'w') as z:
            for i in range(100_000): z.writestr(f'{i}.jpg', b'x')
        rss = kernel.memory_info().rss
        page.get_by_role('tab', name='Batch').click()
        for zip_file, message in ((bomb, 'zeros.png: 1,024 MB uncompressed; at most 50 MB a member'),
                                  (many, 'the zip has 100,000 members; at most 5,000 are read')):
            with page.expect_file_chooser() as chooser: page.locator('.widget-upload').nth(1).click()
            chooser.value.set_files(str(zip_file))
            page.wait_for_function(f"document.querySelector('.clip-har-message')?.innerText.includes('{zip_file.name}: ')", timeout=180_000)  # the kernel has the zip
            page.get_by_role('button', name='Predict all').click()
            page.wait_for_function(f"document.querySelector('.clip-har-message')?.innerText.includes({message!r})", timeout=180_000)  # generous: CI runs on a busy machine
            grew = kernel.memory_info().rss - rss
            assert grew < 100 * 2**20, f'the kernel grew by {grew / 2**20:.0f} MB with {zip_file.name}'
        page.close()
    finally:
        proc.terminate(); proc.wait(30)
    gone, alive = psutil.wait_procs(tree, timeout=15)
    assert not [p for p in alive if p.status() != psutil.STATUS_ZOMBIE], alive  # no kernel outlives the dashboard

def recorded_traffic(model:Path, store_url:str, out:Path) -> dict:
    "A store holding 6 hours of answers: 4 like the evaluation split, then 2 of one class only; and evaluate's reference."
    import hashlib, json, uuid
    import numpy as np
    from clip_har.metrics import REFERENCE_FILE, monitor_reference
    from clip_har.monitor import PredictionStore, prediction_record
    rng, labels = np.random.default_rng(0), list(HAR_LABELS)
    probs = rng.dirichlet(np.ones(len(labels)) * 0.3, 600)
    ref = monitor_reference(probs, labels, 'test', hashlib.sha256(model.read_bytes()).hexdigest())
    (out/'evaluate').mkdir(parents=True, exist_ok=True); (out/'evaluate'/REFERENCE_FILE).write_text(json.dumps(ref))
    now, rows = time.time(), []
    for i in range(600):
        p = probs[i] if i < 400 else np.eye(len(labels))[labels.index('running')] * 0.97
        top = [{'class_name': labels[j], 'score': float(p[j])} for j in np.argsort(-p)[:5]]
        rows.append(prediction_record(uuid.uuid4().hex, top, b'%d' % i, labels, False, TINY_MODEL, 'v', 'torch', '/predict/image', 20.0,
                                      ts=now - 6 * 3600 + i * 36))
    PredictionStore(store_url).write(rows)
    return ref

def test_feedback_and_monitoring_in_chromium(browser, model, tmp_path):
    "Was this right? under an answer stores the correction; the Monitoring tab plots the records and names the shift."
    import shutil
    from PIL import Image
    from clip_har.monitor import PredictionStore
    out = tmp_path/'out'; (out/'train').mkdir(parents=True)
    shutil.copy(model, out/'train'/'model.pt')
    store = f"sqlite:///{tmp_path/'records.db'}"
    recorded_traffic(out/'train'/'model.pt', store, out)
    port, log = free_port(), tmp_path/'voila.log'
    proc = subprocess.Popen([str(BIN/'clip-har'), 'dashboard', '--port', str(port), '--set', f'paths.out_dir={out}', '--set', 'track.backends=[]',
                             '--set', f'serve.record_url={store}'], cwd=ROOT, env=env(), stdout=open(log, 'w'), stderr=subprocess.STDOUT)
    try:
        wait_port(port, proc, log)
        page = browser.new_page(viewport={'width': 1280, 'height': 1000})
        page.goto(f'http://127.0.0.1:{port}/', timeout=180_000)
        page.wait_for_selector('.clip-har-model', timeout=180_000)
        with page.expect_file_chooser() as chooser: page.locator('.widget-upload').first.click()
        chooser.value.set_files(str(photo()))
        page.wait_for_selector('.clip-har-feedback', timeout=180_000)  # generous: CI runs on a busy machine
        predicted = page.locator('.clip-har-result').first.get_attribute('data-label')
        truth = next(l for l in HAR_LABELS if l != predicted)
        row = page.locator('.clip-har-feedback').first
        row.locator('select').select_option(label=truth)
        row.get_by_role('button', name='No, it is').click()
        page.wait_for_selector('.clip-har-feedback-done', timeout=180_000)
        assert page.locator('.clip-har-feedback-done').get_attribute('data-correct') == 'false'
        assert f'recorded as wrong (it is {truth})' in page.inner_text('.clip-har-feedback-done')
        assert row.get_by_role('button', name='Yes').is_disabled()  # one answer per prediction
        SHOTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(SHOTS/'dashboard_feedback.png'))
        df = PredictionStore(store).records()
        mine = df[df.route == 'dashboard']
        assert len(mine) == 1 and mine.iloc[0].truth == truth and mine.iloc[0].predicted == predicted and not mine.iloc[0].correct, mine
        page.get_by_role('tab', name='Monitoring').click()
        page.wait_for_selector('img[alt="monitoring plots"]', timeout=180_000)
        assert page.locator('img[alt="monitoring plots"]').evaluate('i => i.naturalWidth') >= 900  # a real picture
        psi = page.locator('.clip-har-psi[data-signal="classes"]')
        assert float(psi.get_attribute('data-psi')) > 0.25 and '(large shift)' in psi.inner_text(), psi.inner_text()
        assert '601 predictions' in page.inner_text('.clip-har-monitor') and page.inner_text('.clip-har-feedback-accuracy') == '0.000'
        assert f'<td>{predicted}</td><td>{truth}</td><td>1</td>' in page.inner_html('.clip-har-monitor')  # the correction, listed
        page.locator('.clip-har-monitor').scroll_into_view_if_needed()
        page.screenshot(path=str(SHOTS/'dashboard_monitoring.png'), full_page=True)
        shot = Image.open(SHOTS/'dashboard_monitoring.png')
        assert shot.size[0] == 1280 and len(shot.convert('L').getcolors(256)) > 50  # not a blank page
        page.close()
    finally:
        proc.terminate(); proc.wait(30)

def test_the_webcam_page_gets_predictions_from_the_fake_camera(browser, model, tmp_path):
    port = free_port()
    log = tmp_path/'serve.log'
    proc = subprocess.Popen([str(BIN/'clip-har'), 'serve', '--model', str(model), '--port', str(port)], cwd=tmp_path, env=env(),
                            stdout=open(log, 'w'), stderr=subprocess.STDOUT)
    try:
        url = f'http://127.0.0.1:{port}'
        wait_http(url + '/ready', proc, log)
        page = browser.new_page(viewport={'width': 900, 'height': 520})
        page.goto(url + '/app')
        page.wait_for_function('Number(document.body.dataset.frames || 0) >= 3', timeout=180_000)  # generous: CI runs on a busy machine
        labels = page.locator('#top li').evaluate_all('els => els.map(e => e.dataset.label)')
        assert len(labels) == 5 and set(labels) <= set(HAR_LABELS), labels
        assert 'frames' in page.inner_text('#status')
        SHOTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(SHOTS/'webcam.png'))
        page.close()
        frames = [l for l in log.read_text().splitlines() if '"/predict/image"' in l and '"status": 200' in l]
        assert len(frames) >= 3  # the frames reached the model over HTTP
    finally:
        proc.terminate(); proc.wait(30)

def test_a_zip_of_100000_members_is_refused_from_its_directory():
    "The member count comes from the end-of-directory record: refused before the 100,000 entries are parsed or read."
    import io, zipfile, psutil
    from clip_har.dashboard import InputRefused, read_inputs
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, 'w') as z:
        for i in range(100_000): z.writestr(f'{i:06d}.jpg', b'x')
    data = buf.getvalue()
    rss = psutil.Process().memory_info().rss
    with pytest.raises(InputRefused, match='the zip has 100,000 members; at most 5,000 are read'): read_inputs(data)
    assert psutil.Process().memory_info().rss - rss < 100 * 2**20
