"""Training in bf16 / fp16 without fp32 copies kept for backward: GroupNorm in the input's dtype and the
DDL's chosen head from the low-precision features (bit-identical to the fp32 copy it replaces), with
CUDA autocast's policy for group_norm imitated on the CPU (bench/step_cost.py), so that what these
tests check is what a GPU run keeps. fp32 paths stay exactly nn.GroupNorm / torch.bmm."""

import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from training.ddl import DiscreteDistributionLayer, _float_bmm
from training.networks import Block, DDNGenerator, GroupNorm

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / 'bench'))
try:
    from step_cost import cuda_autocast_policy
finally:
    sys.path.pop(0)

# dtype -> bytes of the tensors autograd saves for backward while `fn()` runs (unique storages,
# parameters excluded).
def _saved_bytes(fn, params=()):
    exclude = {p.untyped_storage()._cdata for p in params}
    seen = {}
    def pack(t):
        st = t.untyped_storage()
        if st._cdata not in exclude:
            seen[st._cdata] = (st.nbytes(), t.dtype, t)
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    by_dtype = {}
    for nbytes, dtype, _ in seen.values():
        by_dtype[dtype] = by_dtype.get(dtype, 0) + nbytes
    return out, by_dtype

def test_group_norm_fp32_is_nn_group_norm():
    torch.manual_seed(0)
    ours, ref = GroupNorm(4, 16, eps=1e-6), nn.GroupNorm(4, 16, eps=1e-6)
    with torch.no_grad():
        ours.weight.normal_(), ours.bias.normal_()
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(3, 16, 5, 5, requires_grad=True)
    a, b = ours(x), ref(x)
    assert torch.equal(a, b)
    ga = torch.autograd.grad(a.square().sum(), [x, ours.weight, ours.bias])
    gb = torch.autograd.grad(b.square().sum(), [x, ref.weight, ref.bias])
    for u, v in zip(ga, gb, strict=True):
        assert torch.equal(u, v)

@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16])
def test_group_norm_keeps_the_input_dtype_under_autocast(dtype):
    torch.manual_seed(0)
    norm = GroupNorm(4, 16, eps=1e-6)
    x = torch.randn(2, 16, 8, 8).to(dtype).requires_grad_()
    with cuda_autocast_policy(), torch.autocast('cpu', dtype=dtype):
        y, saved = _saved_bytes(lambda: norm(x), norm.parameters())
    assert y.dtype == dtype
    assert torch.float32 not in saved, saved        # CUDA autocast would keep an fp32 copy of x.
    # Statistics in fp32: the result is the fp32 GroupNorm rounded to the dtype (one rounding).
    ref = nn.functional.group_norm(x.float(), 4, norm.weight, norm.bias, 1e-6)
    torch.testing.assert_close(y.float(), ref, rtol=0, atol=2 * torch.finfo(dtype).eps * ref.abs().max().item())
    y.float().square().sum().backward()
    assert x.grad.dtype == dtype and norm.weight.grad.dtype == torch.float32

def test_float_bmm_is_bmm_of_the_fp32_copy_bit_for_bit():
    torch.manual_seed(0)
    w = torch.randn(6, 3, 8, requires_grad=True)
    f = torch.randn(6, 8, 20).bfloat16().requires_grad_()
    out, saved = _saved_bytes(lambda: _float_bmm(w, f))
    ref = torch.bmm(w, f.float())
    assert out.dtype == torch.float32 and torch.equal(out, ref)
    # w and the one fp32 copy of f (backward casts nothing more); f itself is not kept.
    assert saved == {torch.float32: (w.numel() + f.numel()) * 4}, saved
    g = torch.randn_like(out)
    ga = torch.autograd.grad(out, [w, f], g)
    gb = torch.autograd.grad(ref, [w, f], g)
    assert ga[1].dtype == torch.bfloat16
    for u, v in zip(ga, gb, strict=True):
        assert torch.equal(u, v)

