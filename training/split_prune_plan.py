"""The batching plan of Split-and-Prune: how one pass over L node sets stays a fixed number of tensor
operations, whatever L (the reference CIFAR-10 net has L = 63).

`split_prune.split_and_prune` reads like the paper; this file holds the machinery under it. A
`Plan` arranges, once, the tensors a pass reads and writes: every per-node-set list below is handed
to ONE `torch._foreach_*` call (on CUDA a multi-tensor kernel, a few launches for hundreds of
tensors) or stacked by ONE `torch.stack`. Node sets of equal K (and near2 tracking) form a
`DecisionGroup`, decided together; within it, the tensors whose rows follow a split (weights, their
mirrors such as the EMA, the optimizer's per-parameter state) form `RowGroup`s of equal shape.
A plan holds the tensors themselves; `get_plan` rebuilds it whenever one of them is no longer the
same object (after `.to()`, an optimizer's first step or `load_state_dict`, ...).

A node set here is any object with `K`, `node_stats` (split_prune.NodeStatistics) and
`node_params()` (split_prune.SplittableNodes); this file does not import split_prune.
"""

import math
import operator
import weakref
from typing import NamedTuple

import torch

# ----------------------------------------------------------------------------
# Rows of equal-shaped tensors that follow the split decisions of one decision group.

class RowGroup(NamedTuple):
    tensors:    list            # Same shape, dtype and device: weights, mirrored weights, optimizer state.
    member:     torch.Tensor    # (N,) long: position of each tensor's node set in its decision group.
    rows:       int             # Rows per node.

    # Copy, in every tensor, node s's rows onto node d's rows where `do` is True, for all node sets at
    # once: the tensors are stacked, the source rows (s's when splitting, d's own otherwise) gathered
    # and written to d's rows, and everything copied back. Values change only in the rows of the node
    # sets that split; no host sync.
    @torch.no_grad()
    def copy_node_rows(self, do, s, d):
        N = len(self.tensors)
        do, s, d = do[self.member], s[self.member], d[self.member]
        stacked = torch.stack(self.tensors)
        row_size = math.prod(stacked.shape[2:])
        nodes = stacked.view(N, -1, self.rows * row_size)                   # (N, K, rows * row size)
        n = torch.arange(N, device=stacked.device)
        nodes[n, d] = nodes[n, torch.where(do, s, d)]
        torch._foreach_copy_(self.tensors, list(stacked.unbind(0)))

# ----------------------------------------------------------------------------
# Node sets that share K and near2 tracking: their statistics, one list per statistic.

class DecisionGroup(NamedTuple):
    K:              int
    track_near2:    bool
    count:          list        # The member node sets' tensors of each statistic, for stack / foreach.
    near2:          list
    dist_acc:       list
    num_splits:     list
    select_bias:    list
    pending_count:  list
    pending_seen:   list
    row_groups:     list        # RowGroup of the tensors whose rows follow the decisions.

    # One statistic of all member node sets, stacked: (G, ...).
    def stack(self, name):
        return torch.stack(getattr(self, name))

    # Write a stacked (G, ...) value back into the member node sets' tensors of statistic `name`.
    def write(self, name, stacked):
        torch._foreach_copy_(getattr(self, name), list(stacked.unbind(0)))

    # Copy the rows of every split node onto the pruned node, in all row groups (see RowGroup).
    def copy_node_rows(self, decision):
        for row_group in self.row_groups:
            row_group.copy_node_rows(*decision)

# ----------------------------------------------------------------------------
# The plan of a model's node sets.

