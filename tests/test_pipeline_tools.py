"""The project's machinery, run for real: the `papermill` command on stage notebooks with its own parameters (the train and
evaluate notebooks run under papermill in the demo pipeline: test_pipeline.py) and the notebook sync guard."""
import json, subprocess, sys
from pathlib import Path
import nbformat
import pandas as pd
from conftest import run, copy_checkout, ROOT, BIN

from clip_har.core import fixtures_dir

def _papermill(tmp_path, name, *args) -> list[dict]:
    """Run `nbs/<name>.ipynb` as a stage runs it (its tests left out: `nbdev_test` runs those) with the `papermill` command
    and `args`; return the outputs of its code cells."""
    from clip_har.pipeline import stage_notebook
    stage_nb, out_nb = tmp_path/f'{name}.ipynb', tmp_path/f'{name}.out.ipynb'
    nbformat.write(stage_notebook(ROOT/'nbs'/f'{name}.ipynb'), stage_nb)
    run(BIN/'papermill', stage_nb, out_nb, *args, '--cwd', ROOT/'nbs', '-k', 'python3', check=True, timeout=900)
    nb = nbformat.read(out_nb, as_version=4)
    assert any('injected-parameters' in c.metadata.get('tags', []) for c in nb.cells)
    return [o for c in nb.cells if c.cell_type == 'code' for o in c.get('outputs', [])]

def test_papermill_runs_the_data_notebook_with_parameters(tmp_path):
    "The data notebook runs headless under papermill with injected parameters and leaves its manifest."
    outputs = _papermill(tmp_path, '01_data', '-p', 'source', str(fixtures_dir()/'train'),
                         '-p', 'out_dir', str(tmp_path/'prepared'), '-y', 'overrides: {data.valid_pct: 0.5, data.test_pct: 0.0}')
    m = pd.read_csv(tmp_path/'prepared'/'manifest.csv')
    assert len(m) == 30 and m.split.value_counts().to_dict() == {'train': 15, 'valid': 15}
    shown = json.dumps(outputs)
    assert 'Data validation' in shown and 'image/png' in shown

def _guard(repo: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, repo/'tools'/'check_sync.py'], cwd=repo, capture_output=True, text=True)

def test_sync_guard_catches_unexported_and_unclean_notebooks(tmp_path):
    "The check `make test` runs fails on a notebook edited without export, and on one saved with outputs."
    repo = copy_checkout(tmp_path/'repo')
    ok = _guard(repo)
    assert ok.returncode == 0, ok.stderr
    nb_path = repo/'nbs'/'00_core.ipynb'
    nb = nbformat.read(nb_path, as_version=4)
    cell = next(c for c in nb.cells if c.source.startswith('#| export') and 'HAR_LABELS = ' in c.source)
    cell.source += "\nEXTRA_CONSTANT = 1"
    nbformat.write(nb, nb_path)
    r = _guard(repo)
    assert r.returncode == 1 and 'nbdev_export changed clip_har/core.py' in r.stderr, r.stderr
    assert _guard(repo).returncode == 0  # the export fixed it; committing it is the user's move
    nb = nbformat.read(nb_path, as_version=4)
    code = next(c for c in nb.cells if c.cell_type == 'code' and 'test_eq(len(HAR_LABELS)' in c.source)
    code.outputs = [nbformat.v4.new_output('stream', name='stdout', text='leftover output\n')]
    code.execution_count = 3
    nbformat.write(nb, nb_path)
    r = _guard(repo)
    assert r.returncode == 1 and 'nbdev_clean changed nbs/00_core.ipynb' in r.stderr, r.stderr

def test_papermill_runs_the_model_notebook_as_a_zeroshot_stage(tmp_path):
    "The model notebook's stage section scores the tiny model on a prepared split and writes its metrics."
    outputs = _papermill(tmp_path, '03_model', '-p', 'split', 'valid', '-p', 'out_dir', str(tmp_path/'zs'))
    m = json.loads((tmp_path/'zs'/'metrics.json').read_text())
    assert m['split'] == 'valid' and m['smoke_run'] is True and m['n'] > 0
    shown = json.dumps(outputs)
    assert 'zero-shot on' in shown and 'image/png' in shown