# The DDL's training path under bf16 autocast keeps one fp32 copy of the features (the selection's,
# which backward reads) and nothing of the bf16 features themselves (so the generator may overwrite
# them), and gives the same image, codes and gradients as the fp32 copy of the same bf16 features did.
def test_ddl_keeps_one_fp32_copy_of_the_features():
    torch.manual_seed(0)
    B, Cf, H = 4, 32, 8
    layer = DiscreteDistributionLayer(Cf, 3, 16, chain_dropout=0).train()
    feat = torch.randn(B, Cf, H, H).bfloat16().requires_grad_()
    target, prev = torch.randn(B, 3, H, H), torch.randn(B, 3, H // 2, H // 2)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out, saved = _saved_bytes(lambda: layer(feat, prev, target=target), layer.parameters())
    assert feat.numel() * 4 <= saved.get(torch.float32, 0) < feat.numel() * 4 * 5 // 4, saved
    assert saved.get(torch.bfloat16, 0) == 0, saved
    feat32 = feat.detach().float().requires_grad_()
    ref = DiscreteDistributionLayer(Cf, 3, 16, chain_dropout=0).train()
    ref.load_state_dict(layer.state_dict())
    out32 = ref(feat32, prev, target=target)
    assert torch.equal(out.codes, out32.codes) and torch.equal(out.image, out32.image)
    (g_feat,) = torch.autograd.grad(out.loss.sum(), [feat])
    (g_feat32,) = torch.autograd.grad(out32.loss.sum(), [feat32])
    assert torch.equal(g_feat, g_feat32.bfloat16())

# A whole block under bf16 autocast (CUDA's policy imitated): nothing saved in fp32 but the first
# block's own fp32 input, which exists anyway.
def test_block_saves_bf16_activations_only():
    torch.manual_seed(0)
    block = Block(16, 16)
    x = torch.randn(2, 16, 8, 8).bfloat16().requires_grad_()
    with cuda_autocast_policy(), torch.autocast('cpu', dtype=torch.bfloat16):
        y, saved = _saved_bytes(lambda: block(x), block.parameters())
    assert y.dtype == torch.bfloat16
    assert saved.get(torch.float32, 0) == 0, saved

# The same, for the generator's training forward: fp32 tensors saved are a small fraction.
def test_generator_training_forward_saves_mostly_bf16():
    torch.manual_seed(0)
    net = DDNGenerator(img_resolution=8, img_channels=3, max_channels=32, max_blockn=2, max_outputk=8, chain_dropout=0).train()
    images = torch.rand(4, 3, 8, 8) * 2 - 1
    with cuda_autocast_policy(), torch.autocast('cpu', dtype=torch.bfloat16):
        out, saved = _saved_bytes(lambda: net(target=images), net.parameters())
    assert saved.get(torch.float32, 0) < 0.25 * sum(saved.values()), saved
    out.losses.mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in net.parameters() if p.grad is not None)

# GroupNorm + SiLU under autocast keeps only its input for backward (the normalised value is
# recomputed), with the same output and gradients as autograd through the two ops, bit for bit.
def test_norm_silu_keeps_only_its_input_and_matches_autograd():
    torch.manual_seed(0)
    norm = GroupNorm(4, 16, eps=1e-6)
    with torch.no_grad():
        norm.weight.normal_(), norm.bias.normal_()
    x = torch.randn(2, 16, 8, 8).bfloat16().requires_grad_()
    with torch.autocast('cpu', dtype=torch.bfloat16):
        y, saved = _saved_bytes(lambda: norm.norm_silu(x), norm.parameters())
        ref = nn.functional.silu(norm(x))
    assert torch.equal(y, ref)
    assert sum(saved.values()) < x.numel() * x.element_size() + 1024, saved   # x (+ the weights cast to bf16).
    g = torch.randn_like(y)
    ga = torch.autograd.grad(y, [x, norm.weight, norm.bias], g)
    gb = torch.autograd.grad(ref, [x, norm.weight, norm.bias], g)
    for u, v in zip(ga, gb, strict=True):
        assert torch.equal(u, v)

# The generator's next-block input (the chosen image into the first C channels, the leak map into the
# last C) equals the padded sum it replaces (each sum rounded once to the features' dtype), values and
# gradients, in fp32 and bf16, with and without a leak, and with overlapping channels (Cf < 2C).
@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
@pytest.mark.parametrize('Cf,with_leak', [(8, True), (8, False), (4, True)])
def test_add_into_channels_equals_the_padded_sum(dtype, Cf, with_leak):
    from training.networks import _AddIntoChannels
    torch.manual_seed(0)
    C = 3
    def inputs():
        torch.manual_seed(1)
        feat = torch.randn(2, Cf, 5, 5).to(dtype).requires_grad_()
        image = torch.randn(2, C, 5, 5, requires_grad=True)
        leak = torch.randn(2, C, 5, 5, requires_grad=True) if with_leak else None
        return feat, image, leak
    def padded(feat, image, leak):      # Each sum in fp32, rounded once to feat's dtype.
        x = (feat + nn.functional.pad(image, (0, 0, 0, 0, 0, Cf - C))).to(dtype)
        if leak is not None:
            x = (x + nn.functional.pad(leak, (0, 0, 0, 0, Cf - C, 0))).to(dtype)
        return x
    grad = torch.randn(2, Cf, 5, 5).to(dtype)
    results = []
    for fn in (padded, _AddIntoChannels.apply):
        feat, image, leak = inputs()
        out = fn(feat, image, leak)
        out.backward(grad)
        results.append([out.detach(), feat.grad, image.grad] + ([leak.grad] if with_leak else []))
    for a, b in zip(*results, strict=True):
        assert a.dtype == b.dtype and torch.equal(a, b)

