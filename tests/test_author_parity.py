"""The default single-shot network is the author's block for block (DDN.md §4): a learned 1x1 skip on
every upsampling block, EDM initialisation, GroupNorm eps 1e-6, the reference parameter count, and the
condition injected at every scale up to the output resolution."""

import math
import pickle

import pytest
import torch

from training.image_ops import grayscale
from training.networks import Block, DDNGenerator

def test_reference_cifar10_parameter_count():
    # The author's CIFAR-10 network (--max-blockn=32 --max-outputk=64) has 76,291,840 parameters.
    with torch.device('meta'):
        net = DDNGenerator(32, 3, max_blockn=32, max_outputk=64)
    assert sum(p.numel() for p in net.parameters()) == 76_291_840
    assert net.num_layers == 63

def test_block_layout_and_edm_init():
    torch.manual_seed(0)
    up = Block(16, 16, up=True, resample_proj=True)
    assert up.skip is not None and up.skip.kernel_size == (1, 1)          # Even though channels do not change.
    assert Block(16, 16, up=True).skip is None and Block(16, 16).skip is None
    assert Block(8, 16).skip is not None
    assert up.norm0.eps == up.norm1.eps == 1e-6
    for conv, gain in ((up.conv0, 1.0), (up.conv1, 1e-5), (up.skip, 1.0)):
        fan_in, fan_out = conv.in_channels * conv.kernel_size[0] ** 2, conv.out_channels * conv.kernel_size[0] ** 2
        bound = math.sqrt(6 / (fan_in + fan_out)) * gain
        assert conv.weight.abs().max() <= bound and conv.weight.abs().max() > 0.9 * bound   # xavier_uniform x gain.
        assert torch.equal(conv.bias, torch.zeros_like(conv.bias))
    # Every residual branch starts near zero: the block is its skip path to ~1e-5.
    x = torch.randn(2, 16, 4, 4)
    skip = torch.nn.functional.interpolate(up.skip(x), scale_factor=2, mode='nearest') * math.sqrt(0.5)
    assert (up(x) - skip).abs().max() < 1e-3 * skip.abs().max()
    net = DDNGenerator(8, 3, max_blockn=2, max_outputk=8, max_channels=16)
    assert all(block.skip is not None for block in net.blocks if block.up)

def test_condition_enters_at_every_scale_up_to_the_output():
    with torch.device('meta'):
        net = DDNGenerator(32, 3, condition='color')
    assert net.condition_sizes == [1, 2, 4, 8, 16, 32]
    # Behaviour: a condition detail that exists only at 32x32 (a checkerboard, flat at 16x16 and
    # below) must reach the output of a 32x32 conditional net.
    torch.manual_seed(0)
    net = DDNGenerator(32, 3, max_blockn=2, max_outputk=8, max_channels=16, condition='color').eval()
    with torch.no_grad():  # Like a trained net: residual branches far from their 1e-5 start.
        for block in net.blocks:
            block.conv1.weight.mul_(1e5)
    base = grayscale(torch.rand(2, 3, 32, 32) * 2 - 1)
    checker = ((torch.arange(32)[:, None] + torch.arange(32)[None]) % 2).float() * 0.5 - 0.25
    assert torch.allclose(torch.nn.functional.avg_pool2d(checker[None, None], 2), torch.zeros(1, 1, 16, 16))
    codes = net.sample_codes([0, 1])
    a = net.decode(codes, condition=base)
    b = net.decode(codes, condition=base + checker)
    assert (a - b).abs().max() > 1e-3

def test_old_snapshot_layout_is_refused_clearly():
    net = DDNGenerator(8, 1, max_blockn=1, max_outputk=8, max_channels=16)
    state = {k: v for k, v in net.state_dict().items() if not k.startswith('blocks.1.skip.')}
    with pytest.raises(ValueError, match='predates the reference block layout'):
        DDNGenerator(8, 1, max_blockn=1, max_outputk=8, max_channels=16).load_state_dict(state)
    # The same message comes out of unpickling such a snapshot.
    raw = pickle.dumps(dict(ema=net))
    meta = net.__reduce_ex__(4)[1][0]
    meta['state_dict'] = state
    old = pickle.dumps(dict(ema=_Old(meta)))
    assert raw != old
    with pytest.raises(ValueError, match='predates'):
        pickle.loads(old)

class _Old:
    def __init__(self, meta):
        self.meta = meta

    def __reduce__(self):
        from torch_utils.persistence import _reconstruct_persistent_obj
        return _reconstruct_persistent_obj, (self.meta,)

def test_eval_forwards_keep_tf32_off_like_training():
    # Training turns cuDNN TF32 off; evaluation forwards (batch_invariant) must not turn it on,
    # or selection would see another precision on Ampere/Hopper GPUs.
    from training.networks import batch_invariant
    before = torch.backends.cudnn.allow_tf32
    try:
        torch.backends.cudnn.allow_tf32 = True
        with batch_invariant():
            assert torch.backends.cudnn.allow_tf32 is False
        assert torch.backends.cudnn.allow_tf32 is True
    finally:
        torch.backends.cudnn.allow_tf32 = before
