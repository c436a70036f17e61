"""Tests of Split-and-Prune: the decision rule, the redistribution of statistics (checked against a
plain loop implementation written from the spec), weights and Adam state copied, mass conserved."""

import copy

import numpy as np
import pytest
import torch

from tests import split_prune_reference as ref
from training.ddl import DiscreteDistributionLayer
from training.split_prune import BALANCE_METHODS, NodeStatistics, balance, decide, redistribute, split_and_prune

# ----------------------------------------------------------------------------
# Reference redistribution, one node set, written as plainly as DDN.md §3 reads.

def reference_redistribute(count, near2, dist_acc, s, d):
    count, near2, dist_acc = count.copy(), near2.copy(), dist_acc.copy()
    K = len(count)
    # Prune d: its count goes to the nodes that were its second nearest.
    row = near2[d].copy()
    row[d] = 0
    if row.sum() > 0:
        w = row / row.sum()
    else:
        w = np.array([0.0 if j == d else 1.0 / (K - 1) for j in range(K)])
    for j in range(K):
        count[j] += count[d] * w[j] if j != d else 0
    count[d] = 0
    # Row j takes over w_j of d's near2 row plus its own d column, spread over its other
    # second-nearest nodes (never j, never d) in proportion to its row, uniformly if empty.
    spread = np.zeros((K, K))
    for j in range(K):
        allowed = [k for k in range(K) if k not in (j, d)]
        mass = sum(near2[j, k] for k in allowed)
        for k in allowed:
            spread[j, k] = near2[j, k] / mass if mass > 0 else 1 / len(allowed)
    moved = [w[j] * row.sum() + near2[j, d] for j in range(K)]
    for j in range(K):
        for k in range(K):
            near2[j, k] += moved[j] * spread[j, k]
    near2[d, :] = 0
    near2[:, d] = 0
    # Split s: half of its count to the clone d; rows reset; columns halved; the pair gets half of s's row.
    count[s] = count[d] = count[s] / 2
    old_row_s = near2[s].sum()
    near2[s, :] = 0
    near2[d, :] = 0
    for j in range(K):
        near2[j, s] = near2[j, d] = near2[j, s] / 2
    near2[s, d] = near2[d, s] = old_row_s / 2
    dist_acc[d] = dist_acc[s]
    return count, near2, dist_acc

def random_stats(K, rng, dead=0):
    near2 = rng.integers(0, 5, size=(K, K)).astype(np.float64)
    np.fill_diagonal(near2, 0)
    near2[rng.choice(K, size=dead, replace=False)] = 0  # Nodes that were never nearest.
    count = near2.sum(1)
    dist_acc = rng.random(K) * 10
    return count, near2, dist_acc

# ----------------------------------------------------------------------------
# The decision on hand-built counts.

@pytest.mark.parametrize('count,dist_acc,rule,expected', [
    ([10, 0, 3, 3], [1, 5, 1, 1], 'tv', (True, 0, 1)),      # A dead node is pruned (pd < P/2).
    ([8, 0, 0, 8], [0, 3, 7, 0], 'tv', (True, 0, 2)),       # Several dead: the farthest (largest dist_acc).
    ([4, 4, 4, 4], [0, 0, 0, 0], 'tv', (False, 0, 0)),      # Uniform: nothing to do.
    ([5, 4, 4, 3], [0, 0, 0, 0], 'tv', (False, 0, 3)),      # 2|5/32 - 1/4| + 3/16 = 3/8 >= 1/8: no split.
    ([9, 3, 2, 2], [0, 0, 0, 0], 'tv', (True, 0, 2)),       # 3/16 < 7/16: split.
    ([7, 4, 3, 2], [0, 0, 0, 0], 'tv', (True, 0, 3)),       # TV test says split ...
    ([7, 4, 3, 2], [0, 0, 0, 0], 'paper', (False, 0, 3)),   # ... the paper's thresholds do not.
    ([9, 3, 2, 2], [0, 0, 0, 0], 'paper', (True, 0, 2)),    # ps = 9/16 > 2/K.
    ([0, 0, 0, 0], [0, 0, 0, 0], 'tv', (False, 0, 0)),      # Nothing seen yet.
])
def test_decide_hand_built(count, dist_acc, rule, expected):
    dec = decide(torch.tensor([count], dtype=torch.float64), torch.tensor([dist_acc], dtype=torch.float64), rule=rule)
    assert (bool(dec.do_split[0]), int(dec.i_split[0]), int(dec.i_prune[0])) == expected

def test_decide_unknown_rule():
    with pytest.raises(ValueError, match='Split-and-Prune rule'):
        decide(torch.ones(1, 4, dtype=torch.float64), torch.zeros(1, 4, dtype=torch.float64), rule='nope')

