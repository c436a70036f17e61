"""Split-and-Prune: keeps every node of a discrete distribution alive and equally likely.

A node is one of the K outputs of a Discrete Distribution Layer (or one of K free points in the 2D
toy). Training only moves the node nearest to each target, so two things go wrong without help
(paper §3.3): *dead nodes* (never nearest, never trained, yet sampled 1/K of the time) and *density
shift* (nodes born in dense regions win far more than 1/K of the targets). Split-and-Prune fixes both
after every optimizer step: the most frequently chosen node is split in two and the least chosen is
pruned to make room, parameters AND optimizer state included.

This file reads top-down like the paper:
- `split_and_prune()`: the algorithm, four steps over all node sets of a model after the optimizer
  step (statistics summed across ranks first, so every rank takes the same decision);
- `balance()`: what training calls after every step, by method: 'tv' / 'paper' (Split-and-Prune with
  that rule), 'bias' or 'none' (statistics only: the paper's ablation);
- `decide()` and `redistribute()`: the split decision and the redistribution of the statistics, as
  pure tensor code batched over node sets;
- `NodeStatistics`: running selection statistics of one node set (count, near2, dist_acc, seen), kept
  as device tensors and updated without host syncs; `select()` is the training selection itself;
- `SplittableNodes`: the base class of any module owning K nodes (it says which parameter rows make
  node k), so the same code serves the networks and the 2D toy.
The pass is batched over the node sets by `split_prune_plan.py` (a fixed number of tensor
operations, however many layers: on a GPU the launches do not grow with L), and its result is
bit-identical to treating the node sets one by one (tests/test_split_prune.py checks it against that
loop, kept in tests/split_prune_reference.py). With `halflife`, the statistics forget old selections
(beyond the paper, see `Plan.fold`), so that a node the data stopped choosing is pruned while the run
is still short.

Beyond the paper, `balance(method='bias')` is the balanced alternative the author suggests
(our spec `DDN.md` §3): nothing is split or pruned and no parameter is discarded; instead each node
set keeps a per-node bias `select_bias` on the log of the selection distance (training selects the
argmin of dist * exp(bias)), nudged after every step toward uniform frequencies, as in
auxiliary-loss-free load balancing of mixture-of-experts models. See `bias_step()`.
"""

import contextlib
import math
from typing import Iterable, NamedTuple

import torch
from torch import nn

from torch_utils import distributed
from training.split_prune_plan import get_plan

# ----------------------------------------------------------------------------
# One Split-and-Prune pass over every node set of `model`, to call right after `optimizer.step()`.
# Returns the number of splits of this pass as a device tensor (no host sync). The number of tensor
# operations of a pass does not grow with the number of node sets (see split_prune_plan.py;
# bench/split_prune.py counts them).

@torch.no_grad()
def split_and_prune(
    model:      nn.Module,                      # Module containing SplittableNodes.
    optimizer:  torch.optim.Optimizer = None,   # Optimizer whose state rows follow the weights.
    mirrors:    Iterable[nn.Module] = (),       # Modules with the same structure (EMA copies).
    rule:       str = 'tv',                     # 'tv' (total variation test) or 'paper' (thresholds).
    halflife:   float = None,                   # Statistics forget with this half-life, in targets per
                                                # node (beyond the paper, see Plan.fold); None = never.
) -> torch.Tensor:
    if rule not in ('tv', 'paper'):
        raise ValueError(f'Unknown Split-and-Prune rule {rule!r}; expected "tv" or "paper"')
    _check_halflife(halflife)
    # 1. All ranks' observations of this step are summed with ONE all-reduce and folded in.
    plan = _reduced_plan(model, optimizer, mirrors)
    if plan is None:
        return torch.zeros([], dtype=torch.int64)
    plan.fold(halflife)
    total_splits = torch.zeros([], dtype=torch.int64, device=plan.device)
    for grp in plan.groups:
        # 2. Node sets with equal K are stacked and decided together: split the most frequent node,
        #    prune the least frequent one, where the rule says it helps.
        count, dist_acc = grp.stack('count'), grp.stack('dist_acc')
        decision = decide(count, dist_acc, rule=rule)
        # 3. For each split, the node's parameter rows are copied onto the pruned node, together with
        #    the optimizer's per-parameter state rows (Adam's exp_avg, exp_avg_sq, ...) and the rows
        #    of the same parameters in `mirrors` (e.g. the EMA copy of the network).
        grp.copy_node_rows(decision)
        # 4. Statistics are redistributed with the total mass conserved (count.sum() == seen).
        near2 = grp.stack('near2') if grp.track_near2 else None
        new_count, new_near2, new_dist = redistribute(count, near2, dist_acc, decision)
        grp.write('count', new_count)
        if grp.track_near2:
            grp.write('near2', new_near2)
        grp.write('dist_acc', new_dist)
        splits = decision.do_split.long()
        torch._foreach_add_(grp.num_splits, list(splits.unbind(0)))
        total_splits += splits.sum()
    return total_splits