# The training step's once-per-step low-precision weights (training/low_precision.py) give the same
# weights, bit for bit, as autocast's cast at every use: two steps of two accumulation rounds, bf16
# and fp16 (GradScaler); and no parameter is cast inside the forward.
@pytest.mark.parametrize('precision', ['bf16', 'fp16'])
def test_step_weights_equal_autocast_casts(precision):
    from torch.utils._python_dispatch import TorchDispatchMode

    from training.loss import DDNLoss
    from training.training_step import TrainingStep

    class ParamCasts(TorchDispatchMode):
        def __init__(self, params):
            super().__init__()
            self.ids, self.n = {p.untyped_storage()._cdata for p in params}, 0
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket.__name__ == '_to_copy' and args[0].untyped_storage()._cdata in self.ids:
                self.n += 1
            return func(*args, **(kwargs or {}))

    images = torch.rand(8, 1, 16, 16) * 2 - 1
    states = []
    for use_copies in (False, True):
        torch.manual_seed(0)
        net = DDNGenerator(img_resolution=16, img_channels=1, max_channels=32, max_blockn=2, max_outputk=8, chain_dropout=0.0).train()
        opt = torch.optim.Adam(net.parameters(), lr=1e-2)
        step = TrainingStep(net, net, DDNLoss(), opt, batch_size=8, precision=precision)
        assert step.weights is not None and len(step.weights.params) > 10
        if not use_copies:
            step.weights = None
        for _ in range(2):
            casts = ParamCasts(net.parameters())
            with casts:
                step.accumulate(images[:4])
                step.accumulate(images[4:])
            assert (casts.n == 0) == use_copies, casts.n
            step.update(lr=1e-2, ema_beta=0)
        states.append({k: v.clone() for k, v in net.state_dict().items()})
    for k in states[0]:
        assert torch.equal(states[0][k], states[1][k]), k

# Weights changed outside update() (a loaded state, a test) reach the next step's copies.
def test_step_weights_refresh_after_outside_changes():
    from training.loss import DDNLoss
    from training.training_step import TrainingStep
    torch.manual_seed(0)
    net = DDNGenerator(img_resolution=8, img_channels=1, max_channels=16, max_blockn=1, max_outputk=4, chain_dropout=0.0).train()
    step = TrainingStep(net, net, DDNLoss(), torch.optim.SGD(net.parameters(), lr=0.0), batch_size=4, precision='bf16')
    images = torch.rand(4, 1, 8, 8) * 2 - 1
    loss0 = step.accumulate(images).detach()
    step.update(lr=0.0, ema_beta=0)
    with torch.no_grad():
        for p in step.weights.params:
            p.mul_(2)
    loss1 = step.accumulate(images).detach()
    step.weights = None
    step.net.zero_grad(set_to_none=True)
    assert not torch.equal(loss0, loss1)
    assert torch.equal(loss1, step.accumulate(images).detach())

# Under low precision the generator builds each next-block input in the place of the block output
# (nothing else reads or saved it): the same losses, codes and gradients, bit for bit, as building
# it in a copy, and no copy of a block output is made.
def test_next_input_in_place_equals_a_copy():
    from torch.utils._python_dispatch import TorchDispatchMode

    class Clones(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.shapes = []
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket.__name__ == 'clone' and args[0].dtype == torch.bfloat16:
                self.shapes.append(tuple(args[0].shape))
            return func(*args, **(kwargs or {}))

    images = torch.rand(4, 3, 8, 8) * 2 - 1
    runs = []
    for inplace in (True, False):
        torch.manual_seed(0)
        net = DDNGenerator(img_resolution=8, img_channels=3, max_channels=32, max_blockn=2, max_outputk=8, chain_dropout=0).train()
        if not inplace:
            copy = net._next_input
            net._next_input = lambda feat, image, leak, inplace=False: copy(feat, image, leak, False)
        clones = Clones()
        with cuda_autocast_policy(), torch.autocast('cpu', dtype=torch.bfloat16), clones:
            out = net(target=images)
            out.losses.mean().backward()
        feature_copies = [s for s in clones.shapes if len(s) == 4 and s[1] == 32]
        assert (len(feature_copies) == 0) == inplace, feature_copies
        runs.append([out.losses.detach(), out.codes] + [p.grad for p in net.parameters()])
    for a, b in zip(*runs, strict=True):
        assert (a is None and b is None) or torch.equal(a, b)

# An upsampling block runs its 1x1 skip before the nearest upsampling: the values and gradients of
# the skip after it (EDM's order), up to rounding, in fp32.
def test_upsampling_skip_before_the_upsampling():
    torch.manual_seed(0)
    block = Block(16, 32, up=True).double()
    x = torch.randn(2, 16, 4, 4, dtype=torch.float64, requires_grad=True)
    def edm_order(x):
        h = block.norm0.norm_silu(x)
        h, x = (nn.functional.interpolate(t, scale_factor=2, mode='nearest') for t in (h, x))
        h = block.conv1(block.norm1.norm_silu(block.conv0(h)))
        return (h + block.skip(x)) * 0.5 ** 0.5
    g = torch.randn(2, 32, 8, 8, dtype=torch.float64)
    results = []
    for fn in (block, edm_order):
        y = fn(x)
        results.append([y, *torch.autograd.grad(y, [x, block.skip.weight, block.conv0.weight], g)])
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
