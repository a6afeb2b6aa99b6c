"""Training through the real `clip-har train` command: learning, crash and resume, bad input, tracking, DDP and FSDP."""
import json, os, signal, socket, subprocess, time
from pathlib import Path
import pandas as pd
import pytest
import torch
from conftest import clip_har, clip_har_here, env, run, run_paths, prepare_real_images, BIN, ROOT

from clip_har.core import TINY_MODEL, fixtures_dir

SMOKE = ['--set', f'model.name={TINY_MODEL}', '--set', 'model.pretrained=null', '--set', 'device=cpu', '--set', 'track.backends=[]',
         '--set', 'train.patience=null', '--set', 'data.batch_size=16', '--set', 'train.label_smoothing=0']

def _stages(epochs, lr=1e-2): return ['--set', f'train.stages=[{{name: all, train: all, epochs: {epochs}, lr: {lr}}}]']

_paths = run_paths

@pytest.fixture(scope='module')
def prepared_har_mini(tmp_path_factory):
    "har-mini (or the fixtures) prepared once for this module: for learning, and for a run long enough to kill mid-epoch."
    return prepare_real_images(tmp_path_factory.mktemp('train'), fixture_test_pct=0.0)

@pytest.fixture(scope='module')
def prepared(tmp_path_factory):
    "The fixtures prepared once for this module: what a run records, refuses and saves does not need har-mini."
    return prepare_real_images(tmp_path_factory.mktemp('train-fixtures'), fixture_test_pct=0.0, har_mini=False)

def test_tiny_model_learns_on_har_mini(har_mini, prepared_har_mini):
    "3 epochs from random init on CPU: validation accuracy clearly above chance, training loss falls."
    prepared = prepared_har_mini
    r = clip_har('train', *_paths(prepared), *SMOKE, *_stages(3), '-q')
    assert r.returncode == 0, r.stderr
    s = json.loads(r.stdout.strip().splitlines()[-1])
    print(f"valid accuracy {s['valid_accuracy']:.3f} (chance {s['chance']:.3f}); train loss {s['first_train_loss']:.3f} -> {s['last_train_loss']:.3f}")
    assert s['valid_accuracy'] >= 2 * s['chance']
    assert s['last_train_loss'] < s['first_train_loss']
    out = prepared/'out'/'train'
    for f in ('model.pt', 'wise_ft.pt', 'wise_ft.png', 'history.csv', 'train_metrics.json', 'params.yaml', 'checkpoints/last.pt', 'checkpoints/best.pt'):
        assert (out/f).exists(), f
    assert len(pd.read_csv(out/'history.csv')) == 3

def _last(ckpt: Path) -> dict:
    return torch.load(ckpt, map_location='cpu', weights_only=True)