# ----------------------------------------------------------------------------
# Node balancing over every node set of `model`, to call right after `optimizer.step()`, by method:
# - 'tv', 'paper': Split-and-Prune with that rule (paper §3.3, `split_and_prune`);
# - 'bias' (beyond the paper): the selection biases are nudged toward uniform frequencies
#   (`bias_step`); nothing is split, so weights, optimizer state and mirrors are left alone. The
#   training selection must be `node_stats.select(dist)` for the bias to act (the DDL's is);
# - 'none': the statistics are only folded (for the plots and logs): the paper's ablation.
# Returns the number of splits of this step as a device tensor (no host sync); 0 unless tv/paper.

BALANCE_METHODS = ('tv', 'paper', 'bias', 'none')

@torch.no_grad()
def balance(
    model:      nn.Module,                      # Module containing SplittableNodes.
    optimizer:  torch.optim.Optimizer = None,   # Optimizer whose state rows follow split weights.
    method:     str = 'tv',                     # One of BALANCE_METHODS.
    *,
    mirrors:    Iterable[nn.Module] = (),       # Modules with the same structure (EMA copies).
    bias_rate:  float = 1e-2,                   # method 'bias': step of the log-distance bias per call.
    halflife:   float = None,                   # Half-life of the statistics in targets per node; None = never forget.
) -> torch.Tensor:
    if method not in BALANCE_METHODS:
        raise ValueError(f'Unknown balancing method {method!r}; expected one of {", ".join(BALANCE_METHODS)}')
    if method in ('tv', 'paper'):
        return split_and_prune(model, optimizer, mirrors=mirrors, rule=method, halflife=halflife)
    _check_halflife(halflife)
    plan = _reduced_plan(model, optimizer, mirrors)
    if plan is None:
        return torch.zeros([], dtype=torch.int64)
    if method == 'bias':
        _update_biases(plan, bias_rate)
    plan.fold(halflife)
    return torch.zeros([], dtype=torch.int64, device=plan.device)

# Balancing by selection bias (beyond the paper, DDN.md §3): each node set's `select_bias` takes one
# `bias_step` from this step's reduced counts (before they are folded), the same on every rank.
def _update_biases(plan, bias_rate):
    for grp in plan.groups:
        grp.write('select_bias', bias_step(grp.stack('select_bias'), grp.stack('pending_count'), grp.stack('pending_seen'), bias_rate))

# The plan of `model`'s node sets (None if it has none), after checking that every mirror has the
# same node sets; then this step's pending observations summed over ranks with ONE all-reduce.
# A half-life of the statistics must be None or a positive number of targets per node.
def _check_halflife(halflife):
    if halflife is not None and not halflife > 0:
        raise ValueError(f'Node statistics half-life must be > 0 targets per node (or None), got {halflife!r}')

def _reduced_plan(model, optimizer, mirrors):
    node_sets = find_node_sets(model)
    if not node_sets:
        return None
    mirror_sets = [find_node_sets(m) for m in mirrors]
    for ms in mirror_sets:
        if len(ms) != len(node_sets):
            raise ValueError('Node balancing: a mirror module does not have the same node sets as the model')
    plan = get_plan(model, node_sets, mirror_sets, optimizer)
    distributed.all_reduce_(plan.pending)
    return plan

# ----------------------------------------------------------------------------
# The split decision and the redistribution of statistics, batched over G node sets
# that share K. Pure tensor code: no host sync, no Python loop over samples or nodes.

