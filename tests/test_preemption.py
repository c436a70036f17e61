"""Training runs that stop and start again: SIGUSR1 / SIGTERM save a state and exit 0, a resumed run
repeats the tick and snapshot schedule of the uninterrupted one, file names never collide, and two
runs started together never share a run folder."""

import json
import multiprocessing
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest
import torch

import dnnlib
import train
from torch_utils import checkpoint
from training import snapshot as snapshot_io
from training import training_loop as tl

TINY_NET = dict(img_resolution=8, img_channels=1, max_blockn=1, max_outputk=8, max_channels=8)

def _loop_kwargs(run_dir, **overrides):
    kwargs = dict(
        run_dir=str(run_dir),
        dataset_kwargs=dnnlib.EasyDict(class_name='training.dataset.DigitsDataset', resolution=8, max_size=200),
        data_loader_kwargs=dnnlib.EasyDict(num_workers=0),
        network_kwargs=dnnlib.EasyDict(class_name='training.networks.DDNGenerator', **TINY_NET),
        loss_kwargs=dnnlib.EasyDict(class_name='training.loss.DDNLoss'),
        optimizer_kwargs=dnnlib.EasyDict(class_name='torch.optim.Adam', lr=1e-2),
        balance_kwargs=dnnlib.EasyDict(method='tv'),
        seed=3, batch_size=20, ema_halflife_kimg=0.1, lr_rampup_kimg=0,
        kimg_per_tick=0.1, snapshot_ticks=2, state_dump_ticks=1, device='cpu',
    )
    kwargs.update(overrides)
    os.makedirs(run_dir, exist_ok=True)
    return kwargs

def _ticks(run_dir):
    return [(round(line['Progress/tick']['mean']), round(line['Progress/kimg']['mean'] * 1000))
            for line in map(json.loads, open(os.path.join(run_dir, 'stats.jsonl')))]

def _files(run_dir, prefix):
    return sorted(name for name in os.listdir(run_dir) if name.startswith(prefix) and '.tmp-' not in name)

# Ticks of 0.1 kimg: every snapshot and state keeps its own file (kimg 0.020, 0.120, ...); resuming
# from the state of tick 2 repeats ticks 3.. exactly (numbers, kimg, and the snapshot schedule).
def test_short_ticks_and_resume_repeat_the_schedule(tmp_path):
    tl.training_loop(**_loop_kwargs(tmp_path / 'full', total_kimg=0.3))
    full = _ticks(tmp_path / 'full')
    assert full == [(0, 20), (1, 120), (2, 220), (3, 300)]
    states = _files(tmp_path / 'full', 'training-state-')
    assert len(states) == 3                                 # Ticks 1..3, none overwritten.
    assert _files(tmp_path / 'full', 'network-snapshot-') == sorted(
        f'network-snapshot-{tag}.{ext}' for tag in ('000000', '000000.220', '000000.300') for ext in ('pkl', 'safetensors'))
    assert checkpoint.latest(str(tmp_path / 'full'), snapshot_io.STATE_PATTERN).endswith('training-state-000000.300.pt')

    half = os.path.join(tmp_path / 'full', 'training-state-000000.120.pt')
    tl.training_loop(**_loop_kwargs(tmp_path / 'resumed', total_kimg=0.3, resume_state=half))
    assert _ticks(tmp_path / 'resumed') == full[2:]
    assert _files(tmp_path / 'resumed', 'network-snapshot-') == sorted(
        f'network-snapshot-000000.{n}.{ext}' for n in ('220', '300') for ext in ('pkl', 'safetensors'))
    a = checkpoint.load(checkpoint.latest(str(tmp_path / 'full'), snapshot_io.STATE_PATTERN))
    b = checkpoint.load(checkpoint.latest(str(tmp_path / 'resumed'), snapshot_io.STATE_PATTERN))
    for name, value in a['net'].items():
        assert torch.equal(value, b['net'][name]), name

    # Another batch size would not repeat the run: refused.
    with pytest.raises(ValueError, match='batch_size 20, not 40'):
        tl.training_loop(**_loop_kwargs(tmp_path / 'other', total_kimg=0.3, resume_state=half, batch_size=40))