# ----------------------------------------------------------------------------
# The batched redistribution equals the reference, conserves mass, leaves non-split sets alone.

def test_redistribute_matches_reference():
    rng = np.random.default_rng(0)
    K, G = 6, 5
    stats = [random_stats(K, rng, dead=g % 3) for g in range(G)]
    count = torch.tensor(np.stack([s[0] for s in stats]))
    near2 = torch.tensor(np.stack([s[1] for s in stats]))
    dist_acc = torch.tensor(np.stack([s[2] for s in stats]))
    dec = decide(count, dist_acc)
    do = dec.do_split.clone()
    do[1] = False  # Force one set to keep its statistics even if the rule wanted a split.
    dec = dec._replace(do_split=do)
    new_count, new_near2, new_dist = redistribute(count, near2, dist_acc, dec)
    for g in range(G):
        s, d = int(dec.i_split[g]), int(dec.i_prune[g])
        if do[g]:
            rc, rn, rd = reference_redistribute(*stats[g], s, d)
            np.testing.assert_allclose(new_count[g].numpy(), rc, rtol=1e-12, atol=1e-12)
            np.testing.assert_allclose(new_near2[g].numpy(), rn, rtol=1e-12, atol=1e-12)
            np.testing.assert_allclose(new_dist[g].numpy(), rd)
            assert new_count[g, s] == new_count[g, d]
        else:
            assert torch.equal(new_count[g], count[g]) and torch.equal(new_near2[g], near2[g])
        # Mass conserved, of count and of near2.
        assert new_count[g].sum().item() == pytest.approx(count[g].sum().item(), rel=1e-12)
        assert new_near2[g].sum().item() == pytest.approx(near2[g].sum().item(), rel=1e-12)
    assert do.sum() >= 2  # The test exercised real splits.

def test_redistribute_empty_near2_row_goes_uniform():
    count = torch.tensor([[6.0, 2.0, 1.0, 3.0]], dtype=torch.float64)
    near2 = torch.zeros(1, 4, 4, dtype=torch.float64)
    dec = decide(count, torch.zeros_like(count))
    assert bool(dec.do_split[0]) and int(dec.i_split[0]) == 0 and int(dec.i_prune[0]) == 2
    new_count, _, _ = redistribute(count, near2, torch.zeros_like(count), dec)
    # Node 2's count 1 spread over nodes 0, 1, 3; then node 0 halved with node 2.
    np.testing.assert_allclose(new_count[0].numpy(), [(6 + 1 / 3) / 2, 2 + 1 / 3, (6 + 1 / 3) / 2, 3 + 1 / 3])

# ----------------------------------------------------------------------------
# Weights, Adam state and mirrors follow a split.

def _trained_layer(K=8, steps=3, seed=0):
    torch.manual_seed(seed)
    layer = DiscreteDistributionLayer(8, 3, K, chain_dropout=0.0)
    opt = torch.optim.Adam(layer.parameters(), lr=1e-2)
    feat, target = torch.randn(16, 8, 4, 4), torch.randn(16, 3, 4, 4)
    for _ in range(steps):
        loss = layer(feat, None, target=target).loss.mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        layer.node_stats.fold()
    return layer, opt

def test_split_copies_weights_and_adam_state():
    K, C = 8, 3
    layer, opt = _trained_layer(K)
    ema = DiscreteDistributionLayer(8, 3, K)
    ema.weight.data.copy_(layer.weight.data * 0.5)
    st = layer.node_stats
    st.reset()
    st.count.copy_(torch.tensor([40, 3, 5, 4, 0, 6, 2, 4], dtype=torch.float64))
    st.seen.fill_(st.count.sum())
    st.dist_acc.copy_(torch.arange(K, dtype=torch.float64))
    w_before = layer.weight.detach().clone()
    state = opt.state[layer.weight]
    m_before, v_before = state['exp_avg'].clone(), state['exp_avg_sq'].clone()
    ema_before = ema.weight.detach().clone()
    step_before = state['step'].clone()

    n = split_and_prune(layer, opt, mirrors=[ema])
    assert int(n) == 1 and int(st.num_splits) == 1
    s, d = 0, 4
    rows = lambda k: slice(k * C, (k + 1) * C)
    assert torch.equal(layer.weight[rows(d)], w_before[rows(s)])
    assert torch.equal(state['exp_avg'][rows(d)], m_before[rows(s)])
    assert torch.equal(state['exp_avg_sq'][rows(d)], v_before[rows(s)])
    assert torch.equal(ema.weight[rows(d)], ema_before[rows(s)])
    assert torch.equal(state['step'], step_before)
    # Every other row is untouched.
    others = torch.ones(K * C, dtype=torch.bool)
    others[rows(d)] = False
    assert torch.equal(layer.weight[others], w_before[others])
    assert torch.equal(state['exp_avg'][others], m_before[others])
    assert torch.equal(ema.weight[others], ema_before[others])
    # Statistics: halved between s and d, mass conserved.
    assert st.count[s] == st.count[d] == 20
    assert st.count.sum().item() == pytest.approx(st.seen.item())