def test_sigkill_mid_run_then_resume(prepared_har_mini, tmp_path):
    "A run killed with SIGKILL resumes from its last checkpoint and ends with the planned number of batches."
    prepared = prepared_har_mini
    args = [BIN/'clip-har', 'train', *_paths(prepared), *SMOKE, *_stages(4, 3e-3), '--out', tmp_path/'run', '-q']
    proc = subprocess.Popen([str(a) for a in args], env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    ckpt = tmp_path/'run'/'checkpoints'/'last.pt'
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if ckpt.exists() and _last(ckpt)['epoch'] >= 1: break  # killed at once: in epoch 2 of 4, between checkpoints, on any machine's speed
        time.sleep(0.05)
    assert proc.poll() is None, 'the run ended before it could be killed'
    proc.send_signal(signal.SIGKILL); proc.wait()
    killed_at = _last(ckpt)
    assert 1 <= killed_at['epoch'] < 4
    per_epoch = killed_at['batches'] // killed_at['epoch']
    r = clip_har('train', *_paths(prepared), *SMOKE, *_stages(4, 3e-3), '--out', tmp_path/'run', '--resume', ckpt, '-q')
    assert r.returncode == 0, r.stderr
    final = _last(ckpt)
    assert final['batches'] == 4 * per_epoch and final['epoch'] == 4
    assert [h['stage_epoch'] for h in final['history']] == [1, 2, 3, 4]
    from clip_har.model import load_classifier
    model = load_classifier(tmp_path/'run'/'model.pt')
    assert model(torch.zeros(1, 3, 64, 64)).shape == (1, 15)

@pytest.mark.parametrize('extra, message', [
    (['--set', 'train.stages=[{name: a, train: all, epochs: 1, lr: 0}]'], "'train.stages.0.lr': Input should be greater than 0"),
    (['--set', 'train.stages=[{name: a, train: all, epochs: 1, lr: -1.0e-3}]'], "'train.stages.0.lr': Input should be greater than 0"),
    (['--set', 'train.stages=[{name: a, train: all, epochs: 0, lr: 1.0e-3}]'], "'train.stages.0.epochs': Input should be greater than 0"),
    (['--set', 'data.batch_size=100000'], 'batch size 100000 is larger than the'),
    (['--resume', '/no/such/last.pt'], 'no such checkpoint to resume from'),
    (['--set', 'train.precision=fp16'], 'precision fp16 needs a CUDA device'),
])
def test_train_bad_input(prepared, extra, message):
    r = clip_har_here('train', *_paths(prepared), *SMOKE, *extra, '-q')
    assert r.returncode == 2 and message in r.stderr, r.stderr
    assert 'Traceback' not in r.stderr

@pytest.fixture(scope='module')
def tracked_run(prepared, tmp_path_factory) -> Path:
    "A 2-epoch run of the fixtures recorded in a sqlite MLflow store (`mlflow.db`, the run in `ok/`): the tracking test reads it back, the resume test refuses its checkpoint for another label set."
    tmp = tmp_path_factory.mktemp('tracked')
    r = clip_har('train', *_paths(prepared), *SMOKE, *_stages(2), '--out', tmp/'ok', '--set', 'track.backends=[mlflow]',
                 '--set', f"track.mlflow_uri=sqlite:///{tmp/'mlflow.db'}", '--set', 'track.log_every=2', '-q')
    assert r.returncode == 0, r.stderr
    return tmp

def test_resume_from_a_foreign_checkpoint_is_refused(prepared, tracked_run, tmp_path):
    torch.save({'state_dict': {'w': torch.zeros(2)}}, tmp_path/'foreign.pt')
    r = clip_har_here('train', *_paths(prepared), *SMOKE, '--resume', tmp_path/'foreign.pt', '-q')
    assert r.returncode == 2 and 'not a clip_har training checkpoint' in r.stderr, r.stderr
    r = clip_har_here('train', *_paths(prepared), *SMOKE, '--set', 'data.labels=[eating, running]', '--resume', tracked_run/'ok'/'checkpoints'/'last.pt', '-q')
    assert r.returncode == 2 and 'made for another run: labels' in r.stderr, r.stderr

def _free_port() -> int:
    with socket.socket() as s: s.bind(('127.0.0.1', 0)); return s.getsockname()[1]

def test_mlflow_records_the_run_and_a_dead_server_does_not_stop_training(prepared, tracked_run, tmp_path):
    db = tracked_run/'mlflow.db'
    import mlflow
    client = mlflow.MlflowClient(f'sqlite:///{db}')
    runs = client.search_runs([client.get_experiment_by_name('clip_har').experiment_id])
    assert len(runs) == 1
    run_ = runs[0]
    assert run_.data.params['model.name'] == TINY_MODEL and 'train_loss' in run_.data.metrics and 'lr' in run_.data.metrics
    assert len(client.get_metric_history(run_.info.run_id, 'accuracy')) == 2
    steps = client.get_metric_history(run_.info.run_id, 'train_loss_step')  # every track.log_every (2) batches
    n_batches = json.loads((tracked_run/'ok'/'train_metrics.json').read_text())['batches']
    assert [m.step for m in steps] == list(range(2, n_batches + 1, 2))
    assert len(run_.data.tags['git_commit']) == 40 and len(run_.data.tags['manifest_sha256']) == 64
    assert {a.path for a in client.list_artifacts(run_.info.run_id)} >= {'model.pt', 'history.csv', 'wise_ft.png'}
    dead = f'http://127.0.0.1:{_free_port()}'
    r = clip_har('train', *_paths(prepared), *SMOKE, *_stages(1), '--out', tmp_path/'dead', '--set', 'track.backends=[mlflow]',
                 '--set', f'track.mlflow_uri={dead}', '-q', timeout=300)
    assert r.returncode == 0, r.stderr
    assert 'tracking failed (MLflow at ' in r.stderr and (tmp_path/'dead'/'model.pt').exists()

def _torchrun(prepared, out, mode, epochs=2, bs=None, lr=3e-3):
    bs = bs or 4  # the fixtures give each rank only 15 training images
    # no loader processes: Python 3.11.7 (this machine's) can deadlock a worker forked beside gloo's threads (gh-112275)
    return run(BIN/'torchrun', '--nproc_per_node', '2', '--master_port', str(_free_port()), BIN/'clip-har', 'train',
               *_paths(prepared), *SMOKE, *_stages(epochs, lr), '--set', f'train.distributed={mode}', '--set', f'data.batch_size={bs}',
               '--set', 'data.num_workers=0', '--out', out, '-q', timeout=900, OMP_NUM_THREADS='1')

def test_ddp_batch_larger_than_a_rank_shard_is_a_clear_error(prepared, tmp_path):
    n_train = (pd.read_csv(prepared/'data'/'prepared'/'manifest.csv').split == 'train').sum()
    r = _torchrun(prepared, tmp_path/'big', 'ddp', epochs=1, bs=n_train // 2 + 1)
    assert r.returncode != 0 and 'training images each of the 2 processes gets' in r.stderr, r.stderr[-2000:]

def test_ddp_two_cpu_processes(prepared, tmp_path):
    "DDP on 2 CPU processes (gloo): disjoint data shards, falling loss, identical weights on both ranks."
    epochs, lr = 4, 1e-2  # the 30 fixture images need several steps for a clear trend
    r = _torchrun(prepared, tmp_path/'ddp', 'ddp', epochs, lr=lr)
    assert r.returncode == 0, r.stderr[-3000:]
    ranks = [json.loads((tmp_path/'ddp'/f'rank{i}.json').read_text()) for i in (0, 1)]
    a, b = set(ranks[0]['train_indices_epoch1']), set(ranks[1]['train_indices_epoch1'])
    n_train = (pd.read_csv(prepared/'data'/'prepared'/'manifest.csv').split == 'train').sum()
    assert a and b and not (a & b) and len(a | b) >= n_train - 1
    assert ranks[0]['weights_sha256'] == ranks[1]['weights_sha256']
    m = json.loads((tmp_path/'ddp'/'train_metrics.json').read_text())
    assert m['world_size'] == 2 and m['distributed'] == 'ddp'
    assert m['last_train_loss'] < m['first_train_loss']

def test_fsdp_two_cpu_processes_saves_a_full_checkpoint(prepared, tmp_path):
    "FSDP (fully_shard) on 2 CPU processes: trains, and its checkpoint holds full weights that load in one process."
    r = _torchrun(prepared, tmp_path/'fsdp', 'fsdp', epochs=1)
    assert r.returncode == 0, r.stderr[-3000:]
    from clip_har.model import load_classifier
    from clip_har.train import read_train_checkpoint
    model = load_classifier(tmp_path/'fsdp'/'model.pt')
    assert model(torch.zeros(2, 3, 64, 64)).shape == (2, 15)
    ck = read_train_checkpoint(tmp_path/'fsdp'/'checkpoints'/'last.pt')
    assert ck['epoch'] == 1 and all(isinstance(v, torch.Tensor) and type(v).__name__ == 'Tensor' for v in ck['model'].values())
    m = json.loads((tmp_path/'fsdp'/'train_metrics.json').read_text())
    assert m['distributed'] == 'fsdp' and m['world_size'] == 2
    for i in (0, 1):  # every parameter was a DTensor shard while training
        rk = json.loads((tmp_path/'fsdp'/f'rank{i}.json').read_text())
        assert rk['sharded_params'] == rk['params'] > 0