# Many runs created at the same moment in one --outdir all get their own id and folder.
def _make(outdir, barrier, queue):
    barrier.wait()
    queue.put(train.make_run_dir(outdir, 'digits-x'))

def test_run_ids_unique_under_concurrency(tmp_path, monkeypatch):
    # Widen the window between choosing the id and creating the folder, as a busy machine does.
    choose = train.next_run_dir
    def slow_next_run_dir(outdir, desc):
        run_dir = choose(outdir, desc)
        time.sleep(0.2)
        return run_dir
    monkeypatch.setattr(train, 'next_run_dir', slow_next_run_dir)
    n = 8
    ctx = multiprocessing.get_context('fork' if 'fork' in multiprocessing.get_all_start_methods() else 'spawn')
    barrier, queue = ctx.Barrier(n), ctx.Queue()
    procs = [ctx.Process(target=_make, args=(str(tmp_path), barrier, queue)) for _ in range(n)]
    for p in procs:
        p.start()
    dirs = [queue.get(timeout=60) for _ in range(n)]
    for p in procs:
        p.join(timeout=60)
    assert len(set(dirs)) == n
    assert sorted(os.path.basename(d)[:5] for d in dirs) == [f'{i:05d}' for i in range(n)]

# ----------------------------------------------------------------------------
# Preemption: a signal to one rank of a 2-process run stops both after the same step, with a state;
# the resumed run ends with the parameters of an uninterrupted one. Nothing depends on timing: the run
# to be stopped is given a duration it cannot reach (1 Mimg, hours here), it is signalled once its log
# shows the first tick, and the uninterrupted run and the resumed one then both go to the stop plus
# RESUME_IMAGES images.

COMMON = ['--batch=16', '--chain-dropout=0', '--tick=0.08', '--snap=100', '--dump=100', '--lr-rampup=0',
          '--max-channels=8', '--max-blockn=1', '--max-outputk=8', '--seed=5', '--workers=0', '--ema=0.0005']
UNREACHED = '--duration=1'
RESUME_IMAGES = 240

