"""Shared helpers for the integration tests: they run the real `clip-har` command, papermill, DVC and chromium."""
import gc, os, shutil, signal, subprocess, sys, tempfile, time
from pathlib import Path
import pytest

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
OFFLINE = {'HF_HUB_OFFLINE': '1', 'HF_DATASETS_OFFLINE': '1', 'WANDB_MODE': 'offline'}
os.environ.update(OFFLINE)  # this process too: `clip_har_here` runs commands in it, and the Hub libraries read these at import

def env(**kw) -> dict:
    "The test environment: offline, with the venv's commands first on PATH."
    return {**os.environ, **OFFLINE, 'PATH': f"{BIN}:{os.environ.get('PATH', '')}", **kw}

def run(*args, cwd=ROOT, timeout=600, check=False, **kw) -> subprocess.CompletedProcess:
    "Run a command with the test environment; capture text output."
    r = subprocess.run([str(a) for a in args], cwd=cwd, env=env(**kw), capture_output=True, text=True, timeout=timeout)
    if check and r.returncode: raise AssertionError(f'{args} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}')
    return r

def clip_har(*args, **kw) -> subprocess.CompletedProcess:
    "Run the installed `clip-har` command."
    return run(BIN/'clip-har', *args, **kw)

def clip_har_here(*args, cwd=ROOT) -> subprocess.CompletedProcess:
    """`clip-har` run in this process: `clip_har.cli.main`, the function the installed command calls, with its output captured.
    For the many bad-input cases: the same parser, config, checks, message and exit status, without a new process's start-up
    (about 5 s of imports each); every command is also run as the installed one by the tests of what it does."""
    import contextlib, io, logging, traceback
    from clip_har.cli import main
    from clip_har.core import get_logger
    out, err, here = io.StringIO(), io.StringIO(), os.getcwd()
    log = get_logger(); level = log.level  # its handler made now, on the real stderr, so that it can be put back there
    streams = [(h, h.setStream(err)) for h in log.handlers if isinstance(h, logging.StreamHandler)]
    os.chdir(cwd)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try: code = main([str(a) for a in args])
            except SystemExit as e: code = e.code  # argparse's usage errors
            except Exception: traceback.print_exc(); code = 1  # what the interpreter would print, and its status
    finally:
        os.chdir(here); log.setLevel(level)
        for h, stream in streams: h.setStream(stream)
    return subprocess.CompletedProcess(['clip-har', *map(str, args)], code, out.getvalue(), err.getvalue())

@pytest.fixture(scope='session')
def har_mini() -> Path:
    "The 1,200-image har-mini set; the test skips when it is absent."
    from clip_har.core import har_mini_dir, HAR_MINI_MISSING
    p = har_mini_dir()
    if p is None: pytest.skip(HAR_MINI_MISSING)
    return p

@pytest.fixture(scope='session')
def chromium() -> str:
    "Debian's chromium; the test skips when it is not installed."
    exe = shutil.which('chromium') or shutil.which('chromium-browser')
    if exe is None: pytest.skip('no chromium on this machine (apt-get install chromium; .ci/run installs it in CI)')
    return exe

def run_paths(tmp) -> list[str]:
    "`--set` overrides that put a run's data, cache and outputs under `tmp`."
    return ['--set', f'paths.data_dir={tmp}/data', '--set', f'paths.cache_dir={tmp}/cache', '--set', f'paths.out_dir={tmp}/out']

def prepare_real_images(tmp, fixture_test_pct=0.34, har_mini=True) -> Path:
    """har-mini (without it, or with `har_mini=False`, the committed fixtures with a `fixture_test_pct` test split) prepared
    under `tmp`. Tests about what training learns need har-mini's 1,200 photos; tests about what a command writes, records
    or refuses are the same on the fixtures' 45, at a twentieth of the cost."""
    from clip_har.core import har_mini_dir, fixtures_dir
    source = (har_mini and har_mini_dir()) or fixtures_dir()
    extra = [] if source != fixtures_dir() else ['--set', 'data.valid_pct=0.34', '--set', f'data.test_pct={fixture_test_pct}']
    r = clip_har('prepare', *run_paths(tmp), '--set', f'data.source={source}', *extra, '-q')
    assert r.returncode == 0, r.stderr
    return tmp

