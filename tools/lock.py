"""requirements.lock: the exact versions `make install` installs, and the check that they meet settings.ini.

`python tools/lock.py write`  resolves settings.ini's requirements (every extra) with pip, installing nothing
                              (`pip install --dry-run --report`), and writes requirements.lock: one `name==version` a line.
`python tools/lock.py check`  after `pip install --no-deps -r requirements.lock`: every requirement of clip_har and of its
                              extras, and theirs in turn, is installed at a version it accepts; else it names what is
                              missing or wrong and says to run `make lock`.

`make install` installs the lock without resolving (pip's resolver took 13-18 s of a fresh install here), then checks it.
"""
import json, subprocess, sys
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent
LOCK = ROOT/'requirements.lock'
HEADER = """# The exact versions `make install` installs (pip install --no-deps -r requirements.lock), then checks against
# settings.ini's requirements (tools/lock.py check). After changing those requirements: `make lock` (pip resolves them again).
"""

def write() -> Path:
    "Resolve `.[dev]` (every extra) with pip, installing nothing, and write the pins to requirements.lock."
    out = subprocess.run([sys.executable, '-m', 'pip', 'install', '--dry-run', '--ignore-installed', '--quiet', '--report', '-', '-e', f'{ROOT}[dev]'],
                         capture_output=True, text=True, check=True).stdout
    pins = [(i['metadata']['name'], i['metadata']['version']) for i in json.loads(out)['install'] if canonicalize_name(i['metadata']['name']) != 'clip-har']
    LOCK.write_text(HEADER + ''.join(f'{n}=={v}\n' for n, v in sorted(pins, key=lambda p: canonicalize_name(p[0]))))
    return LOCK

def pinned() -> dict[str, str]:
    "requirements.lock's pins: canonical name -> version."
    return {canonicalize_name(n): v for n, v in (l.split('==') for l in LOCK.read_text().splitlines() if l and not l.startswith('#'))}

def unmet(root:str='clip_har', extras:set|None=None) -> list[str]:
    "What the installed environment lacks for `root` with `extras` (default: all of them), its requirements' and theirs in turn."
    extras = set(distribution(root).metadata.get_all('Provides-Extra') or []) if extras is None else extras
    todo, seen, problems = [(root, frozenset(extras), None)], set(), []
    while todo:
        name, want, needed_by = todo.pop()
        if (canonicalize_name(name), want) in seen: continue
        seen.add((canonicalize_name(name), want))
        try: dist = distribution(name)
        except PackageNotFoundError:
            problems.append(f'{name} (needed by {needed_by}) is not installed'); continue
        for r in map(Requirement, dist.requires or []):
            if r.marker and not any(r.marker.evaluate({'extra': e}) for e in (want or {''})): continue
            try: have = distribution(r.name).version
            except PackageNotFoundError:
                problems.append(f'{r} (needed by {dist.name}) is not installed'); continue
            if r.specifier and not r.specifier.contains(have, prereleases=True):
                problems.append(f'{r} (needed by {dist.name}): {have} is installed'); continue
            todo.append((r.name, frozenset(r.extras), dist.name))
    return sorted(set(problems))

if __name__ == '__main__':
    cmd = sys.argv[1] if len(sys.argv) > 1 else ''
    if cmd == 'write': print(f'wrote {write()}')
    elif cmd == 'check':
        problems = unmet()
        if problems:
            sys.exit('requirements.lock does not meet settings.ini\'s requirements:\n  ' + '\n  '.join(problems)
                     + '\nrun `make lock` (pip resolves settings.ini again and rewrites requirements.lock), then `make install`')
        print(f'requirements.lock meets every requirement of clip_har and its extras ({len(pinned())} pins)')
    else: sys.exit('usage: python tools/lock.py write|check')