def _torchrun(args):
    return [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2', train.__file__, *args]

@pytest.fixture
def env(subprocess_env):
    return dict(subprocess_env, OMP_NUM_THREADS='1', CUDA_VISIBLE_DEVICES='')

def _run_dirs(outdir):
    return sorted(outdir / name for name in os.listdir(outdir) if os.path.isdir(outdir / name)) if outdir.exists() else []

def test_signal_saves_state_and_resume_matches(tmp_path, env):
    # A run that only a signal ends, sent SIGUSR1 (to rank 1 only) once its first tick is logged.
    outdir = tmp_path / 'stopped'
    proc = subprocess.Popen(_torchrun([f'--outdir={outdir}', *COMMON, UNREACHED]), env=env, cwd=str(tmp_path),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        while True:
            assert proc.poll() is None, 'the run ended before it was signalled: ' + proc.stdout.read()
            logs = [d / 'log.txt' for d in _run_dirs(outdir)]
            if logs and logs[0].exists() and logs[0].read_text().count('\ntick ') >= 1:
                break
            time.sleep(0.02)
        workers = psutil.Process(proc.pid).children()
        assert len(workers) == 2
        workers[-1].send_signal(signal.SIGUSR1)
        output, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, output
    assert 'Stopped by SIGUSR1 at kimg' in output and '--resume=' in output, output
    run_dir = _run_dirs(outdir)[0]
    state = checkpoint.load(checkpoint.latest(str(run_dir), snapshot_io.STATE_PATTERN))
    stop = state['cur_nimg']
    assert stop > 0 and stop % 16 == 0                         # After a whole step.

    # The uninterrupted run and the resumed one (from the run folder) to the same end: the same parameters.
    duration = f'--duration={(stop + RESUME_IMAGES) / 1e6}'
    full = subprocess.Popen(_torchrun([f'--outdir={tmp_path / "full"}', *COMMON, duration]), env=env, cwd=str(tmp_path),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        resumed = subprocess.run(_torchrun([f'--outdir={outdir}', f'--resume={run_dir}', *COMMON, duration]), env=env,
                                 cwd=str(tmp_path), capture_output=True, text=True, timeout=300, check=False)
        full_output, _ = full.communicate(timeout=300)
    finally:
        if full.poll() is None:
            full.kill()
    assert full.returncode == 0, full_output
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    full_dir, resumed_dir = _run_dirs(tmp_path / 'full')[0], _run_dirs(outdir)[-1]
    a = checkpoint.load(checkpoint.latest(str(full_dir), snapshot_io.STATE_PATTERN))
    b = checkpoint.load(checkpoint.latest(str(resumed_dir), snapshot_io.STATE_PATTERN))
    assert a['cur_nimg'] == b['cur_nimg'] == stop + RESUME_IMAGES
    for key in ('net', 'ema'):
        for name, value in (a[key] or {}).items():
            torch.testing.assert_close(b[key][name], value, rtol=0, atol=0, msg=f'{key}.{name}')
    # And the same ticks: those before the stop, then the rest.
    assert [t for t in _ticks(full_dir) if t[1] > stop] == _ticks(resumed_dir)

# One process, in-process, SIGTERM: the loop finishes the step, writes a state with the tick in
# progress, prints how to resume and returns; resuming gives the uninterrupted run exactly.
class SignallingLoss:
    """DDNLoss that sends this process `signum` during call number `at` (a scheduler's signal mid-step)."""
    def __init__(self, at=7, signum=int(signal.SIGTERM)):
        from training.loss import DDNLoss
        self.loss, self.at, self.signum, self.calls = DDNLoss(), at, signum, 0

    def __call__(self, **kwargs):
        self.calls += 1
        if self.calls == self.at:
            os.kill(os.getpid(), self.signum)
        return self.loss(**kwargs)

def test_signal_in_process_resumes_exactly(tmp_path, capsys):
    tl.training_loop(**_loop_kwargs(tmp_path / 'full', total_kimg=0.3, snapshot_ticks=None, state_dump_ticks=100))
    signalling = dnnlib.EasyDict(class_name='test_preemption.SignallingLoss', at=7)
    result = tl.training_loop(**_loop_kwargs(tmp_path / 'stopped', total_kimg=0.3, snapshot_ticks=None, state_dump_ticks=100,
                                             loss_kwargs=signalling))
    out = capsys.readouterr().out
    assert 'Stopped by SIGTERM at kimg 0.140' in out
    assert result.stopped and result.run_dir == str(tmp_path / 'stopped')      # train.py prints the --resume hint.
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL              # Handlers restored.
    state = checkpoint.latest(str(tmp_path / 'stopped'), snapshot_io.STATE_PATTERN)
    assert os.path.basename(state) == 'training-state-000000.pt'
    assert checkpoint.load(state)['next_tick'] == 2 and checkpoint.load(state)['tick_start_nimg'] == 120
    tl.training_loop(**_loop_kwargs(tmp_path / 'resumed', total_kimg=0.3, snapshot_ticks=None, state_dump_ticks=100,
                                    resume_state=state))
    assert _ticks(tmp_path / 'stopped') + _ticks(tmp_path / 'resumed') == _ticks(tmp_path / 'full')
    a = checkpoint.load(checkpoint.latest(str(tmp_path / 'full'), snapshot_io.STATE_PATTERN))
    b = checkpoint.load(checkpoint.latest(str(tmp_path / 'resumed'), snapshot_io.STATE_PATTERN))
    for key in ('net', 'ema'):
        for name, value in a[key].items():
            assert torch.equal(value, b[key][name]), f'{key}.{name}'
