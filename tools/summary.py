"""The summary `make test` prints at its end: seconds per phase (install, check, nbtest, docs, pytest) and the share of the CPUs each kept busy, the most disk
the run used above the installed environment, what it left in /tmp, and the 20 slowest tests, from the phase times the Makefile writes and pytest's JUnit XML; the last line is pytest's count.
Standard library only: it runs even when the install phase failed."""
import sys, xml.etree.ElementTree as ET
from pathlib import Path

def phases(folder: Path) -> list[tuple[str, float, int, float|None]]:
    "(phase, seconds, exit status, share of the CPUs busy or None) as the Makefile wrote them (busy and all CPU ticks of /proc/stat)."
    rows = []
    for line in (folder/'phases.tsv').read_text().splitlines() if (folder/'phases.tsv').exists() else []:
        name, ms, rc, *ticks = line.split('\t')
        busy, total = (int(t) for t in ticks) if len(ticks) == 2 else (0, 0)
        rows.append((name, int(ms) / 1000, int(rc), busy / total if total > 0 else None))
    return rows

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
    lines = ['', '## make test: the phases', '', '| phase | seconds | minutes | CPUs busy | result |', '|---|---:|---:|---:|---|']
    pct = lambda b: '' if b is None else f'{100 * b:.0f}%'
    lines += [f'| {n} | {s:.0f} | {s / 60:.1f} | {pct(b)} | {"ok" if rc == 0 else f"failed ({rc})"} |' for n, s, rc, b in rows]
    total = sum(s for _, s, *_ in rows)
    lines += [f'| **all** | **{total:.0f}** | **{total / 60:.1f}** | | |']
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
