"""Tests of train.py through its command line: a tiny real run on the built-in digits, resume from a
run folder, a 2-process gloo run, a killed run, bad input, and torchrun's option parsing."""

import hashlib
import json
import os
import pickle
import random
import signal
import subprocess
import sys
import time

import numpy as np
import PIL.Image
import pytest
import torch
from click.testing import CliRunner

import dnnlib
import train
from torch_utils import checkpoint
from training import pictures
from training import snapshot as snapshot_io
from training.dataset import DigitsDataset

# A tiny network on the built-in 16x16 digits: 5 layers of K=8, about 2000 images/s on one core.
TINY = ['--batch=50', '--lr-rampup=0', '--max-channels=8', '--max-blockn=1', '--max-outputk=8',
        '--tick=0.5', '--snap=2', '--dump=2', '--seed=1', '--workers=0']

# Keys every stats.jsonl line has.
STATS_KEYS = ['Progress/tick', 'Progress/kimg', 'Loss/loss', 'Loss/layer_first', 'Loss/layer_mid', 'Loss/layer_last',
              'Timing/img_per_sec', 'Timing/sec_per_kimg', 'Timing/sec_per_tick', 'Resources/cpu_mem_gb',
              'SplitPrune/splits', 'SplitPrune/usage_tv', 'timestamp']

@pytest.fixture
def env(subprocess_env):
    # One thread per process (the test machine may be busy) and the CPU even on GPU hosts.
    return dict(subprocess_env, OMP_NUM_THREADS='1', CUDA_VISIBLE_DEVICES='')

def run_train(args, env, cwd, timeout=240):
    return subprocess.run([sys.executable, train.__file__, *args], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=timeout, check=False)

def run_dirs(outdir):
    return sorted(name for name in os.listdir(outdir) if os.path.isdir(os.path.join(outdir, name)))

# (size, mtime, sha256) of every file below `path`: to prove that nothing was touched.
def fingerprint(path):
    result = {}
    for root, _dirs, files in os.walk(path):
        for name in files:
            full = os.path.join(root, name)
            with open(full, 'rb') as f:
                digest = hashlib.sha256(f.read()).hexdigest()
            st = os.stat(full)
            result[os.path.relpath(full, path)] = (st.st_size, st.st_mtime_ns, digest)
    return result

# One real run shared by the tests of this module (they only read it, or copy it).
@pytest.fixture(scope='module')
def tiny_run(tmp_path_factory):
    outdir = tmp_path_factory.mktemp('runs')
    env = dict(os.environ, OMP_NUM_THREADS='1', CUDA_VISIBLE_DEVICES='',
               PYTHONPATH=os.pathsep.join([os.path.dirname(train.__file__), os.environ.get('PYTHONPATH', '')]))
    proc = run_train([f'--outdir={outdir}', '--duration=0.002', '--desc=tiny', *TINY], env, cwd=str(outdir))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return outdir, os.path.join(outdir, '00000-digits-tiny'), proc.stdout

# ----------------------------------------------------------------------------
# The tiny run: folder contents, stats, snapshot usable in a fresh process, pictures.

