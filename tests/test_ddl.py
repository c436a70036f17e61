"""Tests of the Discrete Distribution Layer: shapes, selection, residual, leak, chain dropout, precision."""

import pytest
import torch

from training.ddl import DiscreteDistributionLayer, reference_heads, resize_area, upsample

# Brute-force selection distances: materialise every candidate and compare.
def brute_distances(layer, feat, prev, target, H):
    cand = layer.all_heads(feat[:, :layer.head_channels])
    if layer.learn_residual and prev is not None:
        cand = cand + upsample(prev, H)[:, None]
    diff = cand - resize_area(target, H)[:, None]
    return (diff.square() if layer.loss_type == 'l2' else diff.abs()).mean((2, 3, 4))

@pytest.mark.parametrize('C', [1, 3])
@pytest.mark.parametrize('leak', [True, False])
@pytest.mark.parametrize('learn_residual', [True, False])
@pytest.mark.parametrize('loss_type', ['l2', 'l1'])
def test_shapes_and_nearest_selection(C, leak, learn_residual, loss_type):
    torch.manual_seed(0)
    B, Cf, H, K = 5, 16, 8, 12
    layer = DiscreteDistributionLayer(Cf, C, K, learn_residual=learn_residual, leak=leak,
                                      chain_dropout=0.0, loss_type=loss_type).eval()
    feat = torch.randn(B, Cf, H, H)
    prev = torch.randn(B, C, H // 2, H // 2)
    target = torch.randn(B, C, 2 * H, 2 * H)
    out = layer(feat, prev, target=target)
    assert out.image.shape == (B, C, H, H) and out.image.dtype == torch.float32
    assert out.codes.shape == (B,) and out.codes.dtype == torch.int64
    assert out.loss.shape == (B,)
    assert (out.leak is not None) == leak
    if leak:
        assert out.leak.shape == (B, C, H, H)
    brute = brute_distances(layer, feat, prev, target, H)
    torch.testing.assert_close(out.dist, brute, rtol=1e-4, atol=1e-5)
    assert torch.equal(out.codes, brute.argmin(1))
    # The loss is that of the chosen candidate.
    torch.testing.assert_close(out.loss, brute.gather(1, out.codes[:, None])[:, 0], rtol=1e-4, atol=1e-5)

# Both L2 strategies (materialised heads and Gram expansion) give the same distances.
@pytest.mark.parametrize('Cf,H,K,gram', [(8, 16, 4, True), (8, 2, 256, True), (64, 4, 4, False), (128, 4, 8, False)])
def test_distance_strategies_agree(Cf, H, K, gram):
    assert (Cf * (H * H + K) < K * 3 * H * H) == gram  # The case exercises the intended path.
    torch.manual_seed(1)
    layer = DiscreteDistributionLayer(Cf, 3, K, leak=False, chain_dropout=0.0)
    feat, prev, target = torch.randn(4, Cf, H, H), torch.randn(4, 3, H, H), torch.randn(4, 3, H, H)
    dist = layer.distances(feat, upsample(prev, H), target)
    torch.testing.assert_close(dist, brute_distances(layer, feat, prev, target, H), rtol=1e-4, atol=1e-5)

def test_learning_residual_on_and_off():
    torch.manual_seed(2)
    feat, codes = torch.randn(3, 8, 4, 4), torch.tensor([0, 2, 1])
    prev_a, prev_b = torch.randn(3, 1, 2, 2), torch.randn(3, 1, 2, 2)
    on = DiscreteDistributionLayer(8, 1, 4, learn_residual=True, leak=False)
    off = DiscreteDistributionLayer(8, 1, 4, learn_residual=False, leak=False)
    off.weight.data.copy_(on.weight.data)
    head = on.chosen_head(feat, codes)
    torch.testing.assert_close(on(feat, prev_a, codes=codes).image, head + upsample(prev_a, 4))
    assert not torch.allclose(on(feat, prev_a, codes=codes).image, on(feat, prev_b, codes=codes).image)
    # Without the residual the output ignores the previous choice.
    assert torch.equal(off(feat, prev_a, codes=codes).image, off(feat, prev_b, codes=codes).image)
    torch.testing.assert_close(off(feat, prev_a, codes=codes).image, head)

def test_leak_reads_second_half_with_chosen_head():
    torch.manual_seed(3)
    layer = DiscreteDistributionLayer(8, 3, 5, leak=True)
    feat, codes = torch.randn(2, 8, 4, 4), torch.tensor([4, 1])
    out = layer(feat, None, codes=codes)
    torch.testing.assert_close(out.image, layer.chosen_head(feat[:, :4], codes))
    torch.testing.assert_close(out.leak, layer.chosen_head(feat[:, 4:], codes))
    # Changing the second half changes the leak, not the candidates.
    feat2 = feat.clone()
    feat2[:, 4:] += 1
    out2 = layer(feat2, None, codes=codes)
    assert torch.equal(out.image, out2.image) and not torch.allclose(out.leak, out2.leak)

def test_single_head_equals_all_heads():
    torch.manual_seed(4)
    layer = DiscreteDistributionLayer(16, 3, 64)
    feat, prev, codes = torch.randn(6, 16, 8, 8), torch.randn(6, 3, 4, 4), torch.randint(0, 64, (6,))
    fast = layer(feat, prev, codes=codes).image
    with reference_heads(layer):
        slow = layer(feat, prev, codes=codes).image
    torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-6)