class SplitDecision(NamedTuple):
    do_split:   torch.Tensor    # (G,) bool: split this node set now?
    i_split:    torch.Tensor    # (G,) long: the most frequent node, split in two.
    i_prune:    torch.Tensor    # (G,) long: the least frequent node, replaced by the clone.

# Decide, for each of G node sets, whether and which nodes to split and prune.
# rule='tv': split when it brings the node frequencies closer to uniform in total variation
#            (2|ps/2 - P| + pd < ps - pd), or when the weakest node is below half its share (pd < P/2).
# rule='paper': the paper's simple thresholds, split when ps > 2/K or pd < 1/(2K).
def decide(count, dist_acc, rule='tv'):
    G, K = count.shape
    i_split = count.argmax(dim=1)
    dead = count == 0
    # Among several dead nodes prune the one farthest from the data (largest accumulated distance).
    i_dead = torch.where(dead, dist_acc, torch.full_like(dist_acc, -math.inf)).argmax(dim=1)
    i_prune = torch.where(dead.any(dim=1), i_dead, count.argmin(dim=1))
    total = count.sum(dim=1)
    p = count / total.clamp(min=1e-12)[:, None]
    ps = p.gather(1, i_split[:, None])[:, 0]
    pd = p.gather(1, i_prune[:, None])[:, 0]
    P = 1.0 / K
    if rule == 'tv':
        want = (2 * (ps / 2 - P).abs() + pd < ps - pd) | (pd < P / 2)
    elif rule == 'paper':
        want = (ps > 2 * P) | (pd < P / 2)
    else:
        raise ValueError(f'Unknown Split-and-Prune rule {rule!r}; expected "tv" or "paper"')
    do_split = want & (total > 0) & (i_split != i_prune) & (K >= 2)
    return SplitDecision(do_split, i_split, i_prune)

# Redistribute the statistics of G node sets for the given decision; node sets whose
# do_split is False keep their statistics. Returns new (count, near2, dist_acc); the totals of
# count and near2 are conserved (both equal `seen` for K >= 3).
def redistribute(count, near2, dist_acc, decision):
    G, K = count.shape
    do, s, d = decision
    count, dist_acc = count.clone(), dist_acc.clone()
    g = torch.arange(G, device=count.device)
    live = do.to(count.dtype)                                           # 1 where the node set splits.
    keep = 1 - live
    if near2 is None:                                                   # near2 not tracked: O(G*K).
        w = torch.full_like(count, 1 / max(K - 1, 1))                   # Spread d's count uniformly.
        w[g, d] = 0
        count.add_(live[:, None] * count[g, d][:, None] * w)
        count[g, d] = count[g, d] * keep
        half = count[g, s] / 2
        count[g, s] = torch.where(do, half, count[g, s])
        count[g, d] = torch.where(do, half, count[g, d])
        dist_acc[g, d] = torch.where(do, dist_acc[g, s], dist_acc[g, d])
        return count, None, dist_acc
    near2 = near2.clone()

    # 1. Prune d. Its count goes to the nodes that were second nearest when d was nearest, in
    #    proportion to its near2 row (uniformly over the other nodes if that row is empty).
    row_d = near2[g, d].clone()                                         # (G, K) = near2[d, :]
    row_d[g, d] = 0
    row_sum = row_d.sum(1, keepdim=True)
    uniform = torch.full_like(count, 1 / max(K - 1, 1))
    uniform[g, d] = 0
    w = torch.where(row_sum > 0, row_d / row_sum.clamp(min=1e-300), uniform)
    count_d = count[g, d].clone()
    count.add_(live[:, None] * count_d[:, None] * w)
    count[g, d] = count[g, d] * keep
    #    near2 mass involving d moves to the rows that take over: row j receives w_j of d's row
    #    (its targets now have j nearest) plus its own d column (targets that had d second), spread
    #    over j's other second-nearest nodes in proportion to its row (uniformly if empty).
    allowed = 1 - torch.eye(K, dtype=near2.dtype, device=near2.device)[None]  # Never j itself ...
    allowed = allowed * (1 - nn.functional.one_hot(d, K).to(near2.dtype))[:, None, :]  # ... nor d.
    spread = near2 * allowed
    spread_sum = spread.sum(2, keepdim=True)
    spread = torch.where(spread_sum > 0, spread / spread_sum.clamp(min=1e-300),
                         allowed / allowed.sum(2, keepdim=True).clamp(min=1))
    moved = live[:, None] * (w * row_sum + near2[g, :, d])              # (G, K) mass per receiving row.
    near2.addcmul_(moved[:, :, None], spread)
    near2[g, d] = near2[g, d] * keep[:, None]
    near2[g, :, d] = near2[g, :, d] * keep[:, None]

    # 2. Split s: d becomes a clone of s. Half of s's count goes to d. Both rows are reset. The
    #    targets that had s second now see two equal candidates: s's column is halved and the
    #    other half becomes d's column. The targets of s become half s-then-d, half d-then-s.
    half = count[g, s] / 2
    count[g, s] = torch.where(do, half, count[g, s])
    count[g, d] = torch.where(do, half, count[g, d])
    old_row_s = near2[g, s].sum(1)
    half_col = near2[g, :, s] / 2                                       # (G, K) = near2[:, s] / 2
    half_col[g, s] = 0
    half_col[g, d] = 0
    near2[g, s] = near2[g, s] * keep[:, None]
    near2[g, :, s] = torch.where(do[:, None], half_col, near2[g, :, s])
    near2[g, :, d] = torch.where(do[:, None], half_col, near2[g, :, d])
    near2[g, s, d] = torch.where(do, old_row_s / 2, near2[g, s, d])
    near2[g, d, s] = torch.where(do, old_row_s / 2, near2[g, d, s])
    dist_acc[g, d] = torch.where(do, dist_acc[g, s], dist_acc[g, d])
    return count, near2, dist_acc

