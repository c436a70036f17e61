"""Tests of torch_utils: distributed helpers (single process, and a real 2-process gloo run),
persistence pickles loaded in a fresh interpreter, training statistics, misc helpers and checkpoints.

Run as a script (`torchrun --nproc_per_node=2 tests/test_torch_utils.py OUT_DIR`), this file is the
worker of the 2-process test: each rank writes what it observed to OUT_DIR/rank<r>.json.
"""

import copy
import json
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch

import dnnlib
from torch_utils import checkpoint, distributed, misc, persistence, training_stats

# ----------------------------------------------------------------------------
# Persistent test modules (module level, so a fresh process can import them by name).

@persistence.persistent_class
class TinyInner(torch.nn.Module):
    def __init__(self,
        width,                  # Features in and out.
        gain    = 1.0,          # Output multiplier (behaviour that only the constructor knows).
    ):
        super().__init__()
        self.gain = gain
        self.linear = torch.nn.Linear(width, width)
        self.register_buffer('running_mean', torch.zeros(width))

    # Affine map, scaled, shifted by the running mean buffer.
    def forward(self, x):
        return self.linear(x) * self.gain + self.running_mean

# Outer persistent module with a persistent child, a non-persistent buffer and a positional argument.
@persistence.persistent_class
class TinyNet(torch.nn.Module):
    def __init__(self,
        width,                  # Features.
        depth   = 2,            # Number of inner blocks.
        gain    = 1.0,          # Passed to the blocks.
    ):
        super().__init__()
        self.blocks = torch.nn.ModuleList([TinyInner(width, gain=gain) for _ in range(depth)])
        self.register_buffer('steps', torch.zeros([], dtype=torch.int64))
        self.register_buffer('scratch', torch.arange(width, dtype=torch.float32), persistent=False)
        self.dropout = torch.nn.Dropout(0.5)

    # Blocks in sequence, plus the non-persistent buffer (rebuilt by the constructor).
    def forward(self, x):
        for block in self.blocks:
            x = torch.tanh(block(x))
        return self.dropout(x) + self.scratch

# Give a TinyNet non-default parameters and buffers, so a reload cannot match by accident.
def _randomized_net(seed=1):
    torch.manual_seed(seed)
    net = TinyNet(4, depth=3, gain=0.5)
    with torch.no_grad():
        for block in net.blocks:
            block.running_mean.normal_()
        net.steps.fill_(123)
    return net

# ----------------------------------------------------------------------------
# Distributed helpers without torchrun: a single process, collectives are no-ops.

def test_distributed_single_process(monkeypatch, capsys):
    monkeypatch.delenv('WORLD_SIZE', raising=False)
    distributed.init()
    assert distributed.get_rank() == 0 and distributed.get_world_size() == 1 and distributed.get_local_rank() == 0
    assert distributed.device() == (torch.device('cuda', 0) if torch.cuda.is_available() else torch.device('cpu'))
    a, b = torch.tensor([1.0, 2.0]), torch.tensor([3], dtype=torch.int64)
    assert distributed.all_reduce_([a, b]) == [a, b]
    assert a.tolist() == [1.0, 2.0] and b.tolist() == [3]
    distributed.broadcast_([a])
    distributed.barrier()
    assert a.tolist() == [1.0, 2.0]
    for op in ('average', 'mean', 'product'):
        with pytest.raises(ValueError, match='op'):
            distributed.all_reduce_([a], op=op)
    distributed.print0('only rank zero', 7)
    assert capsys.readouterr().out == 'only rank zero 7\n'

# WORLD_SIZE > 1 without the rest of torchrun's variables is a clear error, not a hang.
def test_distributed_init_incomplete_env(monkeypatch):
    monkeypatch.setenv('WORLD_SIZE', '2')
    for name in ('RANK', 'LOCAL_RANK', 'MASTER_ADDR', 'MASTER_PORT'):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(RuntimeError, match='torchrun'):
        distributed.init()

# ----------------------------------------------------------------------------
# The 2-process run: all_reduce_, broadcast_, training_stats, check_ddp_consistency, sampler.

