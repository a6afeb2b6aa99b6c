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

def test_the_dashboard_in_chromium(browser, model, tmp_path):
    out = model.parent.parent
    port = free_port()
    log = tmp_path/'voila.log'
    proc = subprocess.Popen([str(BIN/'clip-har'), 'dashboard', '--port', str(port), '--set', f'paths.out_dir={out}', '--set', 'track.backends=[]'],
                            cwd=ROOT, env=env(), stdout=open(log, 'w'), stderr=subprocess.STDOUT)
    try:
        url = f'http://127.0.0.1:{port}/'
        wait_port(port, proc, log)
        page = browser.new_page(viewport={'width': 1280, 'height': 900})
        page.goto(url, timeout=180_000)
        page.wait_for_selector('.clip-har-model', timeout=180_000)
        assert TINY_MODEL in page.inner_text('.clip-har-model')
        def upload(path):  # as a user does: click the upload button, pick the file in the chooser
            with page.expect_file_chooser() as chooser: page.locator('.widget-upload').first.click()
            chooser.value.set_files(str(path))
        upload(photo())
        page.wait_for_selector('.clip-har-result', timeout=60_000)
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
        page.wait_for_selector('.clip-har-error', timeout=60_000)
        assert 'notes.txt: not a readable image' in page.inner_text('.clip-har-error')
        assert 'could not be read' in page.inner_text('.clip-har-message')
        upload(photo())
        page.wait_for_selector('.clip-har-result', timeout=60_000)
        assert page.locator('.clip-har-error').count() == 0
        page.close()
        import psutil
        tree = psutil.Process(proc.pid).children(recursive=True)  # voila and the page's kernel
        assert any('ipykernel' in ' '.join(p.cmdline()) for p in tree)
    finally:
        proc.terminate(); proc.wait(30)
    gone, alive = psutil.wait_procs(tree, timeout=15)
    assert not [p for p in alive if p.status() != psutil.STATUS_ZOMBIE], alive  # no kernel outlives the dashboard

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
        page.wait_for_function('Number(document.body.dataset.frames || 0) >= 3', timeout=60_000)
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