def test_no_split_changes_nothing():
    layer, opt = _trained_layer()
    st = layer.node_stats
    st.reset()
    st.count.fill_(10)
    st.seen.fill_(80)
    w_before, m_before = layer.weight.detach().clone(), opt.state[layer.weight]['exp_avg'].clone()
    assert int(split_and_prune(layer, opt)) == 0
    assert torch.equal(layer.weight, w_before) and torch.equal(opt.state[layer.weight]['exp_avg'], m_before)
    assert torch.equal(st.count, torch.full((8,), 10.0, dtype=torch.float64))

def test_balance_none_folds_but_never_splits():
    layer, opt = _trained_layer()
    st = layer.node_stats
    st.reset()
    st.count.copy_(torch.tensor([40, 0, 0, 0, 0, 0, 0, 0], dtype=torch.float64))
    st.seen.fill_(40)
    st.pending_count[3] = 5
    st.pending_seen.fill_(5)
    w_before = layer.weight.detach().clone()
    assert int(balance(layer, opt, 'none')) == 0
    assert torch.equal(layer.weight, w_before)
    assert st.count[3] == 5 and st.seen == 45 and st.pending_seen == 0
    # The same statistics with 'tv' split the overloaded node 0 onto a dead one.
    assert int(balance(layer, opt, 'tv')) == 1 and not torch.equal(layer.weight, w_before)

def test_balance_methods_and_rules():
    layer, opt = _trained_layer()
    assert BALANCE_METHODS == ('tv', 'paper', 'bias', 'none')
    with pytest.raises(ValueError, match='balancing method'):
        balance(layer, opt, 'split')
    with pytest.raises(ValueError, match='rule'):
        split_and_prune(layer, opt, rule='bias')        # Balancing by bias is no Split-and-Prune rule.
    assert int(balance(torch.nn.Linear(2, 2), None, 'tv')) == 0    # No node sets: nothing to do.

# Training selection: argmin of dist * exp(select_bias), recorded with the second nearest on the
# same biased distances and the unbiased distances accumulated.
def test_select_takes_the_biased_argmin_and_records_it():
    st = NodeStatistics(3)
    dist = torch.tensor([[1.0, 2.0, 4.0], [3.0, 1.0, 1.5]])
    assert st.select(dist).tolist() == [0, 1]
    st.select_bias.copy_(torch.tensor([2.0, 0.0, -1.0], dtype=torch.float64))   # x7.39, x1, x0.37.
    assert st.select(dist).tolist() == [2, 2]                                  # 1.47 < 2 < 7.39; 0.55 < 1.
    assert st.pending_count.tolist() == [1, 1, 2] and float(st.pending_seen) == 4
    near2 = st.pending_near2.view(3, 3)
    assert near2[0, 1] == 1 and near2[1, 2] == 1 and near2[2, 1] == 2 and near2.sum() == 4
    torch.testing.assert_close(st.pending_dist, 2 * dist.sum(0).double())

def test_mirror_mismatch_is_an_error():
    layer, opt = _trained_layer()
    with pytest.raises(ValueError, match='mirror'):
        split_and_prune(layer, opt, mirrors=[torch.nn.Linear(2, 2)])

# ----------------------------------------------------------------------------
# Over real training steps with many splits, count.sum() == seen and near2 stays off-diagonal.

def test_mass_conserved_during_training():
    torch.manual_seed(1)
    layer = DiscreteDistributionLayer(8, 1, 16, chain_dropout=0.1)
    opt = torch.optim.Adam(layer.parameters(), lr=1e-2)
    total = 0
    for step in range(60):
        feat = torch.randn(32, 8, 4, 4)
        target = torch.randn(32, 1, 4, 4) * 0.1 + (step % 3)
        loss = layer(feat, None, target=target).loss.mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        total += int(split_and_prune(layer, opt))
    st = layer.node_stats
    assert total >= 5
    assert st.seen.item() == 60 * 32
    assert st.count.sum().item() == pytest.approx(st.seen.item(), rel=1e-9)
    assert st.near2.sum().item() == pytest.approx(st.seen.item(), rel=1e-9)
    assert st.near2.diagonal().abs().sum() == 0
    assert (st.count >= 0).all() and (st.near2 >= 0).all()

# ----------------------------------------------------------------------------
# Right after a split the clone ties exactly with its original: the statistics must credit the
# node the selector chose (the argmin), not whichever of the tied pair topk happens to list first.