def test_two_process_gloo(tmp_path, subprocess_env, repo_root):
    out_dir = tmp_path / 'ranks'
    out_dir.mkdir()
    env = dict(subprocess_env, OMP_NUM_THREADS='1', CUDA_VISIBLE_DEVICES='')  # gloo on CPU even on GPU hosts
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
           str(repo_root / 'tests' / 'test_torch_utils.py'), str(out_dir)]
    proc = subprocess.run(cmd, check=False, env=env, cwd=str(tmp_path), capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, f'torchrun failed:\n{proc.stdout}\n{proc.stderr}'
    r0, r1 = (json.loads((out_dir / f'rank{rank}.json').read_text()) for rank in (0, 1))
    for rank, res in enumerate((r0, r1)):
        assert res['rank'] == rank and res['world_size'] == 2
        # all_reduce_ (sum) over mixed dtypes and a non-contiguous view.
        assert res['sum_float'] == [[10.0, 12.0, 14.0], [16.0, 18.0, 20.0]]
        assert res['sum_int'] == [3, 30]
        assert res['sum_view_base'] == [3.0, 0.0, 3.0, 0.0]
        assert res['max'] == [1.0] and res['min'] == [0.0] and res['bool_max'] == [True]
        assert res['broadcast'] == [5.0, 6.0]
        # training_stats: rank 0 reported [1, 2], rank 1 [2, 4]; report0 only rank 0's 7.
        stats = res['stats1']
        assert stats['Dist/value'] == {'num': 4, 'mean': 2.25, 'std': pytest.approx(np.std([1, 2, 2, 4]))}
        assert stats['Dist/rank0'] == {'num': 1, 'mean': 7.0, 'std': 0.0}
        # Second interval: only the new values (0 and 1) count; report0's name keeps its old values.
        assert res['stats2']['Dist/value'] == {'num': 2, 'mean': 0.5, 'std': 0.5}
        assert res['stats2']['Dist/rank0']['mean'] == 7.0
        assert 'different statistic names' in res['name_mismatch_error']
        assert res['consistent_ok'] is True
        assert res['inconsistent_error'] is not None and 'Linear.bias' in res['inconsistent_error']
        assert 'Linear.weight' not in res['inconsistent_error']
    # The two ranks' sampler streams interleave into the single-process global stream.
    single = misc.InfiniteSampler(10, seed=3, start_idx=4)
    it = iter(single)
    expected = [next(it) for _ in range(12)]
    assert [x for pair in zip(r0['sampler'], r1['sampler'], strict=True) for x in pair] == expected

# Body of one rank of the 2-process run (see test_two_process_gloo).
def _distributed_worker(out_dir):
    distributed.init()
    rank, world = distributed.get_rank(), distributed.get_world_size()
    res = {'rank': rank, 'world_size': world}

    a = torch.arange(6, dtype=torch.float32).reshape(2, 3) + 10 * rank
    b = torch.tensor([rank + 1, 10 * (rank + 1)], dtype=torch.int64)
    base = torch.zeros(4)
    view = base[::2]
    view.fill_(rank + 1)
    distributed.all_reduce_([a, b, view])
    res.update(sum_float=a.tolist(), sum_int=b.tolist(), sum_view_base=base.tolist())
    m = torch.tensor([float(rank)])
    distributed.all_reduce_([m], op='max')
    low = torch.tensor([float(rank)])
    distributed.all_reduce_([low], op='min')
    flag = torch.tensor([rank == 1])
    distributed.all_reduce_([flag], op='max')
    res.update(max=m.tolist(), min=low.tolist(), bool_max=flag.tolist())
    x = torch.tensor([rank * 5.0, rank * 6.0])
    distributed.broadcast_([x], src=1)
    res['broadcast'] = x.tolist()

    training_stats.report('Dist/value', torch.tensor([1.0, 2.0]) * (rank + 1))
    training_stats.report0('Dist/rank0', rank + 7)
    collector = training_stats.Collector(regex='^Dist/')
    collector.update()
    res['stats1'] = collector.as_dict()
    training_stats.report('Dist/value', [float(rank)])
    training_stats.report0('Dist/rank0', [])
    collector.update()
    res['stats2'] = collector.as_dict()

    # Same number of names but different names: detected on every rank.
    training_stats.report(f'Mismatch/rank{rank}', 1.0)
    try:
        training_stats.Collector(regex='^Mismatch/').update()
        res['name_mismatch_error'] = ''
    except RuntimeError as err:
        res['name_mismatch_error'] = str(err)

    torch.manual_seed(0)
    net = torch.nn.Linear(3, 2)
    misc.check_ddp_consistency(net)
    res['consistent_ok'] = True
    with torch.no_grad():
        net.bias += rank
    try:
        misc.check_ddp_consistency(net)
        res['inconsistent_error'] = None
    except AssertionError as err:
        res['inconsistent_error'] = str(err)

    sampler = misc.InfiniteSampler(10, rank=rank, num_replicas=world, seed=3, start_idx=4)
    it = iter(sampler)
    res['sampler'] = [next(it) for _ in range(6)]

    with open(os.path.join(out_dir, f'rank{rank}.json'), 'w') as f:
        json.dump(res, f)
    distributed.barrier()
    distributed.shutdown()

# ----------------------------------------------------------------------------
# @persistent_class records constructor arguments as EasyDict / tuple copies.

def test_persistent_class_records_arguments():
    net = TinyNet(4, depth=1, gain=2.0)
    assert persistence.is_persistent(net) and persistence.is_persistent(TinyNet)
    assert not persistence.is_persistent(torch.nn.Linear(1, 1))
    assert net.init_args == (4,) and isinstance(net.init_kwargs, dnnlib.EasyDict)
    assert net.init_kwargs == {'depth': 1, 'gain': 2.0}
    assert net.blocks[0].init_args == (4,) and net.blocks[0].init_kwargs == {'gain': 2.0}
    kwargs = {'hidden': [1, 2]}
    recorded = TinyNetWithList(**kwargs)
    kwargs['hidden'].append(3)
    assert recorded.init_kwargs.hidden == [1, 2]  # a copy, not a reference to the caller's list
    with pytest.raises(TypeError):
        persistence.persistent_class(dict)

# Persistent module whose argument is mutable (to check the recorded copy is independent).
@persistence.persistent_class
class TinyNetWithList(torch.nn.Module):
    def __init__(self,
        hidden,                 # List of layer widths.
    ):
        super().__init__()
        self.layers = torch.nn.ModuleList([torch.nn.Linear(w, w) for w in hidden])

# The pickle holds class name, arguments and state dict, not the object's private attributes.
def test_persistent_pickle_in_process():
    net = _randomized_net().eval().requires_grad_(False)
    net._debug_note = 'private-attribute-not-in-pickle'
    data = pickle.dumps(net)
    assert b'private-attribute-not-in-pickle' not in data
    clone = pickle.loads(data)
    assert type(clone) is TinyNet and clone.init_kwargs == net.init_kwargs
    assert not hasattr(clone, '_debug_note')
    assert not clone.training and not any(p.requires_grad for p in clone.parameters())
    for (name, t1), (_, t2) in zip(misc.named_params_and_buffers(net), misc.named_params_and_buffers(clone), strict=True):
        assert torch.equal(t1, t2), name
    x = torch.randn(5, 4)
    assert torch.equal(net(x), clone(x))
    # training mode is restored too.
    assert pickle.loads(pickle.dumps(_randomized_net().train())).training

# A snapshot written here loads in a fresh interpreter and computes the same outputs.
def test_persistent_pickle_in_fresh_process(tmp_path, subprocess_env):
    net = _randomized_net().eval()
    x = torch.randn(6, 4)
    with open(tmp_path / 'snapshot.pkl', 'wb') as f:
        pickle.dump({'ema': net, 'x': x}, f)
    script = (
        'import pickle, sys, torch\n'
        'data = pickle.load(open(sys.argv[1], "rb"))\n'
        'net = data["ema"]\n'
        'assert "torch_utils.persistence" in sys.modules\n'
        'torch.save({"y": net(data["x"]), "steps": int(net.steps), "kwargs": dict(net.init_kwargs),'
        ' "module": type(net).__module__}, sys.argv[2])\n'
    )
    proc = subprocess.run([sys.executable, '-c', script, str(tmp_path / 'snapshot.pkl'), str(tmp_path / 'out.pt')],
                          check=False, env=subprocess_env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = torch.load(tmp_path / 'out.pt')
    assert torch.equal(out['y'], net(x))
    assert out['steps'] == 123 and out['kwargs'] == {'depth': 3, 'gain': 0.5}
    assert out['module'] == TinyNet.__module__

# deepcopy gives an independent live copy with identical parameters and all buffers.
def test_persistent_deepcopy():
    net = _randomized_net()
    with torch.no_grad():
        net.scratch.mul_(3)  # non-persistent buffer: deepcopy (unlike pickle) keeps its value
    net.requires_grad_(False)
    clone = copy.deepcopy(net)
    assert type(clone) is TinyNet and clone.init_kwargs == net.init_kwargs
    assert clone.init_kwargs is not net.init_kwargs
    for (name, t1), (_, t2) in zip(misc.named_params_and_buffers(net), misc.named_params_and_buffers(clone), strict=True):
        assert torch.equal(t1, t2), name
        assert t1.data_ptr() != t2.data_ptr(), name
    assert torch.equal(clone.scratch, net.scratch)
    with torch.no_grad():
        net.blocks[0].linear.weight.add_(1)
        net.steps.add_(1)
    assert not torch.equal(clone.blocks[0].linear.weight, net.blocks[0].linear.weight)
    assert int(clone.steps) == 123
    assert not any(p.requires_grad for p in clone.parameters())

# Classes defined inside a function cannot be re-imported, so pickling them is a clear error.
def test_persistent_local_class_is_rejected():
    @persistence.persistent_class
    class Local(torch.nn.Module):
        def __init__(self, width=2):
            super().__init__()
            self.linear = torch.nn.Linear(width, width)
    with pytest.raises(TypeError, match='module level'):
        pickle.dumps(Local())

# An undecorated subclass of a persistent class pickles the ordinary way (and still round-trips).
def test_undecorated_subclass_pickles_normally():
    sub = _PlainSubclass(3)
    assert not persistence.is_persistent(sub) and 'init_kwargs' not in sub.__dict__
    clone = pickle.loads(pickle.dumps(sub))
    assert type(clone) is _PlainSubclass and torch.equal(clone.linear.weight, sub.linear.weight)

# Undecorated subclass used above.
class _PlainSubclass(TinyInner):
    pass

# ----------------------------------------------------------------------------
# training_stats: per-interval mean / std / num, regex selection, keep_previous, report0.

def test_training_stats_single_process():
    values = np.array([1.0, 2.0, 4.0, 8.0])
    assert training_stats.report('T1/loss', torch.tensor(values[:2])) is not None
    training_stats.report('T1/loss', values[2:].tolist())
    training_stats.report('T1/scalar', 3)
    training_stats.report0('T1/zero', torch.ones(2, 2))
    training_stats.report('Other/x', 1.0)
    collector = training_stats.Collector(regex='^T1/')
    collector.update()
    assert collector.names() == ['T1/loss', 'T1/scalar', 'T1/zero']
    assert collector.num('T1/loss') == 4
    assert collector.mean('T1/loss') == pytest.approx(values.mean())
    assert collector.std('T1/loss') == pytest.approx(values.std())
    assert collector.num('T1/zero') == 4 and collector.mean('T1/zero') == 1.0 and collector.std('T1/zero') == 0.0
    assert collector['T1/scalar'] == 3.0
    assert collector.as_dict() == {
        'T1/loss': {'num': 4, 'mean': pytest.approx(3.75), 'std': pytest.approx(values.std())},
        'T1/scalar': {'num': 1, 'mean': 3.0, 'std': 0.0},
        'T1/zero': {'num': 4, 'mean': 1.0, 'std': 0.0},
    }
    assert np.isnan(collector.mean('Other/x')) and collector.num('Other/x') == 0

    # Next interval: only what was reported since the last update; silent names keep old values.
    training_stats.report('T1/loss', [10.0])
    collector.update()
    assert collector.num('T1/loss') == 1 and collector.mean('T1/loss') == 10.0
    assert collector.mean('T1/scalar') == 3.0
    fresh = training_stats.Collector(regex='^T1/', keep_previous=False)
    fresh.update()
    training_stats.report('T1/loss', [20.0])
    fresh.update()
    assert fresh.mean('T1/loss') == 20.0 and np.isnan(fresh.mean('T1/scalar')) and fresh.num('T1/scalar') == 0
    # NaN is reported, not hidden.
    training_stats.report('T1/nan', float('nan'))
    fresh.update()
    assert np.isnan(fresh.mean('T1/nan')) and fresh.num('T1/nan') == 1

# report() never reads values back to the host (here: such calls would raise).
def test_training_stats_report_does_not_read_values(monkeypatch):
    value = torch.tensor([1.0, 3.0])
    for name in ('item', 'tolist', 'numpy', 'cpu', '__bool__', '__float__'):
        monkeypatch.setattr(torch.Tensor, name, _fail_host_read)
    training_stats.report('T2/loss', value)
    training_stats.report('T2/loss', value * 2)
    monkeypatch.undo()
    collector = training_stats.Collector(regex='^T2/')
    collector.update()
    assert collector.num('T2/loss') == 4 and collector.mean('T2/loss') == 3.0

# Stand-in for Tensor methods that would read a value back to the host.
def _fail_host_read(*_args, **_kwargs):
    raise AssertionError('host read during report()')

# On CUDA, report() must not synchronise with the host at all.
@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')
def test_training_stats_report_no_cuda_sync():
    value = torch.arange(4.0, device='cuda')
    training_stats.report('T3/cuda', value)  # first call allocates the accumulator
    torch.cuda.set_sync_debug_mode('error')
    try:
        training_stats.report('T3/cuda', value)
    finally:
        torch.cuda.set_sync_debug_mode('default')
    collector = training_stats.Collector(regex='^T3/')
    collector.update()
    assert collector.num('T3/cuda') == 8 and collector.mean('T3/cuda') == 1.5

# ----------------------------------------------------------------------------
# InfiniteSampler: epochs are permutations, reshuffled per epoch, deterministic, resumable.

def test_infinite_sampler_epochs_and_determinism():
    n = 7
    it = iter(misc.InfiniteSampler(n, seed=5))
    stream = [next(it) for _ in range(4 * n)]
    epochs = [stream[i * n : (i + 1) * n] for i in range(4)]
    assert all(sorted(epoch) == list(range(n)) for epoch in epochs)
    assert len({tuple(epoch) for epoch in epochs}) > 1  # reshuffled between epochs
    it2 = iter(misc.InfiniteSampler(n, seed=5))
    assert [next(it2) for _ in range(4 * n)] == stream
    it3 = iter(misc.InfiniteSampler(n, seed=6))
    assert [next(it3) for _ in range(4 * n)] != stream
    ordered = iter(misc.InfiniteSampler(list(range(3)), shuffle=False))
    assert [next(ordered) for _ in range(7)] == [0, 1, 2, 0, 1, 2, 0]

# Ranks interleave the global stream, and start_idx resumes it exactly (any number of ranks).
def test_infinite_sampler_ranks_and_resume():
    n = 10
    it = iter(misc.InfiniteSampler(n, seed=1))
    stream = [next(it) for _ in range(40)]
    for start in (0, 6, 13):
        resumed = iter(misc.InfiniteSampler(n, seed=1, start_idx=start))
        assert [next(resumed) for _ in range(40 - start)] == stream[start:]
    for replicas in (2, 3):
        iters = [iter(misc.InfiniteSampler(n, rank=r, num_replicas=replicas, seed=1, start_idx=6)) for r in range(replicas)]
        merged = [next(iters[i % replicas]) for i in range(24)]
        assert merged == stream[6:30]
    with pytest.raises(ValueError):
        misc.InfiniteSampler(0)
    with pytest.raises(ValueError):
        misc.InfiniteSampler(5, rank=2, num_replicas=2)

# The sampler uses its own generator: the global RNG is neither read nor advanced.
def test_infinite_sampler_leaves_global_rng_alone():
    torch.manual_seed(123)
    state = torch.get_rng_state()
    it = iter(misc.InfiniteSampler(50, seed=0))
    first = [next(it) for _ in range(120)]
    assert torch.equal(torch.get_rng_state(), state)
    torch.manual_seed(999)
    it = iter(misc.InfiniteSampler(50, seed=0))
    assert [next(it) for _ in range(120)] == first

# Works as a DataLoader sampler.
def test_infinite_sampler_with_dataloader():
    data = torch.utils.data.TensorDataset(torch.arange(9))
    loader = iter(torch.utils.data.DataLoader(data, batch_size=4, sampler=misc.InfiniteSampler(data, seed=2)))
    batches = [next(loader)[0] for _ in range(3)]
    it = iter(misc.InfiniteSampler(9, seed=2))
    assert torch.cat(batches).tolist() == [next(it) for _ in range(12)]

# ----------------------------------------------------------------------------
# set_seed_for_step: a pure function of (seed, rank, step) for both the global RNG and the generator.

def test_set_seed_for_step():
    # Seed for (seed, rank, step), then draw from the global RNG and from the returned generator.
    def draw(seed, rank, step):
        gen = misc.set_seed_for_step(seed, rank, step)
        return torch.rand(4).tolist(), torch.rand(4, generator=gen).tolist()
    a = draw(0, 0, 10)
    torch.rand(100)  # unrelated use of the global RNG in between
    assert draw(0, 0, 10) == a
    assert draw(0, 0, 11) != a and draw(0, 1, 10) != a and draw(1, 0, 10) != a
    assert a[0] != a[1]  # the generator's stream is not the global one
    with pytest.raises(ValueError):
        misc.set_seed_for_step(-1, 0, 0)

# ----------------------------------------------------------------------------
# copy_params_and_buffers copies by name, converts dtype, keeps requires_grad, checks shapes.
def test_copy_params_and_buffers():
    src, dst = _randomized_net(seed=1), _randomized_net(seed=2).double()
    with torch.no_grad():
        dst.steps.zero_()
    misc.copy_params_and_buffers(src, dst, require_all=True)
    for (name, t1), (_, t2) in zip(misc.named_params_and_buffers(src), misc.named_params_and_buffers(dst), strict=True):
        assert torch.equal(t1.double() if t1.is_floating_point() else t1, t2), name
    assert dst.blocks[0].linear.weight.dtype == torch.float64 and dst.blocks[0].linear.weight.requires_grad
    assert len(misc.params_and_buffers(src)) == 3 * 3 + 2  # 3 blocks x (weight, bias, running_mean) + steps + scratch
    small = TinyNet(4, depth=1)
    misc.copy_params_and_buffers(small, dst)  # partial copy is fine without require_all
    assert torch.equal(dst.blocks[0].linear.weight, small.blocks[0].linear.weight.double())
    with pytest.raises(KeyError, match='blocks.1'):
        misc.copy_params_and_buffers(small, TinyNet(4, depth=2), require_all=True)
    with pytest.raises(ValueError, match='shape'):
        misc.copy_params_and_buffers(TinyNet(3), TinyNet(4))

# check_ddp_consistency in one process: alone it issues no collective. As rank 1 of a pretend
# 2-process run (rank 0's tensors supplied by a stand-in broadcast, the max-reduce left to this
# rank), it names exactly the tensors that differ from rank 0, treats equal NaNs as equal, and
# skips the names that `ignore_regex` matches.
def test_ddp_helpers_single_process(monkeypatch):
    net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
    with torch.no_grad():
        net[0].weight[0, 0] = float('nan')

    def no_collective(*args, **kwargs):
        raise AssertionError('a collective in a single process')
    monkeypatch.setattr(misc.distributed, 'broadcast_', no_collective)
    monkeypatch.setattr(misc.distributed, 'all_reduce_', no_collective)
    assert misc.check_ddp_consistency(net) is None

    rank0_shift = {}         # dtype -> what rank 0 has more than this rank in every tensor of that dtype.
    def broadcast_(tensors, src=0):
        assert src == 0
        for t in tensors:
            t += rank0_shift.get(t.dtype, 0)
        return tensors
    monkeypatch.setattr(misc.distributed, 'get_world_size', lambda: 2)
    monkeypatch.setattr(misc.distributed, 'broadcast_', broadcast_)
    monkeypatch.setattr(misc.distributed, 'all_reduce_', lambda tensors, op='sum': tensors)
    misc.check_ddp_consistency(net)                                    # Identical (NaN included): fine.
    rank0_shift[torch.int64] = 1                                       # The step counter differs ...
    with pytest.raises(AssertionError, match='differ across ranks') as err:
        misc.check_ddp_consistency(net)
    assert str(err.value).endswith(': Sequential.1.num_batches_tracked')  # ... and only it is named.
    misc.check_ddp_consistency(net, ignore_regex=r'.*num_batches_tracked')
    rank0_shift[torch.float32] = 0.5                                   # Every float tensor differs too.
    with pytest.raises(AssertionError) as err:
        misc.check_ddp_consistency(net, ignore_regex=r'Sequential\.0\..*')
    assert str(err.value).endswith(': Sequential.1.weight, Sequential.1.bias, Sequential.1.running_mean, '
                                   'Sequential.1.running_var, Sequential.1.num_batches_tracked')

# print_module_summary prints one row per module and the true totals.
def test_print_module_summary(capsys):
    net = TinyNet(4, depth=2)
    out = misc.print_module_summary(net, [torch.zeros(3, 4)])
    assert out.shape == (3, 4)
    text = capsys.readouterr().out
    assert 'blocks.0.linear' in text and 'blocks.1' in text and '[3, 4]' in text
    total_row = next(line for line in text.splitlines() if line.startswith('Total'))
    assert total_row.split()[1:3] == [str(sum(p.numel() for p in net.parameters())), str(sum(b.numel() for b in net.buffers()))]

# ----------------------------------------------------------------------------
# save_atomic + load round trip in both modes; nothing temporary is left behind.

@pytest.mark.parametrize('mode', ['torch', 'pickle'])
def test_checkpoint_roundtrip(tmp_path, mode):
    obj = {'step': 7, 'tensor': torch.arange(5.0), 'net': _randomized_net()}
    path = tmp_path / ('training-state-000007.pt' if mode == 'torch' else 'network-snapshot-000007.pkl')
    checkpoint.save_atomic(obj, str(path), mode=mode)
    assert [p.name for p in tmp_path.iterdir()] == [path.name]
    loaded = checkpoint.load(str(path))
    assert loaded['step'] == 7 and torch.equal(loaded['tensor'], obj['tensor'])
    assert torch.equal(loaded['net'].blocks[1].running_mean, obj['net'].blocks[1].running_mean)
    with pytest.raises(ValueError):
        checkpoint.save_atomic(obj, str(path), mode='json')

# A save that fails midway leaves the previous file intact and no temporary file.
def test_checkpoint_failed_save_keeps_old_file(tmp_path):
    path = tmp_path / 'training-state-000001.pt'
    checkpoint.save_atomic({'v': 1}, str(path))
    before = path.read_bytes()
    with pytest.raises(RuntimeError, match='unpicklable'):
        checkpoint.save_atomic({'v': 2, 'bad': _Unpicklable()}, str(path), mode='pickle')
    with pytest.raises(RuntimeError, match='unpicklable'):
        checkpoint.save_atomic({'v': 2, 'bad': _Unpicklable()}, str(path), mode='torch')
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == [path.name]
    assert checkpoint.load(str(path)) == {'v': 1}

# An object whose pickling fails after some bytes may have been written.
class _Unpicklable:
    # Refuse to be pickled.
    def __reduce__(self):
        raise RuntimeError('unpicklable object')

# Missing and corrupt files give errors that name the file.
def test_checkpoint_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match='nope.pt'):
        checkpoint.load(str(tmp_path / 'nope.pt'))
    good = tmp_path / 'good.pt'
    checkpoint.save_atomic({'x': torch.ones(1000)}, str(good))
    truncated = tmp_path / 'truncated.pt'
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(RuntimeError, match='truncated.pt'):
        checkpoint.load(str(truncated))
    garbage = tmp_path / 'garbage.pkl'
    garbage.write_bytes(b'not a pickle at all')
    with pytest.raises(RuntimeError, match='garbage.pkl'):
        checkpoint.load(str(garbage))

# latest() picks the largest number and ignores temporary and unrelated files; of several patterns, ties go to the first.
def test_checkpoint_latest(tmp_path):
    assert checkpoint.latest(str(tmp_path), 'training-state-*.pt') is None
    assert checkpoint.latest(str(tmp_path / 'missing'), 'training-state-*.pt') is None
    for name in ('training-state-000100.pt', 'training-state-000900.pt', 'training-state-001000.pt.tmp-42',
                 'training-state-000950.pt.bak', 'network-snapshot-002000.pkl', 'training-state-000200.pt'):
        (tmp_path / name).write_bytes(b'')
    assert checkpoint.latest(str(tmp_path), 'training-state-*.pt') == str(tmp_path / 'training-state-000900.pt')
    assert checkpoint.latest(str(tmp_path), 'network-snapshot-*.pkl') == str(tmp_path / 'network-snapshot-002000.pkl')
    assert checkpoint.latest(str(tmp_path), ('network-snapshot-*.pkl', 'training-state-*.pt')) == str(tmp_path / 'network-snapshot-002000.pkl')
    # Several patterns: the largest number of all; at equal numbers the earlier pattern's file.
    (tmp_path / 'network-snapshot-002000.safetensors').write_bytes(b'')
    assert checkpoint.latest(str(tmp_path), ('network-snapshot-*.safetensors', 'network-snapshot-*.pkl')).endswith('002000.safetensors')
    assert checkpoint.latest(str(tmp_path), ('network-snapshot-*.pkl', 'network-snapshot-*.safetensors')).endswith('002000.pkl')
    assert checkpoint.latest(str(tmp_path), ('training-state-*.pt', 'network-snapshot-*.pkl')).endswith('002000.pkl')
    with pytest.raises(ValueError):
        checkpoint.latest(str(tmp_path), 'training-state.pt')

# ----------------------------------------------------------------------------

if __name__ == '__main__':
    _distributed_worker(sys.argv[1])

# ----------------------------------------------------------------------------
# The one --device convention and the one atomic writer.

def test_pick_device_and_device_option():
    import click
    from click.testing import CliRunner
    from cli import device_option
    from torch_utils.distributed import pick_device
    assert pick_device(None) == pick_device('auto') == distributed.device()
    assert pick_device('cpu') == torch.device('cpu')
    with pytest.raises(ValueError, match='not a device'):
        pick_device('gpu0')
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match='CUDA is not available'):
            pick_device('cuda')

    @click.command()
    @device_option()
    def cmd(device):
        click.echo(f'device={pick_device(device)}')
    assert CliRunner().invoke(cmd, []).output.strip() == f'device={distributed.device()}'
    assert CliRunner().invoke(cmd, ['--device', 'cpu']).output.strip() == 'device=cpu'
    bad = CliRunner().invoke(cmd, ['--device', 'gpu0'])
    assert bad.exit_code == 2 and '--device' in bad.output and 'not a device' in bad.output