# ----------------------------------------------------------------------------
# The balanced alternative to Split-and-Prune (beyond the paper, DDN.md §3): nudge the selection
# biases of G node sets sharing K toward uniform frequencies, as auxiliary-loss-free load balancing
# does for the experts of a mixture-of-experts model. From THIS step's counts c_k out of n targets:
#     b_k += bias_rate * sign(c_k - n/K),  then  b -= mean(b),
# and training selects argmin_k dist_k * exp(b_k). An overloaded node's distances are inflated, so
# it is chosen less; a dead node's distances shrink each step until it wins targets and starts training.
# The bias acts on log(dist), not on dist: distances shrink by orders of magnitude during training
# (and differ between layers), and an additive bias accumulated while they were large would dwarf
# them later and hand one node every target. On the log scale a bias means the same at any scale.
# Re-centering stops a common drift, which could not change any argmin anyway. A node set that
# saw nothing this step keeps its bias. Inputs (G, K) and (G,), float64; returns the new biases.
def bias_step(bias, count, seen, bias_rate):
    K = count.shape[1]
    bias = bias + bias_rate * torch.sign(count - seen[:, None] / K)
    return bias - bias.mean(dim=1, keepdim=True)

# ----------------------------------------------------------------------------
# Running statistics of which node was the nearest to each training target.
# Observations go to `pending_*` buffers (this rank, this step); `fold()` adds the
# all-reduced pending values into the global statistics, which are therefore identical
# on every rank. Statistics are float64: halving and proportional redistribution must
# keep count.sum() == seen exactly enough to test.

