"""A run stopped by a scheduler or a user (issue 21, classes 2, 3 and 8): signals sent to the whole process
group (DataLoader workers included) stop after the step with a training state; the first Ctrl+C saves, the
second aborts; a signal inside a dump leaves every earlier state intact; a state of another number of
processes is refused; a run folder in use by a live process is refused, a stale lock is taken over.

The runs are real `train.py` processes in their own session (`setsid`), with two DataLoader workers;
the tests wait on files and log lines, never on a fixed delay."""

import hashlib
import multiprocessing
import os
import signal
import subprocess
import sys
import time

import pytest
from click.testing import CliRunner

import train
from torch_utils import checkpoint
from training import run_files
from training import snapshot as snapshot_io

REPO = os.path.dirname(os.path.abspath(train.__file__))

TINY = ['--batch=16', '--chain-dropout=0', '--tick=0.08', '--snap=100', '--dump=1', '--lr-rampup=0', '--max-channels=8',
        '--max-blockn=1', '--max-outputk=8', '--seed=5', '--duration=1', '--device=cpu']

@pytest.fixture
def env(subprocess_env):
    return dict(subprocess_env, OMP_NUM_THREADS='1', CUDA_VISIBLE_DEVICES='')

def _states(run_dir):
    if not os.path.isdir(run_dir):
        return []
    return sorted(name for name in os.listdir(run_dir) if name.startswith('training-state-') and name.endswith('.pt'))

def _wait_for(condition, proc, what, timeout=180):
    deadline = time.time() + timeout
    while not condition():
        if proc.poll() is not None:
            out = proc.stdout.read() if proc.stdout else ''
            pytest.fail(f'the run ended before {what}:\n{out}')
        assert time.time() < deadline, f'no {what} after {timeout} s'
        time.sleep(0.05)

def _log_ticks(run_dir):
    log = os.path.join(run_dir, 'log.txt')
    return open(log).read().count('\ntick ') if os.path.exists(log) else 0

# A train.py process in a new session (its own process group, as a scheduler's job step), killed with
# its group on exit.
class _Run:
    def __init__(self, args, env, driver=None):
        cmd = [sys.executable, '-c', driver, *args] if driver else [sys.executable, 'train.py', *args]
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, start_new_session=True,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def __enter__(self):
        return self.proc

    def __exit__(self, *exc):
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        self.proc.stdout.close()

# SIGTERM / SIGUSR1 / SIGINT (Ctrl+C) to the whole process group, with two DataLoader workers: the run
# stops after the step, saves a state of the tick in progress and exits 0; the state resumes.
@pytest.mark.parametrize('signum', [signal.SIGTERM, signal.SIGINT])
def test_group_signal_with_workers_saves_a_state(tmp_path, env, signum):
    run_dir = tmp_path / 'run'
    with _Run([f'--outdir={run_dir}', '--nosubdir', '--workers=2', *TINY], env) as proc:
        _wait_for(lambda: _log_ticks(run_dir) >= 1, proc, 'a tick')
        os.killpg(proc.pid, signum)
        out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    assert f'Stopped by {signal.Signals(signum).name} at kimg' in out and 'Traceback' not in out, out
    state = checkpoint.load(checkpoint.latest(str(run_dir), snapshot_io.STATE_PATTERN))
    assert state['world_size'] == 1 and state['cur_nimg'] > 0

# A driver around train.py: the second training-state write of the run gets signals to the whole group
# from inside the write (DUMP_SIGNALS, e.g. "TERM" or "INT,INT"); it prints the SHA-256 of the states
# already on disk at that moment.
DRIVER = r'''
import hashlib, os, signal, sys
sys.argv = ['train.py', *sys.argv[1:]]
from torch_utils import checkpoint
import train
write_atomic, count = checkpoint.write_atomic, [0]
def signalling_write_atomic(path, write, mode='wb'):
    if os.path.basename(path).startswith('training-state-'):
        count[0] += 1
        if count[0] == 2:
            folder = os.path.dirname(path)
            for name in sorted(os.listdir(folder)):
                if name.startswith('training-state-') and name.endswith('.pt'):
                    print('before', name, hashlib.sha256(open(os.path.join(folder, name), 'rb').read()).hexdigest(), flush=True)
            inner = write
            def write(f):
                for name in os.environ['DUMP_SIGNALS'].split(','):
                    os.killpg(0, getattr(signal, 'SIG' + name))
                inner(f)
    return write_atomic(path, write, mode)
checkpoint.write_atomic = signalling_write_atomic
train.main()
'''

def _before(out):
    return {line.split()[1]: line.split()[2] for line in out.splitlines() if line.startswith('before ')}

def _sha(path):
    return hashlib.sha256(open(path, 'rb').read()).hexdigest()

# SIGTERM to the group in the middle of a dump: the dump completes (the workers live on), the run stops
# after the next step with one more state, and the earlier states are untouched.
def test_group_signal_during_a_dump(tmp_path, env):
    run_dir = tmp_path / 'run'
    with _Run([f'--outdir={run_dir}', '--nosubdir', '--workers=2', *TINY], dict(env, DUMP_SIGNALS='TERM'), DRIVER) as proc:
        out, _ = proc.communicate(timeout=180)
    assert proc.returncode == 0, out
    assert 'Stopped by SIGTERM' in out and 'Traceback' not in out, out
    before = _before(out)
    states = _states(run_dir)
    assert len(before) == 1 and len(states) == 3, (before, states)
    for name, digest in before.items():
        assert _sha(run_dir / name) == digest
    nimg = [checkpoint.load(run_dir / name)['cur_nimg'] for name in states]
    assert nimg == sorted(nimg) and len(set(nimg)) == 3
    assert not [name for name in os.listdir(run_dir) if '.tmp-' in name]

