"""The per-layer Split-and-Prune pass, kept as the test oracle of the batched one.

`split_and_prune_per_layer` is the pass this project used up to commit 3f4006a: the same decisions
and arithmetic as `training.split_prune.split_and_prune`, but the fold, the copy back and the row
copies one node set at a time (a few operations per layer). tests/test_split_prune.py checks that
the batched pass is bit-identical to it; bench/split_prune.py times both. Also here: the reference
net's node sets (`make_setup`), random observations for them (`observe_all`) and the operation count
of a pass (`count_ops`), shared by that test and that benchmark.
"""

import copy

import torch

from torch_utils import distributed
from training.ddl import DiscreteDistributionLayer
from training.split_prune import decide, find_node_sets, redistribute

# ATen operations that only make views or metadata (no kernel runs).
METADATA_OPS = {
    'aten::view', 'aten::unbind', 'aten::select', 'aten::slice', 'aten::as_strided', 'aten::detach',
    'aten::alias', 'aten::expand', 'aten::reshape', 'aten::_reshape_alias', 'aten::unsqueeze',
    'aten::squeeze', 'aten::t', 'aten::transpose', 'aten::permute', 'aten::lift_fresh',
    'aten::result_type', 'aten::resolve_conj', 'aten::resolve_neg', 'aten::empty', 'aten::empty_strided',
    'aten::split', 'aten::split_with_sizes', 'aten::narrow', 'aten::_unsafe_view', 'detach',
}

# ----------------------------------------------------------------------------
# The per-layer pass (before batching). Same decisions and arithmetic, one node set at a time.

@torch.no_grad()
def _copy_node_rows_per_layer(tensors, rows, do, s, d):
    ar = torch.arange(rows, device=do.device)
    dst = d * rows + ar
    src = torch.where(do, s * rows + ar, dst)
    for tensor in tensors:
        tensor.index_copy_(0, dst, tensor.index_select(0, src))

@torch.no_grad()
def split_and_prune_per_layer(model, optimizer=None, mirrors=(), rule='tv'):
    node_sets = find_node_sets(model)
    mirror_sets = [find_node_sets(m) for m in mirrors]
    device = node_sets[0].node_stats.count.device
    distributed.all_reduce_([t for ns in node_sets for t in ns.node_stats.pending_tensors()])
    for ns in node_sets:
        ns.node_stats.fold()
    total_splits = torch.zeros([], dtype=torch.int64, device=device)
    groups = {}
    for idx, ns in enumerate(node_sets):
        groups.setdefault((ns.K, ns.node_stats.track_near2), []).append(idx)
    for (K, track_near2), members in groups.items():
        stats = [node_sets[i].node_stats for i in members]
        count = torch.stack([st.count for st in stats])
        near2 = torch.stack([st.near2 for st in stats]) if track_near2 else None
        dist_acc = torch.stack([st.dist_acc for st in stats])
        decision = decide(count, dist_acc, rule=rule)
        new_count, new_near2, new_dist = redistribute(count, near2, dist_acc, decision)
        for g, st in enumerate(stats):
            st.count.copy_(new_count[g])
            if track_near2:
                st.near2.copy_(new_near2[g])
            st.dist_acc.copy_(new_dist[g])
            st.num_splits.add_(decision.do_split[g].long())
        total_splits += decision.do_split.sum()
        for g, i in enumerate(members):
            do, s, d = decision.do_split[g], decision.i_split[g], decision.i_prune[g]
            mirrored = [ms[i].node_params() for ms in mirror_sets]
            for p, (param, rows) in enumerate(node_sets[i].node_params()):
                tensors = [param.data] + [m[p][0].data for m in mirrored]
                if optimizer is not None:
                    state = optimizer.state.get(param, {})
                    tensors += [v for v in state.values() if torch.is_tensor(v) and v.shape == param.shape]
                _copy_node_rows_per_layer(tensors, rows, do, s, d)
    return total_splits

# ----------------------------------------------------------------------------
# The reference net's node sets: L DDLs on 256 feature channels (leak: 128 per head), RGB, K = 64.

def make_setup(num_layers=63, K=64, device='cpu', seed=0):
    torch.manual_seed(seed)
    model = torch.nn.ModuleList([DiscreteDistributionLayer(256, 3, K, index=l, num_layers=num_layers)
                                 for l in range(num_layers)]).to(device)
    ema = copy.deepcopy(model).requires_grad_(False)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    for p in model.parameters():                    # One step, so that Adam has state rows to copy.
        p.grad = torch.randn_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return model, ema, optimizer

# One batch of random selection distances (B, K) per layer, the same for both setups.
def observe_all(models, batch, generator):
    K = find_node_sets(models[0])[0].K
    for l in range(len(find_node_sets(models[0]))):
        dist = torch.rand(batch, K, generator=generator).to(find_node_sets(models[0])[l].node_stats.count.device)
        dist = dist ** 3                            # Uneven node usage, so that layers split.
        for model in models:
            find_node_sets(model)[l].node_stats.select(dist)

# Operations issued per pass (and kernels launched on CUDA), from one profiled pass.
def count_ops(fn, cuda):
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
    with torch.profiler.profile(activities=activities) as prof:
        fn()
        if cuda:
            torch.cuda.synchronize()
    events = prof.events()
    ops = sum(1 for e in events if e.cpu_parent is None and e.name.startswith('aten::') and e.name not in METADATA_OPS)
    kernels = sum(1 for e in events if e.device_type == torch.autograd.DeviceType.CUDA) if cuda else None
    return ops, kernels

# ----------------------------------------------------------------------------
