"""The summary `make test` prints at its end: for each phase (install, check, then nbtest, docs and pytest side by side) its
start, its seconds and the share of the CPUs busy while it ran; the whole run's wall time; the most disk the run used above
the installed environment; what it left in /tmp; and the 20 slowest tests. It reads the phase times the Makefile writes and
pytest's JUnit XML; its last line is pytest's count. Standard library only: it runs even when the install phase failed."""
import sys, xml.etree.ElementTree as ET
from pathlib import Path

ORDER = ['install', 'check', 'nbtest', 'docs', 'pytest']

def phases(folder: Path) -> list[tuple[str, float, int, float|None, float|None]]:
    """(phase, seconds, exit status, share of the CPUs busy or None, seconds from the run's start or None) as the Makefile wrote
    them (busy and all CPU ticks of /proc/stat, then the start offset in ms), in the order of `ORDER`."""
    rows = []
    for line in (folder/'phases.tsv').read_text().splitlines() if (folder/'phases.tsv').exists() else []:
        name, ms, rc, *rest = line.split('\t')
        busy, total = (int(t) for t in rest[:2]) if len(rest) >= 2 else (0, 0)
        rows.append((name, int(ms) / 1000, int(rc), busy / total if total > 0 else None, int(rest[2]) / 1000 if len(rest) >= 3 else None))
    return sorted(rows, key=lambda r: ORDER.index(r[0]) if r[0] in ORDER else len(ORDER))

def wall_seconds(rows) -> float:
    "The whole run's wall time: from the first phase's start to the last one's end (phases overlap), or their sum without start times."
    if rows and all(r[4] is not None for r in rows): return max(r[4] + r[1] for r in rows) - min(r[4] for r in rows)
    return sum(r[1] for r in rows)

def tests(folder: Path) -> list[tuple[float, str, str]]:
    "(seconds, test id, outcome) of every test in pytest's JUnit XML."
    f = folder/'pytest.xml'
    if not f.exists(): return []
    out = []
    for case in ET.parse(f).getroot().iter('testcase'):
        outcome = next((c.tag for c in case if c.tag in ('failure', 'error', 'skipped')), 'passed')
        out.append((float(case.get('time') or 0), f"{case.get('classname', '')}::{case.get('name', '')}", outcome))
    return out

def left_in_tmp(folder: Path) -> list[str]|None:
    "Names in /tmp after the run that were not there before it (None when the lists are missing)."
    before, after = folder/'tmp-before.txt', folder/'tmp-after.txt'
    if not (before.exists() and after.exists()): return None
    return sorted(set(after.read_text().split('\n')) - set(before.read_text().split('\n')) - {''})

def peak_disk_gb(folder: Path) -> float|None:
    "The most disk in use during the run above what was in use once the install phase ended, in GB (None without samples)."
    base, samples = folder/'disk-base-kb.txt', folder/'disk-kb.txt'
    if not (base.exists() and samples.exists()): return None
    start = int(base.read_text().split()[0])
    return max([0, *(int(u) - start for u in samples.read_text().split() if u.isdigit())]) / 2**20

def summary(folder: Path, slowest: int = 20) -> str:
    "The phase table, what the run left in /tmp, the slowest tests and pytest's count, as markdown."
    rows, cases, left = phases(folder), tests(folder), left_in_tmp(folder)
    lines = ['', '## make test: the phases', '', '| phase | started at (s) | seconds | minutes | CPUs busy | result |', '|---|---:|---:|---:|---:|---|']
    pct = lambda b: '' if b is None else f'{100 * b:.0f}%'
    at = lambda t: '' if t is None else f'{t:.0f}'
    lines += [f'| {n} | {at(t0)} | {s:.0f} | {s / 60:.1f} | {pct(b)} | {"ok" if rc == 0 else f"failed ({rc})"} |' for n, s, rc, b, t0 in rows]
    total = wall_seconds(rows)
    lines += [f'| **all** (wall) | | **{total:.0f}** | **{total / 60:.1f}** | | |']
    if sum(r[0] in ('nbtest', 'docs', 'pytest') for r in rows) > 1:
        lines += ['', 'nbtest, docs and pytest run side by side: each CPUs-busy share is of the whole machine while that phase ran.']
    disk = peak_disk_gb(folder)
    if disk is not None: lines += ['', f'Peak disk in use above the installed environment: {disk:.1f} GB (sampled every 2 s)']
    if left is not None:
        lines += ['', f"Left in /tmp by the run (or by anything else meanwhile): {len(left)}" + (f": {', '.join(left[:10])}" if left else '')]
    if cases:
        lines += ['', f'## The {min(slowest, len(cases))} slowest tests (setup, call and teardown)', '', '| seconds | test | outcome |', '|---:|---|---|']
        lines += [f'| {t:.1f} | {name} | {outcome} |' for t, name, outcome in sorted(cases, reverse=True)[:slowest]]
        n = {k: sum(o == k for *_, o in cases) for k in ('passed', 'failure', 'error', 'skipped')}
        lines += ['', f"pytest: {n['passed']} passed, {n['failure'] + n['error']} failed, {n['skipped']} skipped"]
    return '\n'.join(lines)

if __name__ == '__main__':
    print(summary(Path(sys.argv[1] if len(sys.argv) > 1 else 'outputs/test-run')))