# Ctrl+C twice in the middle of a dump: the second aborts at once (exit code != 0, no new state), and
# the previous state is intact; no temporary file is left.
def test_second_ctrl_c_aborts_and_keeps_the_previous_state(tmp_path, env):
    run_dir = tmp_path / 'run'
    with _Run([f'--outdir={run_dir}', '--nosubdir', '--workers=2', *TINY], dict(env, DUMP_SIGNALS='INT,INT'), DRIVER) as proc:
        out, _ = proc.communicate(timeout=180)
    assert proc.returncode != 0 and 'Aborted' in out, out
    assert 'Ctrl+C again aborts' in out and 'Stopped by' not in out, out
    before = _before(out)
    assert len(before) == 1 and _states(run_dir) == list(before), (before, _states(run_dir))
    for name, digest in before.items():
        assert _sha(run_dir / name) == digest
        checkpoint.load(run_dir / name)
    assert not [name for name in os.listdir(run_dir) if '.tmp-' in name]

# ----------------------------------------------------------------------------
# Resume: another number of processes is refused; a folder in use is refused; a stale lock is taken over.

def test_state_of_another_world_size_is_refused(tmp_path):
    run_dir = tmp_path / 'run'
    tiny = [a for a in TINY if not a.startswith('--duration')]
    result = CliRunner().invoke(train.main, [f'--outdir={run_dir}', '--nosubdir', '--workers=0', *tiny, '--duration=0.00002'])
    assert result.exit_code == 0, result.output
    path = checkpoint.latest(str(run_dir), snapshot_io.STATE_PATTERN)
    state = checkpoint.load(path)
    assert state['world_size'] == 1
    state['world_size'] = 2
    other = tmp_path / 'two' / 'training-state-000000.pt'
    checkpoint.save_atomic(state, other)
    message = 'written by 2 process(es), this run has 1'
    with pytest.raises(ValueError, match=message.replace('(', r'\(').replace(')', r'\)')):     # The loop's own check.
        run_files.read_resume_state(str(other), state['config']['network_kwargs'], state['config']['dataset'], 16, world_size=1)
    result = CliRunner().invoke(train.main, [f'--outdir={tmp_path / "out"}', f'--resume={other}', '--dry-run', *tiny])
    assert result.exit_code != 0 and isinstance(result.exception, SystemExit), result.output
    assert message in result.output and '--resume' in result.output, result.output

# The lock of a run folder, held by another live process, then by none (it died without releasing).
def _hold(folder, held, done):
    lock = checkpoint.RunLock(folder).acquire()
    held.set()
    done.wait(60)
    os._exit(0 if lock.file is not None else 1)     # Dies holding it: the kernel drops the flock, the file still names this pid.

def test_run_lock_refuses_a_live_holder_and_takes_over_a_stale_one(tmp_path):
    ctx = multiprocessing.get_context('fork')
    held, done = ctx.Event(), ctx.Event()
    child = ctx.Process(target=_hold, args=(str(tmp_path), held, done))
    child.start()
    try:
        assert held.wait(60)
        with pytest.raises(checkpoint.FolderInUseError, match=f'pid {child.pid}'):
            checkpoint.RunLock(tmp_path).acquire()
    finally:
        done.set()
        child.join(60)
    assert (tmp_path / checkpoint.RUN_LOCK_NAME).read_text().strip() == str(child.pid)    # Stale.
    with checkpoint.RunLock(tmp_path):
        assert (tmp_path / checkpoint.RUN_LOCK_NAME).read_text().strip() == str(os.getpid())
    assert not (tmp_path / checkpoint.RUN_LOCK_NAME).exists()

# train.py --resume of a folder whose run is alive is refused, in place (--nosubdir) or into a new
# folder; once that run is dead (SIGKILL: its lock file stays), the resume goes ahead. (The later
# commands run in this process: a fresh interpreter per command would triple the time.)
def test_resume_of_a_folder_in_use_is_refused(tmp_path, env):
    run_dir = tmp_path / 'run'
    tiny = [a for a in TINY if not a.startswith('--duration')]
    with _Run([f'--outdir={run_dir}', '--nosubdir', '--workers=0', *TINY], env) as first:
        _wait_for(lambda: len(_states(run_dir)) >= 1, first, 'a training state')
        for args in ([f'--outdir={run_dir}', '--nosubdir'], [f'--outdir={tmp_path / "runs"}']):
            result = CliRunner().invoke(train.main, [*args, f'--resume={run_dir}', '--workers=0', *TINY])
            assert result.exit_code != 0 and isinstance(result.exception, SystemExit), result.output
            assert f'is in use by a running process (pid {first.pid}' in result.output, result.output
        assert not (tmp_path / 'runs').exists()
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    assert (run_dir / checkpoint.RUN_LOCK_NAME).read_text().strip() == str(first.pid)
    result = CliRunner().invoke(train.main, [f'--outdir={run_dir}', '--nosubdir', f'--resume={run_dir}', '--workers=0', *tiny,
                                             '--duration=0.00001'])
    assert result.exit_code == 0, result.output
    assert 'nothing to do' in result.output
    assert not (run_dir / checkpoint.RUN_LOCK_NAME).exists()        # Released and removed at the end.
