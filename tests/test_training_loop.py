"""Tests of the DDN loss and the training loop, in-process on tiny networks: loss reporting, one
training step, schedules, pictures, atomic files, resume equivalence and resume-config checks."""

import copy
import glob
import json
import math
import os
import sys

import numpy as np
import PIL.Image
import pytest
import torch

import dnnlib
from torch_utils import checkpoint, training_stats
from training import pictures, run_files, training_step
from training import snapshot as snapshot_io
from training import training_loop as tl
from training.ddl import DiscreteDistributionLayer
from training.loss import DDNLoss
from training.networks import DDNGenerator

# A tiny network for 8x8 grayscale images: 4 layers of K=8.
TINY_NET = dict(img_resolution=8, img_channels=1, max_blockn=1, max_outputk=8, max_channels=8)

# ----------------------------------------------------------------------------
# The loss is the mean over layers of the per-layer losses and reports first/mid/last layers.

def test_loss_is_mean_over_layers_and_reports_layers():
    torch.manual_seed(0)
    net = DDNGenerator(**TINY_NET, chain_dropout=0.0).train()
    images = torch.rand(6, 1, 8, 8) * 2 - 1
    collector = training_stats.Collector(regex='^Loss/')
    collector.update()
    loss = DDNLoss()(net=net, images=images)
    assert loss.shape == (6,) and loss.requires_grad
    with torch.no_grad():
        losses = net.eval()(target=images).losses                      # Same choices without chain dropout.
    torch.testing.assert_close(loss.detach(), losses.mean(1))
    collector.update()
    L = net.num_layers
    assert collector.num('Loss/loss') == 6
    assert collector.mean('Loss/loss') == pytest.approx(float(losses.mean()), rel=1e-5)
    assert collector.mean('Loss/layer_first') == pytest.approx(float(losses[:, 0].mean()), rel=1e-5)
    assert collector.mean('Loss/layer_mid') == pytest.approx(float(losses[:, L // 2].mean()), rel=1e-5)
    assert collector.mean('Loss/layer_last') == pytest.approx(float(losses[:, -1].mean()), rel=1e-5)

# An unconditional network ignores the labels the data loader hands over.
def test_loss_of_unconditional_net_ignores_labels():
    torch.manual_seed(0)
    net = DDNGenerator(**TINY_NET, chain_dropout=0.0).eval()
    images = torch.rand(2, 1, 8, 8) * 2 - 1
    with torch.no_grad():
        plain = DDNLoss()(net=net, images=images)
        for labels in (torch.zeros(2, 0), torch.eye(10)[:2]):
            torch.testing.assert_close(DDNLoss()(net=net, images=images, labels=labels), plain)

# ----------------------------------------------------------------------------
# One training step: accumulation over rounds equals one big round; weights move; stats fold.

def _step_setup(seed=0):
    torch.manual_seed(seed)
    net = DDNGenerator(**TINY_NET, chain_dropout=0.0).train()
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    return net, opt

def test_training_step_accumulation_equals_full_batch():
    images = torch.rand(8, 1, 8, 8) * 2 - 1
    net_a, opt_a = _step_setup()
    step_a = training_step.TrainingStep(net_a, net_a, DDNLoss(), opt_a, batch_size=8)
    step_a.accumulate(images)
    splits = step_a.update(lr=1e-2, ema_beta=0)
    net_b, opt_b = _step_setup()
    step_b = training_step.TrainingStep(net_b, net_b, DDNLoss(), opt_b, batch_size=8)
    step_b.accumulate(images[:4])
    step_b.accumulate(images[4:])
    step_b.update(lr=1e-2, ema_beta=0)
    for (name, a), b in zip(net_a.state_dict().items(), net_b.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    assert isinstance(splits, torch.Tensor) and splits.ndim == 0
    # Statistics were folded: every layer saw the 8 targets, and nothing is left pending.
    for ddl in net_a.ddls:
        assert float(ddl.node_stats.seen) == 8 and float(ddl.node_stats.count.sum()) == pytest.approx(8)
        assert float(ddl.node_stats.pending_seen) == 0
    # Gradients were consumed.
    assert all(p.grad is None for p in net_a.parameters())

def test_training_step_updates_ema_and_mirrors_splits():
    net, opt = _step_setup()
    ema = copy.deepcopy(net).eval().requires_grad_(False)
    before = {name: p.detach().clone() for name, p in net.named_parameters()}
    step = training_step.TrainingStep(net, ema, DDNLoss(), opt, batch_size=8)
    step.accumulate(torch.rand(8, 1, 8, 8) * 2 - 1)
    step.update(lr=1e-2, ema_beta=0.75)
    ema_params = dict(ema.named_parameters())
    for name, p in net.named_parameters():
        assert not torch.equal(before[name], p), f'{name} did not move'
        if not name.startswith('ddls.'):
            torch.testing.assert_close(ema_params[name], 0.75 * before[name] + 0.25 * p.detach())
    # The first step splits in every layer; the clone's rows follow in the EMA too.
    for ddl, ddl_ema in zip(net.ddls, ema.ddls, strict=True):
        assert int(ddl.node_stats.num_splits) == 1
        w, w_ema = ddl.weight.view(ddl.K, -1), ddl_ema.weight.view(ddl.K, -1)
        same = (w[:, None] == w[None]).all(-1) & ~torch.eye(ddl.K, dtype=torch.bool)
        pairs = same.nonzero().tolist()
        assert pairs
        for i, j in pairs:
            assert torch.equal(w_ema[i], w_ema[j])

# fp16 with loss scaling, on the CPU (torch's CPU autocast and GradScaler; train.py offers fp16 on
# CUDA only, where it is fast): the loss falls, and a step whose gradients overflow is skipped
# (weights unchanged, Split-and-Prune statistics still folded) and halves the scale.
def test_training_step_fp16_loss_scaling():
    net, opt = _step_setup()
    step = training_step.TrainingStep(net, net, DDNLoss(), opt, batch_size=8, precision='fp16')
    assert step.scaler.is_enabled() and step.scaler.get_scale() == 65536
    images = torch.rand(8, 1, 8, 8) * 2 - 1
    losses = []
    for _ in range(6):
        losses.append(float(step.accumulate(images).detach().mean()))
        step.update(lr=1e-2, ema_beta=0)
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0]
    before = {name: p.detach().clone() for name, p in net.named_parameters()}
    scale = step.scaler.get_scale()
    step.accumulate(images)
    next(net.parameters()).grad.view(-1)[0] = math.inf       # An overflow in one gradient.
    step.update(lr=1e-2, ema_beta=0)
    assert step.scaler.get_scale() == scale / 2
    for name, p in net.named_parameters():
        if not name.startswith('ddls.'):                     # DDL rows may still be split-copied.
            assert torch.equal(p, before[name]), name
    assert float(net.ddls[0].node_stats.seen) == 7 * 8

# bf16 on the CPU: the blocks' convolutions run under autocast in bf16, while every DDL selects
# and builds its candidates in fp32; the loss is the fp32 step's up to bf16 rounding, not equal to it.
# Convolutions are recorded at the dispatcher (below autocast): the blocks call the functional
# convolution with once-per-step low-precision weights, which module hooks would not see.
def test_training_step_bf16_on_cpu():
    from torch.utils._python_dispatch import TorchDispatchMode

    class ConvDtypes(TorchDispatchMode):
        def __init__(self, seen):
            super().__init__()
            self.seen = seen
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func.overloadpacket.__name__ in ('convolution', '_convolution', 'mkldnn_convolution'):
                self.seen.add(out.dtype)
            return out

    images = torch.rand(4, 1, 8, 8) * 2 - 1
    losses, convs, ddls = {}, {}, {}
    for precision in ('fp32', 'bf16'):
        net, opt = _step_setup()
        conv_dtypes, ddl_dtypes = convs[precision], ddls[precision] = set(), set()
        for m in net.modules():
            if isinstance(m, DiscreteDistributionLayer):
                m.register_forward_hook(lambda m, args, out, seen=ddl_dtypes: seen.update((out.image.dtype, out.dist.dtype)))
        step = training_step.TrainingStep(net, net, DDNLoss(), opt, batch_size=4, precision=precision)
        with ConvDtypes(conv_dtypes):
            losses[precision] = step.accumulate(images).detach()
        before = [p.detach().clone() for p in net.parameters()]
        step.update(lr=1e-3, ema_beta=0)
        assert all(torch.isfinite(p).all() for p in net.parameters())
        assert any(not torch.equal(a, p) for a, p in zip(before, net.parameters()))
    assert convs == dict(fp32={torch.float32}, bf16={torch.bfloat16})
    assert ddls == dict(fp32={torch.float32}, bf16={torch.float32})
    assert losses['bf16'].dtype == torch.float32
    rel = ((losses['bf16'] - losses['fp32']).abs() / losses['fp32']).max().item()
    assert 1e-5 < rel < 0.05, rel

# torch.compile of the training forward keeps what eager training does: the same losses and
# weights, Split-and-Prune statistics (buffers mutated inside the compiled graph) and splits (rows
# copied in place outside it), also after another state is loaded into the network (resume).
# Traced with the aot_eager backend (dynamo + AOT autograd, the layers where a mutation could be
# lost); inductor's C++ compilation takes minutes on CI's 2 CPU cores, so tests/test_cuda.py runs
# inductor on a GPU.
def test_training_step_compiled_matches_eager():
    images = torch.rand(8, 1, 8, 8) * 2 - 1
    resumed = _step_setup(seed=1)[0].state_dict()
    runs = []
    for compile in (False, 'aot_eager'):
        net, opt = _step_setup()
        step = training_step.TrainingStep(net, net, DDNLoss(), opt, batch_size=8, compile=compile)
        losses = []
        for i in range(4):
            if i == 3:      # Resume: another state loaded in place, as the training loop does.
                net.load_state_dict(resumed)
            losses.append(step.accumulate(images[:4]).detach())
            losses.append(step.accumulate(images[4:]).detach())
            step.update(lr=1e-2, ema_beta=0)
        runs.append((torch.cat(losses), net))
    (loss_e, net_e), (loss_c, net_c) = runs
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-5, atol=1e-6)
    for (name, a), b in zip(net_e.state_dict().items(), net_c.state_dict().values(), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5, msg=name)
    assert float(net_c.ddls[0].node_stats.seen) == float(resumed['ddls.0.node_stats.seen']) + 8
    assert int(net_c.ddls[0].node_stats.num_splits) > 0

# In bf16 the compiled blocks' outputs take the eager path's in-place next input (the DDL keeps its own
# fp32 copy): the same losses as eager bf16 (aot_eager: the same kernels), over steps with splits.
def test_training_step_compiled_bf16_matches_eager():
    images = torch.rand(8, 1, 8, 8) * 2 - 1
    runs = []
    for compile in (False, 'aot_eager'):
        net, opt = _step_setup()
        step = training_step.TrainingStep(net, net, DDNLoss(), opt, batch_size=8, compile=compile, precision='bf16')
        losses = []
        for _ in range(3):
            losses.append(step.accumulate(images).detach())
            step.update(lr=1e-2, ema_beta=0)
        runs.append(torch.cat(losses))
    torch.testing.assert_close(runs[1], runs[0], rtol=1e-5, atol=1e-6)

# ----------------------------------------------------------------------------
# Schedules.

def test_learning_rate_rampup():
    assert training_step.learning_rate(1e-3, 0, 0) == 1e-3                          # No ramp-up: full lr from step 0.
    assert training_step.learning_rate(1e-3, 0, 10) == 0
    assert training_step.learning_rate(1e-3, 5000, 10) == pytest.approx(5e-4)
    assert training_step.learning_rate(1e-3, 10**9, 10) == 1e-3

def test_ema_beta_half_life():
    # Half-life of 10 kimg with batch 1000: beta^10 = 1/2.
    beta = training_step.ema_beta(10**9, 1000, ema_halflife_kimg=10, ema_rampup_ratio=None)
    assert beta ** 10 == pytest.approx(0.5)
    # Ramp-up: early on the half-life is a fraction of the images seen.
    assert training_step.ema_beta(1000, 100, 10, 0.05) == pytest.approx(0.5 ** (100 / 50))

# ----------------------------------------------------------------------------
# Pictures and files.

def test_sample_grid_and_node_usage_plot_sizes():
    net = DDNGenerator(**TINY_NET).eval()
    grid = pictures.sample_grid(net)
    cell = 8 * 8                                                        # 8x8 images upscaled 8x.
    assert grid.size == (8 * (cell + pictures.GRID_GAP) - pictures.GRID_GAP,) * 2 and grid.mode == 'L'
    rgb = pictures.sample_grid(DDNGenerator(img_resolution=32, img_channels=3, max_blockn=1, max_outputk=4, max_channels=8).eval(), seeds=range(6))
    assert rgb.mode == 'RGB' and rgb.size == (3 * (64 + pictures.GRID_GAP) - pictures.GRID_GAP, 2 * (64 + pictures.GRID_GAP) - pictures.GRID_GAP)
    # Node usage: one panel per shown layer; bars follow the statistics.
    ddl = net.ddls[0]
    ddl.node_stats.count.copy_(torch.tensor([8.0, 0, 0, 0, 0, 0, 0, 0]))
    plot = pictures.node_usage_plot(net)
    assert plot.size == (pictures.USAGE_PANEL_SIZE[0], pictures.USAGE_PANEL_SIZE[1] * len(pictures.usage_layers(net.num_layers)))
    assert pictures.usage_layers(63) == [0, 31, 62] and pictures.usage_layers(1) == [0]
    summary = pictures.node_usage_summary(net)
    assert summary['dead_nodes'] == 7 and summary['usage_tv'] > 0

def test_save_bytes_atomic_and_append_line(tmp_path):
    path = tmp_path / 'a.json'
    checkpoint.save_atomic(b'{"x": 1}', path, mode='bytes')
    checkpoint.save_atomic(b'{"x": 2}', path, mode='bytes')
    assert json.loads(path.read_text()) == {'x': 2}
    assert os.listdir(tmp_path) == ['a.json']                          # No temporary file left.
    checkpoint.append_line(tmp_path / 's.jsonl', '{"a": 1}')
    checkpoint.append_line(tmp_path / 's.jsonl', '{"a": 2}\n')
    assert (tmp_path / 's.jsonl').read_text() == '{"a": 1}\n{"a": 2}\n'

# ----------------------------------------------------------------------------
# The training loop itself, in-process, on 8x8 digits.

def _loop_kwargs(run_dir, **overrides):
    kwargs = dict(
        run_dir=str(run_dir),
        dataset_kwargs=dnnlib.EasyDict(class_name='training.dataset.DigitsDataset', resolution=8, max_size=200),
        data_loader_kwargs=dnnlib.EasyDict(num_workers=0),
        network_kwargs=dnnlib.EasyDict(class_name='training.networks.DDNGenerator', **TINY_NET, dropout=0.1, chain_dropout=0.2),
        loss_kwargs=dnnlib.EasyDict(class_name='training.loss.DDNLoss'),
        optimizer_kwargs=dnnlib.EasyDict(class_name='torch.optim.Adam', lr=1e-2),
        balance_kwargs=dnnlib.EasyDict(method='tv'),
        seed=7, batch_size=20, batch_gpu=10, ema_halflife_kimg=0.1, lr_rampup_kimg=0.1,
        kimg_per_tick=0.1, snapshot_ticks=None, state_dump_ticks=1, device='cpu',
    )
    kwargs.update(overrides)
    os.makedirs(run_dir, exist_ok=True)
    return kwargs

def _final_state(run_dir):
    return checkpoint.load(checkpoint.latest(str(run_dir), snapshot_io.STATE_PATTERN))

def _assert_states_equal(a, b):
    for key in ('net', 'ema'):
        assert a[key].keys() == b[key].keys()
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), f'{key}.{name} differs'
    for sa, sb in zip(a['optimizer']['state'].values(), b['optimizer']['state'].values(), strict=True):
        for name in sa:
            assert torch.equal(sa[name], sb[name]), f'optimizer {name} differs'
    assert a['cur_nimg'] == b['cur_nimg']

# N steps == N/2 steps + resume + N/2 steps, bit for bit: weights, EMA, Adam state and the DDL
# statistics (buffers of net), with dropout and chain dropout drawing random numbers.
def test_resume_equivalence(tmp_path):
    tl.training_loop(**_loop_kwargs(tmp_path / 'full', total_kimg=0.4))
    tl.training_loop(**_loop_kwargs(tmp_path / 'half', total_kimg=0.2))
    half = checkpoint.latest(str(tmp_path / 'half'), snapshot_io.STATE_PATTERN)
    assert checkpoint.load(half)['cur_nimg'] == 200
    tl.training_loop(**_loop_kwargs(tmp_path / 'resumed', total_kimg=0.4, resume_state=half))
    full, resumed = _final_state(tmp_path / 'full'), _final_state(tmp_path / 'resumed')
    assert full['cur_nimg'] == 400
    _assert_states_equal(full, resumed)
    stats = full['net']
    assert float(stats['ddls.3.node_stats.seen']) == 400
    assert float(stats['ddls.3.node_stats.num_splits']) > 0           # Split-and-Prune did work.
    # The loop wrote one stats line per tick (4 + the single-step tick 0 ... here 5 ticks).
    lines = (tmp_path / 'full' / 'stats.jsonl').read_text().splitlines()
    assert len(lines) == 5 and json.loads(lines[-1])['Progress/kimg']['mean'] == pytest.approx(0.4)

def test_resume_from_other_config_is_refused(tmp_path):
    tl.training_loop(**_loop_kwargs(tmp_path / 'a', total_kimg=0.04))
    state = checkpoint.latest(str(tmp_path / 'a'), snapshot_io.STATE_PATTERN)
    other_net = dnnlib.EasyDict(_loop_kwargs(tmp_path / 'b')['network_kwargs'], max_outputk=4)
    with pytest.raises(ValueError, match=r'another configuration:\n  network_kwargs.max_outputk: 8 in the state, 4 now'):
        tl.training_loop(**_loop_kwargs(tmp_path / 'b', total_kimg=0.08, resume_state=state, network_kwargs=other_net))
    other_data = dnnlib.EasyDict(_loop_kwargs(tmp_path / 'c')['dataset_kwargs'], max_size=100)
    with pytest.raises(ValueError, match='dataset.num_images: 200 in the state, 100 now'):
        tl.training_loop(**_loop_kwargs(tmp_path / 'c', total_kimg=0.08, resume_state=state, dataset_kwargs=other_data))
    assert not glob.glob(str(tmp_path / 'b' / '*')) and not glob.glob(str(tmp_path / 'c' / '*'))

# The base learning rate is an option the loop reads (optimizer_kwargs.lr), never one read back out of the optimizer.
def test_loop_requires_the_base_learning_rate(tmp_path):
    with pytest.raises(ValueError, match='optimizer_kwargs must give lr'):
        tl.training_loop(**_loop_kwargs(tmp_path / 'a', total_kimg=0.04, optimizer_kwargs=dnnlib.EasyDict(class_name='torch.optim.Adam')))
    assert not os.listdir(tmp_path / 'a')

# A precision is checked once (training_step.autocast_dtype), by the step and by the loop before its setup.
def test_unknown_precision_is_refused(tmp_path):
    net, opt = _step_setup()
    with pytest.raises(ValueError, match=r"precision must be one of \['fp32', 'bf16', 'fp16'\], got 'fp8'"):
        training_step.TrainingStep(net, net, DDNLoss(), opt, batch_size=8, precision='fp8')
    # Before the setup: a dataset that cannot be built would fail later, with another error.
    unbuildable = dnnlib.EasyDict(class_name='training.dataset.NoSuchDataset')
    with pytest.raises(ValueError, match='precision must be one of'):
        tl.training_loop(**_loop_kwargs(tmp_path / 'a', total_kimg=0.04, precision='fp8', dataset_kwargs=unbuildable))
    assert not os.listdir(tmp_path / 'a')

# Transfer: weights come from the snapshot, statistics start from zero.
def test_transfer_weights(tmp_path):
    tl.training_loop(**_loop_kwargs(tmp_path / 'a', total_kimg=0.04, snapshot_ticks=1))
    pkl = checkpoint.latest(str(tmp_path / 'a'), snapshot_io.SNAPSHOT_PATTERN)
    src = run_files.load_transfer_network(pkl)
    net = DDNGenerator(**TINY_NET)
    run_files.transfer_weights(src, net)
    for (name, a), b in zip(net.named_parameters(), src.parameters(), strict=True):
        assert torch.equal(a, b), name
    assert all(float(d.node_stats.seen) == 0 for d in net.ddls)
    with pytest.raises(ValueError, match='does not match'):
        run_files.transfer_weights(src, DDNGenerator(**dict(TINY_NET, max_outputk=4)))
    # Snapshot pictures exist with the expected sizes.
    grid = PIL.Image.open(glob.glob(str(tmp_path / 'a' / 'samples-*.png'))[0])
    assert grid.size == (8 * (64 + pictures.GRID_GAP) - pictures.GRID_GAP,) * 2
    assert np.asarray(grid).std() > 0

# ----------------------------------------------------------------------------
# The hot loop never asks the device for a value: no .item(), .tolist(), bool(), int() or float() of a
# tensor during a training step (each would be a host sync on CUDA).
def test_training_step_has_no_host_syncs(monkeypatch):
    net, opt = _step_setup()
    ema = copy.deepcopy(net).eval().requires_grad_(False)
    step = training_step.TrainingStep(net, ema, DDNLoss(), opt, batch_size=8)
    images = torch.rand(8, 1, 8, 8) * 2 - 1

    # Adam keeps its step counter on the CPU (capturable=False): reading it is no device sync.
    def guard(name):
        original = getattr(torch.Tensor, name)
        def checked(self, *args, **kwargs):
            caller = sys._getframe(1).f_code.co_filename.replace(os.sep, '/')
            if '/torch/optim/' in caller:
                return original(self, *args, **kwargs)
            raise AssertionError(f'host sync in the training step: Tensor.{name} called from {caller}')
        return checked
    for name in ('item', 'tolist', '__bool__', '__int__', '__float__', '__index__'):
        monkeypatch.setattr(torch.Tensor, name, guard(name))
    for _ in range(3):
        step.accumulate(images[:4])
        step.accumulate(images[4:])
        step.update(lr=1e-3, ema_beta=0.9)
    monkeypatch.undo()
    assert int(net.ddls[0].node_stats.seen) == 24
