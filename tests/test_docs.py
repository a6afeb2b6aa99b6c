"""The docs site, as a person sees it: headless chromium renders the data page built by `make docs`."""
import subprocess, tempfile
from pathlib import Path
import pytest
from conftest import ROOT

DOCS = ROOT/'_docs'

@pytest.fixture(scope='module')
def data_page():
    page = DOCS/'01_data.html'
    if not page.exists(): pytest.skip('no built docs: run `make docs` first (`make test` builds them before the tests)')
    return page

def _chromium(exe, *args):
    profile = tempfile.mkdtemp()
    return subprocess.run([exe, '--headless', '--no-sandbox', '--disable-gpu', '--disable-background-networking',
                           '--disable-component-update', '--disable-sync', '--no-first-run', f'--user-data-dir={profile}', *args],
                          capture_output=True, text=True, timeout=120)

def test_data_page_renders_prose_and_api_docs(chromium, data_page):
    "The rendered data page holds the notebook's prose, its API docs (signature and docments table) and its plots."
    dom = _chromium(chromium, '--dump-dom', data_page.as_uri()).stdout
    assert 'Every source becomes the same' in dom  # prose
    assert 'id="read_image_folder"' in dom and 'The items table of an image folder.' in dom  # show_doc heading, docstring
    assert 'har_dataloaders' in dom and 'shuffling seed' in dom  # a signature with its docments comments
    out = ROOT/'outputs'/'screenshots'; out.mkdir(parents=True, exist_ok=True)
    shot = out/'docs_data_page.png'
    r = _chromium(chromium, f'--screenshot={shot}', '--window-size=1280,2400', '--hide-scrollbars', data_page.as_uri())
    assert shot.exists() and shot.stat().st_size > 50_000, r.stderr

def test_every_module_has_a_page(data_page):
    notebooks = sorted(p.stem for p in (ROOT/'nbs').glob('*.ipynb'))
    assert len(notebooks) >= 14 and 'index' in notebooks
    missing = [name for name in notebooks if not (DOCS/f'{name}.html').exists()]
    assert not missing, f'notebooks without a page: {missing}'

IMPLEMENTATION_WORDS = ('autocast', 'torch.compile', 'PatchDropout', 'patch_dropout', 'WiSE-FT', 'QuickGELU', 'FLIP', 'papermill kernel')

def test_the_readme_first_screen_is_for_a_newcomer():
    "The first 40 lines: what it does, a picture, the two commands with what they leave and how long they take; no implementation notes."
    head = '\n'.join((ROOT/'README.md').read_text().splitlines()[:40])
    pictures = [line for line in head.splitlines() if line.startswith('![')]
    assert len(pictures) == 1 and (ROOT/pictures[0].split('](')[1].rstrip(')')).is_file(), pictures
    assert 'make run' in head and 'make test' in head and 'what it leaves behind' in head
    assert head.count(' min') >= 3 and 'on a GPU' in head and 'estimate' in head
    assert not [w for w in IMPLEMENTATION_WORDS if w in head], [w for w in IMPLEMENTATION_WORDS if w in head]

def test_the_index_page_fits_1280_px(chromium):
    "In chromium 1280 px wide, the docs index does not scroll sideways and shows the two commands whole (a screenshot is kept)."
    page_file = DOCS/'index.html'
    if not page_file.exists(): pytest.skip('no built docs: run `make docs` first (`make test` builds them before the tests)')
    sync_api = pytest.importorskip('playwright.sync_api', reason='playwright is not installed (pip install playwright)')
    out = ROOT/'outputs'/'screenshots'; out.mkdir(parents=True, exist_ok=True)
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=['--no-sandbox', '--disable-gpu'])
        try:
            page = browser.new_page(viewport={'width': 1280, 'height': 900})
            page.goto(page_file.as_uri())
            page.screenshot(path=str(out/'docs_index.png'))
            width = page.evaluate('() => [document.documentElement.scrollWidth, window.innerWidth]')
            commands = page.locator('pre', has_text='make test').first
            code = commands.evaluate('e => [e.scrollWidth, e.clientWidth, e.getBoundingClientRect().right]')
            picture = page.locator('img[src*="dashboard"]').first.evaluate('i => [i.naturalWidth, i.getBoundingClientRect().right]')
        finally: browser.close()
    assert width[0] <= width[1], f'the page is {width[0]} px wide in a {width[1]} px window'
    assert code[0] <= code[1] and code[2] <= 1280, f'the two commands are cut: {code[0]} px of code in a {code[1]} px block'
    assert picture[0] > 1000 and picture[1] <= 1280, picture

def test_the_release_flow_picture_renders(chromium):
    "The pipeline page shows the release flow (stable, canary, analysis, promote or roll back) as a picture, drawn by chromium."
    page = DOCS/'11_pipeline.html'
    if not page.exists(): pytest.skip('no built docs: run `make docs` first (`make test` builds them before the tests)')
    dom = _chromium(chromium, '--dump-dom', page.as_uri()).stdout
    assert 'release-flow.svg' in dom and (DOCS/'images'/'release-flow.svg').exists()
    svg = (DOCS/'images'/'release-flow.svg').read_text()
    assert all(w in svg for w in ('track=stable', 'track=canary', 'Analysis', 'Promote', 'Roll back'))
    shot = ROOT/'outputs'/'screenshots'/'release_flow.png'; shot.parent.mkdir(parents=True, exist_ok=True)
    _chromium(chromium, f'--screenshot={shot}', '--window-size=1000,340', (DOCS/'images'/'release-flow.svg').as_uri())
    from PIL import Image
    import numpy as np
    px = np.asarray(Image.open(shot).convert('RGB')).astype(int)
    green = ((px[..., 1] - px[..., 0]) > 8).mean(); red = ((px[..., 0] - px[..., 1]) > 8).mean()
    assert green > 0.005 and red > 0.005, (green, red)  # the promote and roll-back boxes were drawn
