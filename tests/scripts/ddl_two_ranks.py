"""Worker for tests/test_networks.py and tests/test_balance.py: run under `torchrun --nproc_per_node=2`
(gloo, CPU) as `ddl_two_ranks.py OUT.json [RULE ...]`.

For each rule (default 'tv'), each rank trains the same small DDN generator on different images for
a few steps, with gradients averaged by one all-reduce and Split-and-Prune after each step, then
checks that parameters and Split-and-Prune statistics are identical on both ranks ('bias' balances
by selection bias, whose per-node biases must then agree across ranks too). Rank 0 writes the
findings as JSON, {rule: findings}; one launch serves all rules.
"""

import json
import sys

import torch

from torch_utils import distributed, misc
from training.networks import DDNGenerator
from training.split_prune import balance, find_node_sets

# ----------------------------------------------------------------------------

# One rule: train, check the ranks agree, return rank 0's findings (None on other ranks).
def run(rule, steps=8):
    rank, world = distributed.get_rank(), distributed.get_world_size()
    torch.manual_seed(0)  # Same initial weights everywhere.
    net = DDNGenerator(8, 1, max_outputk=8, max_blockn=1, max_channels=16, chain_dropout=0.2)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    torch.manual_seed(100 + rank)  # Different data and chain dropout draws per rank.
    splits = torch.zeros([], dtype=torch.int64)
    for _ in range(steps):
        images = torch.rand(6, 1, 8, 8) * 2 - 1
        loss = net(target=images).losses.mean()
        opt.zero_grad()
        loss.backward()
        grads = [p.grad for p in net.parameters()]
        distributed.all_reduce_(grads)
        for g in grads:
            g.div_(world)
        opt.step()
        splits += balance(net, opt, rule, bias_rate=0.1)
    misc.check_ddp_consistency(net)  # Raises on any difference of parameters or buffers.
    seen = [float(ns.node_stats.seen) for ns in find_node_sets(net)]
    flat = torch.cat([p.detach().flatten() for p in net.parameters()] +
                     [ns.node_stats.count for ns in find_node_sets(net)] +
                     [ns.node_stats.select_bias for ns in find_node_sets(net)])
    bias_max = max(float(ns.node_stats.select_bias.abs().max()) for ns in find_node_sets(net))
    gathered = [torch.zeros_like(flat) for _ in range(world)] if rank == 0 else None
    torch.distributed.gather(flat, gathered, dst=0)
    if rank != 0:
        return None
    max_diff = max(float((g - gathered[0]).abs().max()) for g in gathered)
    return dict(world=world, splits=int(splits), max_diff=max_diff, seen=seen, bias_max=bias_max)

# Every rule in one launch (one process group); rank 0 writes {rule: findings}.
def main(out_path, *rules):
    distributed.init()
    results = {rule: run(rule) for rule in rules or ('tv',)}
    if distributed.get_rank() == 0:
        with open(out_path, 'w') as f:
            json.dump(results, f)
    distributed.shutdown()

if __name__ == '__main__':
    main(*sys.argv[1:])