def test_statistics_credit_the_chosen_node_on_ties():
    layer = DiscreteDistributionLayer(8, 1, 6, leak=False, chain_dropout=0.0).train()
    with torch.no_grad():
        layer.weight[5] = layer.weight[2]  # Node 5 is an exact clone of node 2.
    feat = torch.randn(64, 8, 4, 4)
    target = layer.chosen_head(feat, torch.full((64,), 2)).detach()  # Node 2 (and 5) is exact.
    out = layer(feat, None, target=target)
    assert (out.codes == 2).all()
    st = layer.node_stats
    assert st.pending_count[2] == 64 and st.pending_count[5] == 0
    assert st.pending_near2.view(6, 6)[2, 5] == 64

# ----------------------------------------------------------------------------
# The batched pass (all node sets at once) against the per-layer loop it replaced, kept in
# tests/split_prune_reference.py: bit-identical statistics, weights, EMA rows and Adam state over many steps,
# with two groups of K and a node set without near2.

def _mixed_model(seed):
    torch.manual_seed(seed)
    kw = dict(chain_dropout=0.0)       # No draws from the global RNG: both runs see the same choices.
    layers = [DiscreteDistributionLayer(8, 3, 8, **kw), DiscreteDistributionLayer(8, 3, 16, **kw),
              DiscreteDistributionLayer(8, 3, 8, leak=False, **kw), DiscreteDistributionLayer(4, 1, 16, **kw)]
    layers[3].node_stats = NodeStatistics(16, track_near2=False)
    model = torch.nn.ModuleList(layers)
    ema = copy.deepcopy(model).requires_grad_(False)
    return model, ema, torch.optim.Adam(model.parameters(), lr=1e-2)

@pytest.mark.parametrize('rule', ['tv', 'paper'])
def test_batched_pass_equals_per_layer_loop(rule):
    runs = [_mixed_model(0), _mixed_model(0)]
    passes = [lambda m, e, o: split_and_prune(m, o, mirrors=[e], rule=rule),
              lambda m, e, o: ref.split_and_prune_per_layer(m, o, mirrors=[e], rule=rule)]
    gen = torch.Generator().manual_seed(3)
    splits = [0, 0]
    for step in range(12):
        batches = [(torch.randn(16, l.in_channels, 4, 4, generator=gen), torch.randn(16, l.out_channels, 4, 4, generator=gen))
                   for l in runs[0][0]]
        for r, (model, ema, opt) in enumerate(runs):
            loss = sum(l(f, None, target=t).loss.mean() for l, (f, t) in zip(model, batches, strict=True))
            opt.zero_grad()
            loss.backward()
            opt.step()
            splits[r] += int(passes[r](model, ema, opt))
    assert splits[0] == splits[1] > 0
    (m0, e0, o0), (m1, e1, o1) = runs
    for name, a in m0.state_dict().items():
        assert torch.equal(a, m1.state_dict()[name]), name
    for name, a in e0.state_dict().items():
        assert torch.equal(a, e1.state_dict()[name]), name
    for p0, p1 in zip(m0.parameters(), m1.parameters(), strict=True):
        for key in ('exp_avg', 'exp_avg_sq'):
            assert torch.equal(o0.state[p0][key], o1.state[p1][key])

# The number of tensor operations of a pass does not grow with the number of node sets.
def test_pass_operation_count_does_not_grow_with_layers():
    counts = []
    for layers in (2, 8):
        model, ema, opt = ref.make_setup(layers, K=16)
        gen = torch.Generator().manual_seed(0)
        for _ in range(2):
            ref.observe_all([model], 32, gen)
            split_and_prune(model, opt, mirrors=[ema])
        ref.observe_all([model], 32, gen)
        counts.append(ref.count_ops(lambda: split_and_prune(model, opt, mirrors=[ema]), cuda=False)[0])
    assert counts[0] == counts[1], counts

# The tensors a pass writes are looked up again when they change: after the optimizer's state is
# replaced (resume) and after the model moves (`.to()`), split rows still reach the new tensors.
def test_pass_follows_replaced_tensors():
    layer, opt = _trained_layer()
    split_and_prune(layer, opt)
    opt.load_state_dict(copy.deepcopy(opt.state_dict()))      # New exp_avg / exp_avg_sq tensors.
    layer.to(torch.float64).to(torch.float32)                  # New parameter and buffer tensors.
    st = layer.node_stats
    st.reset()
    st.count.copy_(torch.tensor([40, 3, 5, 4, 0, 6, 2, 4], dtype=torch.float64))
    st.seen.fill_(st.count.sum())
    state = opt.state[layer.weight]
    m_before = state['exp_avg'].clone()
    assert int(split_and_prune(layer, opt)) == 1
    assert torch.equal(state['exp_avg'][12:15], m_before[0:3])
    assert torch.equal(layer.weight[12:15], layer.weight[0:3])