class NodeStatistics(nn.Module):
    def __init__(self,
        K,                              # Number of nodes.
        track_near2     = True,         # Keep near2 (K x K). False: O(K) memory and time per step, and a
                                        # pruned node's count is spread uniformly (very large K, 2D toy).
    ):
        super().__init__()
        self.K = K
        self.track_near2 = track_near2
        K2 = K if track_near2 else 0
        self.register_buffer('count', torch.zeros(K, dtype=torch.float64))        # Times node k was nearest.
        self.register_buffer('near2', torch.zeros(K2, K2, dtype=torch.float64))     # [i, j]: i nearest, j second nearest.
        self.register_buffer('dist_acc', torch.zeros(K, dtype=torch.float64))     # Accumulated distance of node k to targets.
        self.register_buffer('seen', torch.zeros([], dtype=torch.float64))        # Number of targets observed.
        self.register_buffer('num_splits', torch.zeros([], dtype=torch.int64))    # Splits performed so far.
        # Bias of training selection on log(distance) (balance 'bias', beyond the paper): zero-mean,
        # and zero under Split-and-Prune, where selection is the plain nearest node.
        self.register_buffer('select_bias', torch.zeros(K, dtype=torch.float64))
        # Not yet folded observations of this rank; always zero between optimizer steps.
        self.register_buffer('pending_count', torch.zeros(K, dtype=torch.float64), persistent=False)
        self.register_buffer('pending_near2', torch.zeros(K2 * K2, dtype=torch.float64), persistent=False)
        self.register_buffer('pending_dist', torch.zeros(K, dtype=torch.float64), persistent=False)
        # Shape (1,), not (): torch.compile (2.13, CPU) drops in-place updates of 0-d float64 buffers.
        self.register_buffer('pending_seen', torch.zeros([1], dtype=torch.float64), persistent=False)
        # A constant 1, expanded (a view) to the batch as the source of the index_add_ counts.
        self.register_buffer('one', torch.ones([1], dtype=torch.float64), persistent=False)

    # Objects pickled before the `one` buffer existed get it when unpickled.
    def __setstate__(self, state):
        super().__setstate__(state)
        if 'one' not in self._buffers:
            self.register_buffer('one', torch.ones([1], dtype=torch.float64, device=self.count.device), persistent=False)

    # Batches waiting for `batched_statistics` to record them are not part of the state.
    def __getstate__(self):
        state = super().__getstate__()
        state.pop('_deferred', None)
        return state

    # Training selection of a batch of distances (B, K), recorded in the statistics: the node
    # minimising `dist * exp(select_bias)`, i.e. the bias is added to log(dist). With a zero bias
    # (Split-and-Prune, or no balancing) that product equals `dist` exactly, so the choice is the
    # plain nearest node. Returns the codes (B,).
    # `bias_active = False` (set by the training step when the balancing method never moves the bias and
    # the bias is zero) skips the product, which is then `dist` exactly. Inside `batched_statistics`
    # the batch is recorded when the block exits, together with the other node sets'.
    @torch.no_grad()
    def select(self, dist):
        dist = dist.detach()
        biased = dist * self.select_bias.exp().to(dist.dtype) if getattr(self, 'bias_active', True) else dist
        codes = biased.argmin(dim=1)
        deferred = getattr(self, '_deferred', None)
        if deferred is not None:
            deferred.append((dist, biased, codes))
        else:
            self._record(dist, biased, codes)
        return codes

    # Add one batch to the pending statistics: `i1` (B,) are the chosen nodes, the argmin of
    # `select` (B, K), on which the second nearest is taken too; the distances `dist` (B, K)
    # accumulate. Crediting the node actually chosen matters: after a split the clone ties with its
    # original.
    def _record(self, dist, select, i1):
        B, K = dist.shape
        assert K == self.K
        if K >= 2 and self.track_near2:
            i2 = select.scatter(1, i1[:, None], math.inf).argmin(dim=1)
            self.pending_near2.index_add_(0, torch.add(i2, i1, alpha=K), self.one.expand(B))    # i1 * K + i2
        self.pending_count.index_add_(0, i1, self.one.expand(B))
        self.pending_dist.add_(dist.sum(0, dtype=torch.float64))
        self.pending_seen.add_(B)

    # Tensors to all-reduce, in a fixed order.
    def pending_tensors(self):
        return [self.pending_count, self.pending_near2, self.pending_dist, self.pending_seen]

    # Add the (already reduced) pending observations to the statistics and clear them.
    @torch.no_grad()
    def fold(self):
        self.count.add_(self.pending_count)
        self.near2.add_(self.pending_near2.view(self.near2.shape))
        self.dist_acc.add_(self.pending_dist)
        self.seen.add_(self.pending_seen.view([]))
        for t in self.pending_tensors():
            t.zero_()

    # Forget all statistics and the balancing bias (e.g. after loading weights trained elsewhere).
    @torch.no_grad()
    def reset(self):
        for t in [self.count, self.near2, self.dist_acc, self.seen, self.select_bias] + self.pending_tensors():
            t.zero_()

    # Frequency of each node as the nearest, (K,); uniform before any observation.
    def frequency(self):
        total = self.count.sum()
        return torch.where(total > 0, self.count / total.clamp(min=1), torch.full_like(self.count, 1 / self.K))

