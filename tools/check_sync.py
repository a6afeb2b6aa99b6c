"""Fail when notebooks are unclean or out of sync with the package or README.

Runs nbdev's clean and export and the README render, and compares every notebook, module and the README before and
after: anything they change was committed (or left) out of sync. The files are left fixed, so a second run passes
once the change is committed. Works without git, on any checkout."""
import hashlib, subprocess, sys
from pathlib import Path

root = Path(__file__).resolve().parent.parent
bin_dir = Path(sys.executable).parent

def snapshot() -> dict:
    files = [*root.glob('nbs/**/*.ipynb'), *root.glob('clip_har/**/*.py'), root/'README.md']
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files
            if p.exists() and '.ipynb_checkpoints' not in p.parts}

def changed(before: dict, after: dict) -> list:
    return sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))

def main() -> int:
    problems = []
    steps = [('nbdev_clean', [str(bin_dir/'nbdev_clean')], 'notebooks were unclean (outputs, execution counts or metadata); commit the cleaned notebooks'),
             ('nbdev_export', [str(bin_dir/'nbdev_export')], 'the package was out of sync with the notebooks (edit notebooks, never clip_har/*.py); commit the export'),
             ('README', [sys.executable, str(root/'tools'/'readme.py')], 'README.md was out of sync with nbs/index.ipynb; commit the rendered README')]
    for name, cmd, why in steps:
        before = snapshot()
        subprocess.run(cmd, cwd=root, check=True, stdout=subprocess.DEVNULL)
        diff = changed(before, snapshot())
        if diff: problems.append(f'{name} changed {", ".join(diff)}: {why}')
    for p in problems: print(f'check_sync: {p}', file=sys.stderr)
    if not problems: print('check_sync: notebooks clean; package and README in sync')
    return 1 if problems else 0

if __name__ == '__main__': sys.exit(main())
