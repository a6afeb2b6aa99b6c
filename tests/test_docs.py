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