def copy_checkout(dest: Path) -> Path:
    "A git repository at `dest` holding the files of this checkout that git tracks or would track."
    files = subprocess.run(['git', 'ls-files', '-co', '--exclude-standard'], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    for f in files:
        if (ROOT/f).is_file():
            (dest/f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT/f, dest/f)
    for cmd in (['git', 'init', '-q'], ['git', 'add', '-A'], ['git', '-c', 'user.name=t', '-c', 'user.email=t@t', 'commit', '-qm', 'copy']):
        subprocess.run(cmd, cwd=dest, check=True, capture_output=True)
    return dest

def start(model, *sets, workers=1, extra_env=None, timeout=120):
    "`clip-har serve` on a free port, recording beside the model unless `sets` say otherwise; (process, base URL, log) once /ready answers."
    import httpx
    from clip_har.serve import free_port
    port = free_port()
    args = [BIN/'clip-har', 'serve', '--model', model, '--port', str(port), '--workers', str(workers)]
    for s in sets: args += ['--set', s]
    if not any(s.startswith('serve.record') for s in sets):  # records beside the model, never in the checkout's outputs/
        args += ['--set', f'serve.record_url=sqlite:///{Path(model).parent}/records-{port}.db']
    log = open(Path(model).parent/f'serve-{port}.log', 'w')
    proc = subprocess.Popen([str(a) for a in args], env=env(**(extra_env or {})), stdout=log, stderr=subprocess.STDOUT)
    url, deadline = f'http://127.0.0.1:{port}', time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, Path(log.name).read_text()[-3000:]
        try:
            if httpx.get(url + '/ready', timeout=2).status_code == 200: return proc, url, Path(log.name)
        except httpx.HTTPError: pass
        time.sleep(0.2)
    proc.kill(); raise TimeoutError(Path(log.name).read_text()[-3000:])

def stop(proc) -> bool:
    "SIGTERM; whether the server shut down by itself (uvicorn re-raises the signal once it has drained: status -15)."
    proc.terminate()
    try: return proc.wait(30) in (0, -signal.SIGTERM)
    except subprocess.TimeoutExpired: proc.kill(); raise

## Two workers end together when the longest work starts first. xdist (`--dist loadfile --no-loadscope-reorder`) hands
## out files in this order and gives a worker its next file once two or fewer of its tests are left, so the rehearsal's
## `make run` (about 6.5 of the suite's 22 minutes of work) runs first on one worker, the demo pipeline's file first on the
## other, then the other files from the longest (seconds of work in a fresh-clone run) to the shortest, so that the last
## ones to start are short and neither worker waits long for the other at the end.
FIRST = ['test_rehearsal.py::test_make_run_unmodified_on_the_rehearsal_cache', 'test_rehearsal.py', 'test_pipeline.py',
         'test_train_cli.py', 'test_serve.py', 'test_evaluate_tracking.py', 'test_export_inference.py', 'test_monitor.py',
         'test_dashboard.py', 'test_release.py', 'test_pipeline_tools.py', 'test_model_cli.py', 'test_data_cli.py']

## Collecting the test files imports torch, fastai and MLflow into each worker: with the collector paused meanwhile and what
## they made frozen after (as `clip-har` does for its commands: `clip_har.core.frozen_imports`), the collections during the
## tests visit only what the tests make.
def pytest_collection(session): gc.disable()

def pytest_collection_finish(session): gc.freeze(); gc.enable()

def pytest_collection_modifyitems(items):
    def rank(item) -> int:
        return next((i for i, f in enumerate(FIRST) if f in (item.path.name, f'{item.path.name}::{item.name}')), len(FIRST))
    items.sort(key=rank)  # stable: the rest keep their order

PROM = ROOT/'docker'/'prometheus'

def eventually(f, timeout=30.0):
    "Poll `f` until it is truthy; its last value."
    deadline = time.time() + timeout
    while not (v := f()) and time.time() < deadline: time.sleep(0.1)
    return v

def tool(name:str) -> str:
    "A program from a Debian package (prometheus, promtool, redis-server); the test skips without it."
    exe = shutil.which(name)
    if exe is None: pytest.skip(f"no {name} here (apt-get install {'redis-server' if 'redis' in name else 'prometheus'}; .ci/run installs it in CI)")
    return exe

def drift_reference(model:Path, folder:Path, photos:list) -> list[bytes]:
    "Write the model's reference.json (its profile on `photos`) into `folder`; the photos of its most predicted class."
    import json, numpy as np
    from clip_har.core import file_sha256
    from clip_har.data import image_batch
    from clip_har.inference import Predictor
    from clip_har.metrics import monitor_reference
    pred = Predictor(model)
    probs = pred.scores(image_batch(photos, pred.preprocess).numpy())
    (folder/'reference.json').write_text(json.dumps(monitor_reference(probs, pred.labels, 'test', file_sha256(model))))
    top = probs.argmax(1)
    return [p.read_bytes() for p, t in zip(photos, top) if t == np.bincount(top).argmax()]

def start_prometheus(folder:Path, targets:dict):
    "A real Prometheus on loopback scraping each `host:port` in `targets` every second (with its labels) under clip-har's rules; (process, query URL)."
    import json
    from clip_har.serve import free_port
    port = free_port()
    static = [{'targets': [t], 'labels': labels} for t, labels in targets.items()]
    (folder/'prometheus.yml').write_text(json.dumps({'global': {'scrape_interval': '1s', 'evaluation_interval': '1s'}, 'rule_files': [str(PROM/'alerts.yml')],
                                                     'scrape_configs': [{'job_name': 'clip-har', 'static_configs': static}]}))  # JSON is YAML
    proc = subprocess.Popen([tool('prometheus'), f'--config.file={folder}/prometheus.yml', f'--storage.tsdb.path={folder}/tsdb',
                             f'--web.listen-address=127.0.0.1:{port}'], stdout=open(folder/'prometheus.log', 'w'), stderr=subprocess.STDOUT)
    return proc, f'http://127.0.0.1:{port}/api/v1/query'

class Postgres:
    "A throwaway PostgreSQL cluster of Debian's packages on a loopback port (run as the postgres user when we are root)."
    def __init__(self, bindir:Path):
        from clip_har.serve import free_port
        self.bindir, self.dir, self.port = bindir, Path(tempfile.mkdtemp(prefix='clip-har-pg-')), free_port()
        self.as_user = []
        if os.geteuid() == 0: shutil.chown(self.dir, 'postgres'); self.as_user = ['runuser', '-u', 'postgres', '--']
        run(*self.as_user, bindir/'initdb', '-D', self.dir/'data', '-U', 'clip', '--auth=trust', '-E', 'UTF8', check=True)
        self.url = f'postgresql+psycopg://clip@127.0.0.1:{self.port}/postgres'
    def ctl(self, *args):
        return run(*self.as_user, self.bindir/'pg_ctl', '-D', self.dir/'data', '-l', self.dir/'log', '-w',
                   '-o', f'-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1', *args, check=True)

@pytest.fixture(scope='module')
def postgres():
    "A real PostgreSQL server; the tests that need it skip where it is not installed."
    found = shutil.which('initdb') or next(iter(sorted(Path('/usr/lib/postgresql').glob('*/bin/initdb'))), None)
    if not found: pytest.skip('PostgreSQL is not installed here (apt-get install postgresql; .ci/run installs it in CI)')
    pg = Postgres(Path(found).resolve().parent)
    pg.ctl('start')
    yield pg
    pg.ctl('stop', '-m', 'immediate'); shutil.rmtree(pg.dir, ignore_errors=True)