def test_chain_dropout_rate():
    torch.manual_seed(5)
    p, K, B, steps = 0.2, 16, 32, 1500
    layer = DiscreteDistributionLayer(8, 1, K, leak=False, chain_dropout=p).train()
    feat, target = torch.randn(B, 8, 4, 4), torch.randn(B, 1, 4, 4)
    nearest = layer.distances(feat, torch.zeros(B, 1, 4, 4), target).argmin(1)
    dropped = 0
    for _ in range(steps):
        codes = layer(feat, None, target=target).codes
        changed = (codes != nearest).float().mean().item()
        assert changed == 0 or changed > 0.5  # The whole batch drops at once, never a few samples.
        dropped += changed > 0.5
    rate = dropped / steps
    assert abs(rate - p) < 4 * (p * (1 - p) / steps) ** 0.5, rate
    # No chain dropout in evaluation mode or with p = 0.
    layer.eval()
    assert all(torch.equal(layer(feat, None, target=target).codes, nearest) for _ in range(50))
    layer.train()
    layer.chain_dropout = 0.0
    assert all(torch.equal(layer(feat, None, target=target).codes, nearest) for _ in range(50))

def test_statistics_only_in_training():
    layer = DiscreteDistributionLayer(8, 1, 6, leak=False, chain_dropout=0.0)
    feat, target = torch.randn(10, 8, 4, 4), torch.randn(10, 1, 4, 4)
    layer.eval()(feat, None, target=target)
    assert layer.node_stats.pending_seen.item() == 0
    out = layer.train()(feat, None, target=target)
    st = layer.node_stats
    assert st.pending_seen.item() == 10 and st.pending_count.sum().item() == 10
    assert torch.equal(st.pending_count, torch.bincount(out.codes, minlength=6).double())
    top2 = out.dist.topk(2, largest=False).indices
    near2 = st.pending_near2.view(6, 6)
    for i, j in top2.tolist():
        assert near2[i, j] >= 1
    torch.testing.assert_close(st.pending_dist, out.dist.sum(0).double())

def test_scorer_and_chooser():
    torch.manual_seed(6)
    layer = DiscreteDistributionLayer(8, 3, 10, chain_dropout=0.0)
    feat = torch.randn(4, 8, 4, 4)
    seen = {}
    def scorer(cand, info):
        seen['shape'], seen['info'] = cand.shape, info
        return -cand[:, :, 0].mean((2, 3))  # Prefer bright red.
    out = layer(feat, None, scorer=scorer)
    assert seen['shape'] == (4, 10, 3, 4, 4) and seen['info'].K == 10 and seen['info'].size == 4
    cand = layer.all_heads(feat[:, :4])
    assert torch.equal(out.codes, cand[:, :, 0].mean((2, 3)).argmax(1))
    out2 = layer(feat, None, scorer=scorer, chooser=lambda d, info, u: d.argmax(1))
    assert torch.equal(out2.codes, cand[:, :, 0].mean((2, 3)).argmin(1))
    with pytest.raises(ValueError, match='Scorer returned shape'):
        layer(feat, None, scorer=lambda c, i: torch.zeros(4, 3))

def test_distances_in_fp32_under_autocast():
    torch.manual_seed(7)
    layer = DiscreteDistributionLayer(16, 3, 8, chain_dropout=0.0).eval()
    feat, target = torch.randn(4, 16, 8, 8), torch.randn(4, 3, 8, 8)
    ref = layer(feat, None, target=target)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out = layer(feat.bfloat16(), None, target=target)
    assert out.dist.dtype == torch.float32 and out.image.dtype == torch.float32
    # The features were rounded to bf16 but the heads and distances run in fp32: same choice.
    assert torch.equal(out.codes, ref.codes)
    torch.testing.assert_close(out.dist, layer.distances(feat.bfloat16().float()[:, :8], torch.zeros(4, 3, 8, 8), target))

def test_bad_arguments():
    with pytest.raises(ValueError, match='loss_type'):
        DiscreteDistributionLayer(8, 3, 4, loss_type='huber')
    with pytest.raises(ValueError, match='even number'):
        DiscreteDistributionLayer(7, 3, 4, leak=True)