class Plan:
    def __init__(self, node_sets, mirror_sets, optimizer, key):
        self.key = key
        stats = [ns.node_stats for ns in node_sets]
        self.device = stats[0].count.device
        self.pending = [t for st in stats for t in st.pending_tensors()]   # All-reduced together.
        # fold(): statistics += pending, with near2's flat pending buffer seen as K x K.
        self.fold_dst = [t for st in stats for t in (st.count, st.near2, st.dist_acc, st.seen)]
        self.fold_src = [t for st in stats for t in (st.pending_count, st.pending_near2.view(st.near2.shape),
                                                      st.pending_dist, st.pending_seen.view([]))]
        # Forgetting statistics (fold with a half-life): this step's targets and K, per node set.
        self.step_seen = [st.pending_seen for st in stats]
        self.node_ks = torch.tensor([float(st.K) for st in stats], dtype=torch.float64, device=self.device)
        by_key: dict[tuple, list[int]] = {}
        for idx, ns in enumerate(node_sets):
            by_key.setdefault((ns.K, ns.node_stats.track_near2), []).append(idx)
        self.groups = []
        for (K, track_near2), members in by_key.items():
            sts = [stats[i] for i in members]
            rows: dict[tuple, list] = {}        # (shape, dtype, device, rows) -> [(tensor, position)]
            for g, i in enumerate(members):
                mirrored = [ms[i].node_params() for ms in mirror_sets]
                for p, (param, n) in enumerate(node_sets[i].node_params()):
                    tensors = [param] + [m[p][0] for m in mirrored]
                    if optimizer is not None:
                        state = optimizer.state.get(param, {})
                        tensors += [v for v in state.values() if torch.is_tensor(v) and v.shape == param.shape]
                    for t in tensors:
                        rows.setdefault((tuple(t.shape), t.dtype, t.device, n), []).append((t, g))
            row_groups = [RowGroup([t for t, _ in items], torch.tensor([g for _, g in items], device=dev), n)
                          for (_, _, dev, n), items in rows.items()]
            self.groups.append(DecisionGroup(K, track_near2, [st.count for st in sts], [st.near2 for st in sts],
                                             [st.dist_acc for st in sts], [st.num_splits for st in sts],
                                             [st.select_bias for st in sts], [st.pending_count for st in sts],
                                             [st.pending_seen.view([]) for st in sts], row_groups))

    # Add the (reduced) pending observations to the statistics and clear them, all node sets at once.
    # With a `halflife` (targets per node; beyond the paper), the statistics first forget: count,
    # near2, dist_acc and seen of a node set are multiplied by 0.5 ** (n / (halflife * K)), n its
    # targets of this step, so they describe the recent selections and `count.sum() == seen` still
    # holds. Without, they sum the whole run (the paper's and the reference code's): a node that
    # stops being chosen keeps the count it earned earlier and is pruned only once the run has seen
    # about as many targets again; in a short run that is too late (the first layer of the README's
    # digits recipe after 48 kimg: 18-30 of 64 nodes chosen on the training images, every count
    # above 0.6/K).
    def fold(self, halflife=None):
        if halflife is not None:
            n = torch.cat(self.step_seen)                                        # (S,) targets of this step.
            keep = torch.pow(0.5, n / (halflife * self.node_ks))
            torch._foreach_mul_(self.fold_dst, [g for g in keep.unbind(0) for _ in range(4)])
        torch._foreach_add_(self.fold_dst, self.fold_src)
        torch._foreach_zero_(self.pending)

# Everything a plan depends on, by identity: a plan is valid while each of these is the same object.
def _plan_key(node_sets, mirror_sets, optimizer):
    key = [optimizer]
    for i, ns in enumerate(node_sets):
        st = ns.node_stats
        key += [st.count, st.near2, st.dist_acc, st.seen, st.num_splits, st.select_bias, *st.pending_tensors()]
        params = [param for param, _ in ns.node_params()]
        key += params + [p for ms in mirror_sets for p, _ in ms[i].node_params()]
        if optimizer is not None:
            key += [v for param in params for v in optimizer.state.get(param, {}).values() if torch.is_tensor(v)]
    return key

_plans = weakref.WeakKeyDictionary()    # model -> its last Plan.

# The plan of `model`, whose node sets are `node_sets` (mirrors: `mirror_sets`, one list per mirror):
# the cached one while every tensor it holds is still the same object, else a new one.
def get_plan(model, node_sets, mirror_sets, optimizer):
    key = _plan_key(node_sets, mirror_sets, optimizer)
    plan = _plans.get(model)
    if plan is None or len(plan.key) != len(key) or not all(map(operator.is_, plan.key, key)):
        plan = _plans[model] = Plan(node_sets, mirror_sets, optimizer, key)
    return plan

# ----------------------------------------------------------------------------