# ----------------------------------------------------------------------------
# Inside `with batched_statistics(model):` every node set of `model` keeps the batches its `select()`
# sees, and on exit they are recorded together: node sets of equal K (and batch) are stacked and
# their counts, second-nearest pairs, distance sums and target counts added in ~20 operators per group
# instead of ~8 per node set (the reference net's training forward: 63 node sets, 1 group). The
# statistics are exactly those of recording each batch at once: integer counts, and each node set's
# distance sum over the batch added once per batch, as before. A node set that selects several times
# inside the block (a shared layer) has its batches recorded in the order it saw them.
# On an exception nothing is recorded (the step failed).

@contextlib.contextmanager
def batched_statistics(model: nn.Module):
    sets = [m.node_stats for m in find_node_sets(model)]
    for ns in sets:
        if getattr(ns, '_deferred', None) is not None:
            raise RuntimeError('batched_statistics: already recording this model')
        ns._deferred = []
    try:
        yield
        groups = {}
        for ns in sets:
            for j, (dist, select, codes) in enumerate(ns._deferred):
                key = (j, ns.K, ns.track_near2 and ns.K >= 2, dist.shape[0], dist.dtype, dist.device)
                groups.setdefault(key, []).append((ns, dist, select, codes))
        for key, entries in groups.items():
            _record_group(entries, near2=key[2])
    finally:
        for ns in sets:
            ns._deferred = None

# Record one batch of each of G node sets (equal K, equal batch N) with stacked operators.
def _record_group(entries, near2):
    stats = [e[0] for e in entries]
    G, (N, K) = len(entries), entries[0][1].shape
    if G == 1:
        ns, dist, select, codes = entries[0]
        ns._record(dist, select, codes)
        return
    dist = torch.stack([e[1] for e in entries])                                  # (G, N, K)
    codes = torch.stack([e[3] for e in entries])                                 # (G, N)
    one = stats[0].one.expand(G * N)
    offset = torch.arange(0, G * K, K, device=dist.device)[:, None]              # Node set g's first row.
    if near2:
        select = dist if all(e[2] is e[1] for e in entries) else torch.stack([e[2] for e in entries])
        i2 = select.scatter(2, codes[:, :, None], math.inf).argmin(dim=2)        # (G, N) second nearest.
        pairs = torch.zeros(G * K * K, dtype=torch.float64, device=dist.device)
        pairs.index_add_(0, (torch.add(i2, codes, alpha=K) + offset * K).flatten(), one)
        torch._foreach_add_([ns.pending_near2 for ns in stats], list(pairs.view(G, K * K).unbind(0)))
    counts = torch.zeros(G * K, dtype=torch.float64, device=dist.device)
    counts.index_add_(0, (codes + offset).flatten(), one)
    torch._foreach_add_([ns.pending_count for ns in stats], list(counts.view(G, K).unbind(0)))
    torch._foreach_add_([ns.pending_dist for ns in stats], list(dist.sum(1, dtype=torch.float64).unbind(0)))
    torch._foreach_add_([ns.pending_seen for ns in stats], N)

# ----------------------------------------------------------------------------
# Base class of a module that owns K nodes. Subclasses create `self.node_stats`
# and say which rows of which parameters make up each node.

class SplittableNodes(nn.Module):
    def __init__(self,
        K,                              # Number of nodes.
        track_near2     = True,         # See NodeStatistics.
    ):
        super().__init__()
        self.K = K
        self.node_stats = NodeStatistics(K, track_near2=track_near2)

    # List of (parameter, rows_per_node): node k owns rows [k * rows, (k + 1) * rows) of dim 0.
    def node_params(self) -> list[tuple[nn.Parameter, int]]:
        raise NotImplementedError

# Find the node sets of a model in a stable order.
def find_node_sets(model: nn.Module) -> list[SplittableNodes]:
    return [m for m in model.modules() if isinstance(m, SplittableNodes)]

# ----------------------------------------------------------------------------
