"""Fewer operators per training step, the same numbers: the gradient clean-up of TrainingStep.update
in a few operators instead of one per parameter, and the DDL statistics without per-layer `ones`
tensors (counted below autograd, where every operator launches a kernel on a GPU)."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from training.loss import DDNLoss
from training.networks import DDNGenerator
from training.training_step import TrainingStep, nan_to_num_

# Counts aten operators by name.
class _Ops(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names = {}
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        self.names[name] = self.names.get(name, 0) + 1
        return func(*args, **(kwargs or {}))

def test_nan_to_num_equals_the_per_tensor_form():
    torch.manual_seed(0)
    special = torch.tensor([float('nan'), float('inf'), -float('inf'), 3e5, -2e6, 1e-30])
    tensors = [torch.randn(5, 3), special.clone(), torch.randn(7).double(), torch.randn(2, 4, 3, 3).bfloat16(),
               torch.randn(2, 4, 3, 3).contiguous(memory_format=torch.channels_last)]
    tensors[2][1] = float('inf')
    tensors[3][0, 0, 0, 0] = float('nan')
    tensors[4][1, 2, 0, 1] = -float('inf')
    expected = [torch.nan_to_num(t, nan=0, posinf=1e5, neginf=-1e5) for t in tensors]
    ops = _Ops()
    with ops:
        nan_to_num_(tensors, nan=0, posinf=1e5, neginf=-1e5)
    for t, e in zip(tensors, expected, strict=True):
        assert t.dtype == e.dtype and torch.equal(t, e)
    assert ops.names.get('nan_to_num', 0) == 3                  # One per dtype (fp32, fp64, bf16).

def test_update_cleans_all_gradients_in_one_nan_to_num():
    torch.manual_seed(0)
    net = DDNGenerator(img_resolution=8, img_channels=3, max_channels=16, max_blockn=2, max_outputk=8).train()
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    step = TrainingStep(net, net, DDNLoss(), opt, batch_size=4)
    step.accumulate(torch.rand(4, 3, 8, 8) * 2 - 1)
    params = [p for p in net.parameters() if p.grad is not None]
    assert len(params) > 20
    params[0].grad.view(-1)[0] = float('nan')
    params[-1].grad.view(-1)[-1] = float('inf')
    ops = _Ops()
    with ops:
        step.update(lr=1e-3, ema_beta=0)
    assert ops.names.get('nan_to_num', 0) == 1
    assert all(torch.isfinite(p).all() for p in net.parameters())

# The statistics of one training selection take no `ones` tensor (the counts add a constant view).
def test_selection_statistics_allocate_no_ones():
    torch.manual_seed(0)
    net = DDNGenerator(img_resolution=8, img_channels=3, max_channels=16, max_blockn=2, max_outputk=8, chain_dropout=0).train()
    ops = _Ops()
    with ops:
        net(target=torch.rand(4, 3, 8, 8) * 2 - 1)
    assert 'ones_like' not in ops.names and 'ones' not in ops.names, ops.names
    for ddl in net.ddls:
        assert float(ddl.node_stats.pending_count.sum()) == 4

# Regional compilation: every block shape gets its own graph (the digits net has 9, more than torch's
# default recompile limit of 8, which would leave the last in eager without a word), with no graph
# break in bf16 either; the compiled calls are installed only during the training forward, so the
# network stays picklable and eager.
def test_compiled_regions_cover_every_block_shape():
    import pickle

    import torch._dynamo
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    net = DDNGenerator(img_resolution=16, img_channels=1, max_channels=32, max_blockn=3, max_outputk=64, chain_dropout=0.0).train()
    shapes = set()
    hooks = [b.register_forward_pre_hook(lambda m, args: shapes.add((tuple(args[0].shape), m.up, m.skip is not None,
                                                                     m.conv0.out_channels))) for b in net.blocks]
    net(target=torch.rand(4, 1, 16, 16) * 2 - 1)
    for h in hooks:
        h.remove()
    assert len(shapes) > 8
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    step = TrainingStep(net, net, DDNLoss(), opt, batch_size=4, compile='eager', precision='bf16')
    step.accumulate(torch.rand(4, 1, 16, 16) * 2 - 1)
    step.update(lr=1e-3, ema_beta=0)
    assert counters['stats']['unique_graphs'] == len(shapes)
    assert sum(counters['graph_break'].values()) == 0
    assert all(b._compiled_call_impl is None for b in net.blocks)
    pickle.dumps(net)

# Channels-last only with the compiled blocks: eager GroupNorm would copy every NHWC map to NCHW.
def test_channels_last_needs_compile():
    import pytest
    net = DDNGenerator(img_resolution=8, img_channels=3, max_channels=16, max_blockn=2, max_outputk=8).train()
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    with pytest.raises(ValueError, match='channels_last=True needs compile=True'):
        TrainingStep(net, net, DDNLoss(), opt, batch_size=4, channels_last=True)
    step = TrainingStep(net, net, DDNLoss(), opt, batch_size=4, channels_last=True, compile='eager')
    assert net.blocks[0].conv0.weight.is_contiguous(memory_format=torch.channels_last)
    del step

# The statistics of a training forward, recorded for all layers together on exit (batched_statistics),
# equal recording each layer's batch at once, exactly, with the selection bias on and off.
@pytest.mark.parametrize('bias_active', [False, True])
def test_batched_statistics_equal_per_layer_recording(monkeypatch, bias_active):
    import contextlib

    import training.networks as networks
    torch.manual_seed(0)
    net = DDNGenerator(img_resolution=8, img_channels=3, max_channels=16, max_blockn=2, max_outputk=8, chain_dropout=0.0).train()
    for m in net.ddls:
        m.node_stats.bias_active = bias_active
        m.node_stats.select_bias.copy_(torch.randn(m.K, dtype=torch.float64) * 0.1 * bias_active)
    images = torch.rand(6, 3, 8, 8) * 2 - 1
    def pending():
        out = [t.clone() for m in net.ddls for t in m.node_stats.pending_tensors()]
        for m in net.ddls:
            for t in m.node_stats.pending_tensors():
                t.zero_()
        return out
    codes = net(target=images).codes
    batched = pending()
    monkeypatch.setattr(networks, 'batched_statistics', lambda model: contextlib.nullcontext())
    assert torch.equal(net(target=images).codes, codes)
    single = pending()
    assert len({m.K for m in net.ddls}) < len(net.ddls)     # Some node sets were recorded as a group.
    for a, b in zip(batched, single, strict=True):
        assert torch.equal(a, b)
    assert sum(float(t.sum()) for t in batched) > 0

# Chain dropout of the network, drawn once per forward for all layers: each layer drops (its whole
# batch takes random codes) with probability chain_dropout, independently; the codes are uniform in
# [0, K) of that layer; and the draws reach the layers (p = 1: layer 0 never keeps the nearest codes).
def test_network_chain_dropout_draws():
    torch.manual_seed(3)
    p, steps, B = 0.25, 2000, 8
    net = DDNGenerator(img_resolution=8, img_channels=1, max_channels=8, max_blockn=2, max_outputk=16, chain_dropout=p).train()
    from training.ddl import DiscreteDistributionLayer
    layers = [DiscreteDistributionLayer(8, 1, k, chain_dropout=p) for k in (4, 16, 7, 16)]      # Mixed K.
    ks = [m.K for m in layers]
    drops, hist = torch.zeros(len(ks)), [torch.zeros(k) for k in ks]
    pair = 0
    for _ in range(steps):
        draws = net._chain_dropout(layers, B, torch.device('cpu'))
        d = torch.stack([dr for dr, _ in draws]).float()
        drops += d
        pair += float(d[0] * d[1])
        for l, (_, c) in enumerate(draws):
            assert c.shape == (B,) and int(c.min()) >= 0 and int(c.max()) < ks[l]
            hist[l] += torch.bincount(c, minlength=ks[l]).float()
    sd = (p * (1 - p) / steps) ** 0.5
    assert torch.all((drops / steps - p).abs() < 4 * sd), drops / steps
    assert abs(pair / steps - p * p) < 4 * (p * p * (1 - p * p) / steps) ** 0.5       # Independent layers.
    for h in hist:
        assert (h / h.sum() - 1 / h.numel()).abs().max() < 0.2 / h.numel() ** 0.5
    images = torch.rand(32, 1, 8, 8) * 2 - 1
    nearest = net.eval()(target=images).codes[:, 0]
    net.train()
    for m in net.ddls:
        m.chain_dropout = 1.0
    assert (net(target=images).codes[:, 0] != nearest).float().mean() > 0.5
    for m in net.ddls:
        m.chain_dropout = 0.0
    assert torch.equal(net(target=images).codes[:, 0], nearest)
    assert net._chain_dropout(net.ddls, B, torch.device('cpu')) is None