def test_write_atomic_keeps_the_old_file_on_error(tmp_path):
    from torch_utils.checkpoint import write_atomic
    path = tmp_path / 'sub' / 'out.json'
    write_atomic(path, lambda f: f.write('{"a": 1}'), mode='w')      # Creates the folder.
    assert path.read_text() == '{"a": 1}'
    def fail(f):
        f.write('half')
        raise RuntimeError('disk full')
    with pytest.raises(RuntimeError, match='disk full'):
        write_atomic(path, fail, mode='w')
    assert path.read_text() == '{"a": 1}'                             # The old file, whole.
    assert sorted(p.name for p in path.parent.iterdir()) == ['out.json']  # No temporary left behind.
    with pytest.raises(ValueError, match="mode must be"):
        write_atomic(path, lambda f: None, mode='a')

# ----------------------------------------------------------------------------
# checkpoint.check_writable: the one writable-place check of the scripts' outputs (cli.check_writable).

def test_check_writable(tmp_path, monkeypatch):
    from torch_utils.checkpoint import check_writable
    check_writable(tmp_path / 'new' / 'deeper' / 'out.png')            # Missing folders can be made.
    check_writable(tmp_path)                                          # An existing folder.
    (tmp_path / 'file').write_text('x')
    with pytest.raises(ValueError, match='is a file, not a folder'):
        check_writable(tmp_path / 'file' / 'out.png')
    # Without write permission (simulated: root may write anywhere), the nearest existing folder is named.
    monkeypatch.setattr(os, 'access', lambda path, mode: os.fspath(path) != str(tmp_path))
    with pytest.raises(ValueError, match=f'no permission to write in {tmp_path}$'):
        check_writable(tmp_path / 'a' / 'b.png')

# A reset forgets what was reported (a diverged run's NaN), also for a collector made before it.
def test_training_stats_reset_clears_old_totals():
    collector = training_stats.Collector(regex='^Test/reset$')
    training_stats.report('Test/reset', torch.tensor([float('nan')]))
    collector.update()
    assert np.isnan(collector.mean('Test/reset'))
    training_stats.reset()
    training_stats.report('Test/reset', torch.tensor([1.0, 3.0]))
    collector.update()
    assert collector.num('Test/reset') == 2 and collector.mean('Test/reset') == 2.0
