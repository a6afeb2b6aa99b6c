"""The package's shape: notebook order is import order, functions stay short, no code written twice (tools/structure.py measures)."""
import shutil, subprocess, sys
from pathlib import Path
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT/'tools'))
import structure

def test_every_module_comes_from_one_numbered_notebook():
    order = structure.module_order()
    exported = {p.stem for p in (ROOT/'clip_har').glob('*.py') if not p.name.startswith('_')}
    assert set(order) == exported, (sorted(order), sorted(exported))

def test_no_module_imports_a_later_one():
    "Module-level and function-level imports alike: a module imports only from notebooks before it."
    assert structure.backward_imports() == []

def test_the_import_check_can_fail(tmp_path, monkeypatch):
    "The check sees an import inside a function of a later module (here: core importing serve)."
    pkg = tmp_path/'clip_har'; pkg.mkdir()
    (pkg/'core.py').write_text('def f():\n    from clip_har.serve import create_app\n    return create_app\n')
    (pkg/'serve.py').write_text('from .core import *\n')
    monkeypatch.setattr(structure, 'PKG', pkg)
    monkeypatch.setattr(structure, 'module_order', lambda: {'core': 0, 'serve': 9})
    assert structure.backward_imports() == ['clip_har/core.py:2 imports serve (notebook 09 >= 00)']

def test_no_function_longer_than_60_lines():
    long = [(n, name) for n, name in structure.function_lengths() if n > 60]
    assert not long, f'functions over 60 lines: {long}'

@pytest.mark.skipif(shutil.which('duplicates') is None, reason='the `duplicates` command (the tool library) is not on this machine')
def test_no_duplicated_blocks_in_the_package():
    "No two places in clip_har/ share six or more lines of the same shape (data tables and the generated index aside)."
    r = subprocess.run(['duplicates', '--repo', str(ROOT/'clip_har'), '--most', '50'], capture_output=True, text=True, timeout=120)
    rows = [l for l in r.stdout.splitlines() if l.startswith('D') and '_modidx.py' not in l and 'boilerplate' not in l]
    assert not rows, r.stdout

def test_the_make_test_summary_counts_what_ran(tmp_path):
    "tools/summary.py: the phases in order with their start, CPU share and the run's wall time (phases overlap), the slowest tests first, and pytest's count as its last line."
    import summary as ts
    (tmp_path/'phases.tsv').write_text('install\t1500\t0\t150\t300\t0\ncheck\t2500\t0\n'  # check: no CPU ticks, no start
                                       'pytest\t60000\t1\t11760\t12000\t4000\nnbtest\t30000\t0\t5000\t6000\t4000\n')  # side by side, written as they end
    (tmp_path/'pytest.xml').write_text('<testsuites><testsuite>'
        '<testcase classname="tests.a" name="fast" time="0.5"/><testcase classname="tests.a" name="slow" time="42.0"><failure message="x"/></testcase>'
        '<testcase classname="tests.b" name="skip" time="0.0"><skipped/></testcase></testsuite></testsuites>')
    (tmp_path/'tmp-before.txt').write_text('a\nb\n'); (tmp_path/'tmp-after.txt').write_text('a\nb\ntmpx1wandb-media\n')
    (tmp_path/'disk-base-kb.txt').write_text('1048576\n'); (tmp_path/'disk-kb.txt').write_text('524288\n1048576\n4194304\n2097152\n')
    text = ts.summary(tmp_path, slowest=2)
    assert 'Peak disk in use above the installed environment: 3.0 GB' in text
    assert 'Left in /tmp by the run (or by anything else meanwhile): 1: tmpx1wandb-media' in text
    assert '| install | 0 | 2 | 0.0 | 50% | ok |' in text and '| check |  | 2 | 0.0 |  | ok |' in text and '| pytest | 4 | 60 | 1.0 | 98% | failed (1) |' in text
    assert text.index('| nbtest |') < text.index('| pytest |')  # in the phases' order, not the order they ended
    assert '| **all** (wall) | | **94** |' in text  # without every start time: the sum
    (tmp_path/'phases.tsv').write_text('install\t1500\t0\t150\t300\t0\ncheck\t2500\t0\t1\t2\t1500\npytest\t60000\t1\t11760\t12000\t4000\nnbtest\t30000\t0\t5000\t6000\t4000\n')
    text = ts.summary(tmp_path, slowest=2)
    assert '| **all** (wall) | | **64** |' in text and 'side by side' in text  # from install's start to pytest's end
    rows = [l for l in text.splitlines() if l.startswith('| 42.0') or l.startswith('| 0.5') or l.startswith('| 0.0')]
    assert rows == ['| 42.0 | tests.a::slow | failure |', '| 0.5 | tests.a::fast | passed |'], rows
    assert text.splitlines()[-1] == 'pytest: 1 passed, 1 failed, 1 skipped'

def test_the_lock_meets_every_requirement_and_the_check_can_fail(tmp_path, monkeypatch):
    "tools/lock.py: requirements.lock pins every requirement of clip_har and its extras (and theirs) at a version they accept; a distribution whose requirement is missing, or installed at a version it refuses, is named."
    import lock
    pins = set(lock.pinned())
    assert {'torch', 'open-clip-torch', 'mlflow', 'psycopg-binary', 'nbdev'} <= pins  # psycopg-binary: an extra's extra (psycopg[binary])
    assert lock.unmet() == []
    info = tmp_path/'stale_example-1.0.dist-info'; info.mkdir()
    (info/'METADATA').write_text('Metadata-Version: 2.1\nName: stale-example\nVersion: 1.0\nProvides-Extra: more\n'
                                 'Requires-Dist: torch<2\nRequires-Dist: not-in-the-lock-example\nRequires-Dist: tabulate>99; extra == "more"\n')
    monkeypatch.syspath_prepend(str(tmp_path))
    assert lock.unmet('stale-example', set()) == ['not-in-the-lock-example (needed by stale-example) is not installed',
                                                  f"torch<2 (needed by stale-example): {lock.distribution('torch').version} is installed"]
    assert len(lock.unmet('stale-example')) == 3  # with its extra `more`: tabulate>99 too