def test_tiny_run_folder(tiny_run, env, repo_root):
    outdir, run_dir, stdout = tiny_run
    assert run_dirs(outdir) == ['00000-digits-tiny']
    files = sorted(os.listdir(run_dir))
    expected = ['log.txt', 'stats.jsonl', 'training_options.json']
    expected += [f'{prefix}-{kimg:06d}.{ext}' for kimg in (0, 1, 2)
                 for prefix, ext in (('network-snapshot', 'pkl'), ('network-snapshot', 'safetensors'), ('samples', 'png'),
                                     ('node-usage', 'png'))]
    expected += ['training-state-000001.pt', 'training-state-000002.pt']
    assert files == sorted(expected)

    # Options and log.
    options = json.loads(open(os.path.join(run_dir, 'training_options.json')).read())
    assert options['network_kwargs']['class_name'] == 'training.networks.DDNGenerator'
    assert options['network_kwargs']['img_resolution'] == 16 and options['network_kwargs']['max_outputk'] == 8
    assert options['dataset_kwargs']['class_name'] == 'training.dataset.DigitsDataset'
    assert options['optimizer_kwargs'] == dict(class_name='torch.optim.Adam', lr=1e-3, betas=[0.9, 0.999], eps=1e-8)
    assert options['batch_size'] == 50 and options['seed'] == 1 and options['total_kimg'] == 2
    assert options['balance_kwargs'] == dict(method='tv')
    log = open(os.path.join(run_dir, 'log.txt')).read()
    ticks = [line for line in log.splitlines() if line.startswith('tick ')]
    assert len(ticks) == 5 and all(key in ticks[-1] for key in ('kimg', 'loss', 'sec/tick', 'img/s', 'splits', 'cpumem'))
    assert 'Exiting...' in log

    # stats.jsonl: one line per tick; the loss goes down.
    lines = [json.loads(line) for line in open(os.path.join(run_dir, 'stats.jsonl'))]
    assert len(lines) == 5
    for line in lines:
        assert all(key in line for key in STATS_KEYS), sorted(set(STATS_KEYS) - set(line))
    assert [line['Progress/tick']['mean'] for line in lines] == [0, 1, 2, 3, 4]
    assert lines[-1]['Progress/kimg']['mean'] == pytest.approx(2.0)
    assert lines[-1]['Loss/loss']['mean'] < lines[0]['Loss/loss']['mean']
    assert lines[-1]['Progress/rank_batch']['mean'] == 50
    assert lines[-1]['SplitPrune/splits']['mean'] > 0

    # The snapshot loads with plain pickle in a fresh interpreter and generates digits-shaped images.
    proc = subprocess.run([sys.executable, str(repo_root / 'tests' / 'scripts' / 'check_snapshot.py'),
                           os.path.join(run_dir, 'network-snapshot-000002.pkl')],
                          env=env, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    assert info['keys'] == ['dataset_kwargs', 'ema', 'loss_fn', 'network_kwargs', 'training_options']
    assert info['class_name'] == 'training.networks.DDNGenerator'
    assert info['shape'] == [4, 1, 16, 16] and info['finite'] and info['std'] > 0.05
    assert not info['training'] and not info['requires_grad']
    assert info['per_seed_max_diff'] < 1e-5                                 # Image of seed 2 alone or in a batch.

    # Pictures: an 8x8 grid of 16x16 digits upscaled 4x, and 3 node-usage panels (5 layers).
    grid = PIL.Image.open(os.path.join(run_dir, 'samples-000002.png'))
    assert grid.mode == 'L' and grid.size == (8 * (64 + pictures.GRID_GAP) - pictures.GRID_GAP,) * 2
    usage = PIL.Image.open(os.path.join(run_dir, 'node-usage-000002.png'))
    assert usage.size == (pictures.USAGE_PANEL_SIZE[0], 3 * pictures.USAGE_PANEL_SIZE[1])

    # The training state holds what resume needs.
    state = checkpoint.load(os.path.join(run_dir, 'training-state-000002.pt'))
    assert state['cur_nimg'] == 2000 and state['cur_tick'] == 4 and state['seed'] == 1
    assert 'ddls.4.node_stats.count' in state['net'] and state['optimizer']['state']
    assert state['batch_size'] == 50 and state['config']['network_kwargs'] == options['network_kwargs']

# --resume RUNDIR takes the newest state, in a new run folder; the old run is untouched.
def test_resume_run_dir_takes_latest_state(tiny_run, env):
    outdir, run_dir, _ = tiny_run
    before = fingerprint(run_dir)
    proc = run_train([f'--outdir={outdir}', '--duration=0.0025', f'--resume={run_dir}', '--desc=resumed', *TINY[:-2]],
                     env, cwd=str(outdir))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    new_dir = os.path.join(outdir, '00001-digits-resumed')
    assert f'Resuming from "{os.path.join(run_dir, "training-state-000002.pt")}" at kimg 2.000' in proc.stdout
    state = checkpoint.load(checkpoint.latest(new_dir, snapshot_io.STATE_PATTERN))
    assert state['cur_nimg'] == 2500 and state['seed'] == 1                # The seed comes from the state.
    assert fingerprint(run_dir) == before

# ----------------------------------------------------------------------------
# Two processes with gloo: each rank takes half the batch, ranks stay identical, rank 0 alone writes,
# and the result equals one process accumulating the same two halves.

def test_two_process_gloo(tmp_path, env, free_port):
    common = ['--duration=0.00032', '--batch=16', '--chain-dropout=0', '--tick=0.08', '--snap=2', '--dump=2',
              '--lr-rampup=0', '--max-channels=8', '--max-blockn=1', '--max-outputk=8', '--seed=5', '--workers=0']
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
           os.path.join(os.path.dirname(train.__file__), 'train.py'), f'--outdir={tmp_path / "two"}', *common]
    proc = subprocess.run(cmd, env=env, cwd=str(tmp_path), capture_output=True, text=True, timeout=240, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert run_dirs(tmp_path / 'two') == ['00000-digits-gpus2-batch16-fp32']
    run_dir = tmp_path / 'two' / '00000-digits-gpus2-batch16-fp32'
    assert '16 images per step = 2 process(es) x 1 round(s) x 8 images' in proc.stdout
    lines = [json.loads(line) for line in open(run_dir / 'stats.jsonl')]
    assert len(lines) == 5                                                      # Not written twice.
    steps = sum(line['Progress/rank_batch']['num'] for line in lines) // 2
    assert steps == 20
    assert all(line['Progress/rank_batch']['mean'] == 8 for line in lines)     # Half the batch per rank.
    log = open(run_dir / 'log.txt').read()
    assert log.count('Exiting...') == 1

    assert 'Parameters and buffers identical on all 2 processes.' in proc.stdout

    # One process, two rounds of 8 = the same two half-batch gradients summed in another order. Only a
    # few steps compare: after that DDN's argmin turns rounding differences into different choices.
    # Two processes with two rounds of 4 each (DDP reduces after the second round only) agree too;
    # that run is launched as the README's multi-node command does (c10d rendezvous), on one node.
    short = [arg for arg in common if not arg.startswith('--duration')] + ['--duration=0.000032']
    torchrun = ['-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2']
    multinode = ['-m', 'torch.distributed.run', '--nnodes=1', '--nproc_per_node=2', '--rdzv-backend=c10d',
                 f'--rdzv-endpoint=127.0.0.1:{free_port}', '--rdzv-id=ddn-test']
    runs = (('two-short', torchrun, [], 2), ('two-rounds', multinode, ['--batch-gpu=4'], 2), ('one-short', [], ['--batch-gpu=8'], 1))
    for outdir, nproc, extra, _ in runs:
        proc = subprocess.run([sys.executable, *nproc, train.__file__, f'--outdir={tmp_path / outdir}', *short, *extra],
                              env=env, cwd=str(tmp_path), capture_output=True, text=True, timeout=240, check=False)
        assert proc.returncode == 0, proc.stdout + proc.stderr
    states = [checkpoint.load(checkpoint.latest(str(tmp_path / outdir / f'00000-digits-gpus{n}-batch16-fp32'), snapshot_io.STATE_PATTERN))
              for outdir, _, _, n in runs]
    assert states[0]['cur_nimg'] == states[1]['cur_nimg'] == states[2]['cur_nimg'] == 32
    for name, value in states[2]['net'].items():
        torch.testing.assert_close(states[0]['net'][name], value, rtol=1e-4, atol=1e-5, msg=name)
        torch.testing.assert_close(states[1]['net'][name], value, rtol=1e-4, atol=1e-5, msg=name)

# ----------------------------------------------------------------------------
# SIGKILL at a random moment after the first snapshot: every file under a final name is complete,
# and the run continues in place from its latest state.

def test_killed_run_leaves_complete_files_and_resumes(tmp_path, env):
    run_dir = tmp_path / 'run'
    args = [f'--outdir={run_dir}', '--nosubdir', '--duration=1', '--tick=0.25', '--snap=1', '--dump=1', *TINY[:5], '--seed=2', '--workers=0']
    proc = subprocess.Popen([sys.executable, train.__file__, *args], env=env, cwd=str(tmp_path),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while checkpoint.latest(str(run_dir), snapshot_io.STATE_PATTERN) is None:
            assert proc.poll() is None and time.time() < deadline, 'no training state appeared'
            time.sleep(0.05)
        time.sleep(random.uniform(0.0, 1.0))
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    for name in os.listdir(run_dir):
        path = os.path.join(run_dir, name)
        if '.tmp-' in name:
            continue                                        # An interrupted write: never under a final name.
        if name.endswith(('.pkl', '.pt')):
            checkpoint.load(path)
        elif name.endswith('.png'):
            with PIL.Image.open(path) as image:
                image.load()
        elif name.endswith('.json'):
            json.loads(open(path).read())
        elif name == 'stats.jsonl':
            for line in open(path):
                json.loads(line)
    state = checkpoint.load(checkpoint.latest(str(run_dir), snapshot_io.STATE_PATTERN))
    duration = (state['cur_nimg'] + 500) / 1e6
    result = run_train([*args[:2], f'--duration={duration}', f'--resume={run_dir}', *args[3:]], env, cwd=str(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr
    final = checkpoint.load(checkpoint.latest(str(run_dir), snapshot_io.STATE_PATTERN))
    assert final['cur_nimg'] == state['cur_nimg'] + 500

# ----------------------------------------------------------------------------
# Bad input: one clear message each, non-zero exit, nothing written or overwritten.

def _png_folder(path, size, count=4):
    os.makedirs(path)
    for i in range(count):
        PIL.Image.new('L', (size, size), color=i * 40).save(os.path.join(path, f'{i}.png'))
    return str(path)

def _bad_cases(tmp_path, run_dir):
    corrupt = _png_folder(tmp_path / 'corrupt', 8)
    with open(os.path.join(corrupt, '9.png'), 'wb') as f:
        f.write(b'not a png')
    (tmp_path / 'data.txt').write_text('hello')
    empty = tmp_path / 'empty'
    empty.mkdir()
    state = os.path.join(run_dir, 'training-state-000002.pt')
    return [
        (['--data', str(tmp_path / 'missing.zip')], 'Dataset not found'),
        (['--data', corrupt], 'cannot identify image file'),
        (['--data', str(empty)], 'No PNG/JPG images found'),
        (['--data', str(tmp_path / 'data.txt')], 'neither a folder nor a .zip'),
        (['--data', _png_folder(tmp_path / 'nolabels', 8), '--cond=True'], 'has no labels'),
        (['--cond=True', '--condition=edge'], 'conflicts with --condition=edge'),
        (['--condition=resize6'], 'Unknown condition'),
        (['--data', _png_folder(tmp_path / 'res12', 12)], 'power-of-two'),
        (['--batch=10', '--batch-gpu=4'], '--batch=10 must be divisible by processes x --batch-gpu = 1 x 4'),
        (['--condition=color'], 'needs an RGB dataset'),
        (['--precision=fp16', '--device=cpu'], 'fp16 needs CUDA'),
        (['--start-size=3'], 'start_size must be a power of two'),
        ([f'--resume={state}', '--max-outputk=16'], 'network_kwargs.max_outputk: 8 in the state, 16 now'),
        ([f'--resume={os.path.join(run_dir, "network-snapshot-000002.pkl")}'], 'not a ddn training state'),
        ([f'--resume={state}', '--batch=40'], 'was trained with --batch=50'),
        ([f'--resume={tmp_path / "nothing-here"}'], 'no such file or folder'),
        ([f'--resume={empty}'], 'no training-state-*.pt in folder'),
        (['--transfer', str(tmp_path / 'missing.pkl')], 'Network not found'),
        (['--transfer', state], 'not a network snapshot'),
    ]

def test_bad_input(tiny_run, tmp_path):
    outdir, run_dir, _ = tiny_run
    before = fingerprint(outdir)
    base = [f'--outdir={outdir}', '--duration=0.001', *TINY]
    runner = CliRunner()
    for extra, message in _bad_cases(tmp_path, run_dir):
        result = runner.invoke(train.main, [*base, *extra])
        assert result.exit_code != 0, (extra, result.output)
        assert message in result.output, (extra, result.output)
        assert isinstance(result.exception, SystemExit), (extra, result.exception)
        assert fingerprint(outdir) == before, extra
    # --nosubdir into a folder that holds a run: refused unless resuming that very run.
    result = runner.invoke(train.main, [f'--outdir={run_dir}', '--nosubdir', '--duration=0.001', *TINY])
    assert result.exit_code != 0 and 'already holds a training run' in result.output
    assert fingerprint(outdir) == before

# --dry-run prints the options and writes nothing.
def test_dry_run(tmp_path):
    result = CliRunner().invoke(train.main, [f'--outdir={tmp_path / "out"}', '--dry-run', *TINY])
    assert result.exit_code == 0, result.output
    assert 'Dry run; exiting.' in result.output and '"class_name": "training.networks.DDNGenerator"' in result.output
    assert not (tmp_path / 'out').exists()

# The speed options reach the training loop's options (the optimizer's implementation, compile, layout).
def test_speed_options_in_config(tmp_path):
    result = CliRunner().invoke(train.main, [f'--outdir={tmp_path / "out"}', '--dry-run', *TINY,
                                             '--adam=fused', '--compile=True', '--channels-last=True'])
    assert result.exit_code == 0, result.output
    config = json.loads(result.output[result.output.index('{') : result.output.rindex('}') + 1])
    assert config['optimizer_kwargs']['fused'] is True
    assert config['compile'] is True and config['channels_last'] is True

# ----------------------------------------------------------------------------
# torchrun must hand every option of train.py to the script: none may be mistaken for an
# abbreviation of one of torchrun's own options.

def test_torchrun_does_not_take_our_options():
    from torch.distributed.run import get_args_parser
    ours = []
    for param in train.main.params:
        for opt in param.opts + param.secondary_opts:
            if opt.startswith('--'):
                ours += [opt] if getattr(param, 'is_flag', False) else [f'{opt}=1', opt, '1']
    args = get_args_parser().parse_args(['--standalone', '--nproc_per_node=2', 'train.py', *ours])
    assert args.training_script == 'train.py'
    assert args.training_script_args == ours
    # And the option names themselves are not prefixes of torchrun's.
    theirs = [s for action in get_args_parser()._actions for s in action.option_strings if s.startswith('--')]
    for opt in ours:
        name = opt.split('=')[0]
        if name.startswith('--'):
            assert not any(t.startswith(name) for t in theirs), (name, [t for t in theirs if t.startswith(name)])

# ----------------------------------------------------------------------------

# A labelled folder of the first `count` built-in digits at 16x16 (their classes in dataset.json);
# returns the images in [-1, 1] and the one-hot labels.
def _digit_folder(path, count=300):
    ds = DigitsDataset(resolution=16, use_labels=True)
    os.makedirs(path)
    for i in range(count):
        PIL.Image.fromarray(ds[i][0][0]).save(os.path.join(path, f'{i}.png'))
    with open(os.path.join(path, 'dataset.json'), 'w') as f:
        json.dump({'labels': [[f'{i}.png', int(ds.get_label(i).argmax())] for i in range(count)]}, f)
    images = torch.from_numpy(np.stack([ds[i][0] for i in range(count)])).float() / 127.5 - 1
    return images, torch.from_numpy(np.stack([ds.get_label(i) for i in range(count)]))

# How much better a net follows the right condition than a wrong one (< 1: it follows it). resizeN:
# the error of the samples' N x N downsample to the condition they were drawn with, over the error to
# the next image's condition; class: the reconstruction error with the true labels, over that with
# the next class's.
@torch.no_grad()
def _condition_ratio(net, images, labels):
    if net.condition == 'class':
        right, wrong = (net.encode(images, c)[1] - images for c in (labels, labels.roll(1, dims=1)))
        return float(right.square().mean() / wrong.square().mean())
    cond = net.make_condition(images)
    low = torch.nn.functional.adaptive_avg_pool2d(net(seeds=range(len(images)), condition=cond).images, cond.shape[-1])
    return float((low - cond).square().mean() / (low - cond.roll(1, 0)).square().mean())

# Conditional training through the CLI: the snapshot is conditional and follows its condition
# (measured: 0.08 for resize4, 0.86 for class), where an untrained net of the same options does
# not (0.97 to 1.02 over five seeds).
@pytest.mark.parametrize('extra', [['--condition=resize4'], ['--cond=True']])
def test_conditional_training(tmp_path, env, extra):
    outdir = tmp_path / 'out'
    if extra == ['--cond=True']:
        images, labels = _digit_folder(tmp_path / 'labels')
        data = ['--data', str(tmp_path / 'labels')]
    else:
        ds = DigitsDataset(resolution=16)
        images, labels, data = torch.from_numpy(np.stack([ds[i][0] for i in range(64)])).float() / 127.5 - 1, None, []
    proc = run_train([f'--outdir={outdir}', '--duration=0.001', *TINY, *extra, *data], env, cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = outdir / run_dirs(outdir)[0]
    assert (run_dir / 'samples-000000.png').exists()
    with open(sorted(run_dir.glob('network-snapshot-*.pkl'))[-1], 'rb') as f:
        snapshot = pickle.load(f)
    net = snapshot['ema']
    if extra == ['--cond=True']:
        assert 'class_embed' in proc.stdout                                 # Module summary.
        assert net.condition == 'class' and net.label_dim == 10
    else:
        assert net.condition == 'resize4'
    torch.manual_seed(0)
    untrained = dnnlib.util.construct_class_by_name(**snapshot['network_kwargs']).eval()
    trained_ratio, untrained_ratio = _condition_ratio(net, images, labels), _condition_ratio(untrained, images, labels)
    assert untrained_ratio > (0.9 if labels is None else 0.98), untrained_ratio
    assert trained_ratio < (0.5 if labels is None else 0.95), trained_ratio

# A duration whose image count is not exact in floating point (0.00205 Mimg * 1e6 = 2050.0000000000005):
# the run stops at 2050 images, not one step later.
def test_duration_in_whole_images(tmp_path, env):
    run_dir = tmp_path / 'run'
    result = run_train([f'--outdir={run_dir}', '--nosubdir', '--duration=0.00205', *TINY[:5], '--tick=10', '--snap=100',
                        '--dump=100', '--seed=1', '--workers=0'], env, cwd=str(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr
    state = checkpoint.load(checkpoint.latest(str(run_dir), snapshot_io.STATE_PATTERN))
    assert state['cur_nimg'] == 2050
