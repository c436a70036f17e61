"""Tests of node usage on data (training/code_usage.py) and of what keeps it near uniform: statistics
that forget (`balance(..., halflife=)`), so that Split-and-Prune sees a node that stopped being chosen,
and the EMA network's rows following every split."""

import copy
import json
import math

import numpy as np
import pytest
import torch

import dnnlib
from torch_utils import misc
from training import pictures
from training import snapshot as snapshot_io
from training.code_usage import code_usage, usage_batch, usage_line, usage_on_data
from training.dataset import DigitsDataset
from training.ddl import DiscreteDistributionLayer
from training.loss import DDNLoss
from training.networks import DDNGenerator
from training.split_prune import balance, split_and_prune
from training.training_loop import training_loop
from training.training_step import TrainingStep, ema_beta, learning_rate

# ----------------------------------------------------------------------------
# code_usage on hand-built codes.

def test_code_usage_counts_nodes_and_entropy():
    codes = torch.tensor([[0, 1], [0, 2], [0, 3], [0, 0]])
    u = code_usage(codes, [4, 4])
    assert u['used'] == [1, 4] and u['ks'] == [4, 4]
    assert u['entropy'][0] == 0 and u['entropy'][1] == pytest.approx(2.0)
    assert usage_line(u) == 'used 1/4@0 H 0.50'
    with pytest.raises(ValueError, match='shape'):
        code_usage(codes, [4, 4, 4])

# ----------------------------------------------------------------------------
# Forgetting statistics.

# A layer whose 8 nodes all won 100 targets earlier in the run, then `steps` steps in which node 3
# wins nothing and every other node 2 targets; returns (splits, the layer).
def _node_stops_winning(halflife, steps=20, K=8):
    torch.manual_seed(0)
    layer = DiscreteDistributionLayer(8, 1, K, chain_dropout=0.0)
    st = layer.node_stats
    st.count.fill_(100)
    st.seen.fill_(100 * K)
    splits = []
    for _ in range(steps):
        st.pending_count.fill_(2)
        st.pending_count[3] = 0
        st.pending_seen.fill_(2 * (K - 1))
        splits.append(int(split_and_prune(layer, None, halflife=halflife)))
    return splits, layer

def test_forgetting_prunes_a_node_that_stopped_winning():
    # The whole run's sums: node 3 keeps its share of the early targets (above 1/2K), never pruned.
    splits, layer = _node_stops_winning(halflife=None)
    assert sum(splits) == 0 and layer.node_stats.count[3] == 100
    # Half-life 4 targets per node (32 targets, 2.3 steps of 14): node 3's share falls below 1/2K
    # once the old counts have shrunk to 6% (10 steps) and it is pruned then.
    splits, layer = _node_stops_winning(halflife=4)
    assert splits.index(1) == 9, splits
    st = layer.node_stats
    # Mass is conserved under forgetting: the counts sum to the (forgotten) number of targets.
    assert st.seen < 100 * 8 + 20 * 14
    assert st.count.sum().item() == pytest.approx(st.seen.item(), rel=1e-9)

def test_forgetting_rate_and_bad_halflife():
    layer = DiscreteDistributionLayer(8, 1, 4, chain_dropout=0.0)
    st = layer.node_stats
    st.count.fill_(10)
    st.seen.fill_(40)
    st.pending_count.fill_(1)
    st.pending_seen.fill_(4)
    balance(layer, None, 'none', halflife=2)     # 4 targets, half-life 2 * K = 8: keep 2 ** -0.5.
    keep = 2 ** -0.5
    torch.testing.assert_close(st.count, torch.full((4,), 10 * keep + 1, dtype=torch.float64))
    assert st.seen.item() == pytest.approx(40 * keep + 4)
    for bad in (0, -1.0, math.nan):
        with pytest.raises(ValueError, match='half-life'):
            balance(layer, None, 'tv', halflife=bad)

# ----------------------------------------------------------------------------
# The EMA network follows the splits of the training step: right after a step that splits node s
# onto node d, the EMA's rows of d equal its rows of s (copied, then averaged with equal rows).

def test_training_step_split_reaches_the_ema():
    torch.manual_seed(0)
    net = DDNGenerator(8, 1, max_outputk=8, max_blockn=1, max_channels=16, chain_dropout=0.0).train()
    ema = copy.deepcopy(net).eval().requires_grad_(False)
    with torch.no_grad():                        # An EMA that lags: different weights everywhere.
        for p in ema.parameters():
            p.mul_(0.5)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    step = TrainingStep(net, ema, DDNLoss(report_layers=False), opt, 8, balance_kwargs=dict(method='tv'))
    ddl, ema_ddl = net.ddls[0], ema.ddls[0]
    st = ddl.node_stats
    st.count.copy_(torch.tensor([40, 3, 5, 4, 0.5, 6, 2, 4], dtype=torch.float64))
    st.seen.fill_(st.count.sum())
    step.accumulate(torch.rand(8, 1, 8, 8) * 2 - 1)
    step.update(1e-3, 0.9)
    assert int(st.num_splits) == 1
    C = ddl.out_channels
    rows = lambda k: slice(k * C, (k + 1) * C)
    s = 0                                        # The most chosen node; its clone d has its weights.
    (d,) = [k for k in range(1, 8) if torch.equal(ddl.weight[rows(k)], ddl.weight[rows(s)])]
    assert torch.equal(ema_ddl.weight[rows(d)], ema_ddl.weight[rows(s)])
    assert not torch.equal(ema_ddl.weight[rows(d)], ddl.weight[rows(d)])   # It is still the EMA's own.

# ----------------------------------------------------------------------------
# The node-usage plot shows the usage on data beside the statistics, and its least used layer.

def test_node_usage_plot_shows_usage_on_data():
    net = DDNGenerator(8, 1, max_outputk=8, max_blockn=1, max_channels=8).eval()
    L, K = net.num_layers, net.ks[0]
    assert L == 4 and set(net.ks) == {K}
    codes = torch.arange(64)[:, None].repeat(1, L) % K      # Every node of every layer equally ...
    codes[:, 1] = 3                                          # ... but layer 1 uses one node only.
    plot = pictures.node_usage_plot(net, code_usage(codes, net.ks))
    ph = pictures.USAGE_PANEL_SIZE[1]
    assert pictures.usage_layers(L) == [0, 2, 3]
    assert plot.size[1] == 4 * ph                            # Layer 1, the least used, gets a panel too.
    orange = (np.asarray(plot) == pictures.DATA_COLOR).all(-1)
    bars = lambda row: int((np.diff(orange[row * ph:(row + 1) * ph].any(0).astype(int)) == 1).sum())
    assert [bars(row) for row in range(4)] == [K, 1, K, K]  # Panels of layers 0, 1, 2, 3.
    plain = pictures.node_usage_plot(net)                    # Without usage on data: statistics only.
    assert plain.size[1] == 3 * ph and not (np.asarray(plain) == pictures.DATA_COLOR).all(-1).any()

# ----------------------------------------------------------------------------
# The training loop reports the snapshot's usage on data at snapshot ticks: in the tick line,
# stats.jsonl and the plot.

def test_training_loop_reports_usage_on_data(tmp_path, capsys):
    run_dir = tmp_path / 'run'
    run_dir.mkdir()
    training_loop(run_dir=str(run_dir), seed=1, device='cpu', batch_size=20, total_kimg=0.06, kimg_per_tick=0.02,
        snapshot_ticks=3, state_dump_ticks=None, ema_halflife_kimg=0.01, lr_rampup_kimg=0,
        dataset_kwargs=dnnlib.EasyDict(class_name='training.dataset.DigitsDataset', resolution=8, max_size=50),
        data_loader_kwargs=dnnlib.EasyDict(num_workers=0),
        network_kwargs=dnnlib.EasyDict(class_name='training.networks.DDNGenerator', img_resolution=8, img_channels=1,
                                       max_blockn=1, max_outputk=8, max_channels=8),
        loss_kwargs=dnnlib.EasyDict(class_name='training.loss.DDNLoss'),
        optimizer_kwargs=dnnlib.EasyDict(class_name='torch.optim.Adam', lr=1e-2),
        balance_kwargs=dnnlib.EasyDict(method='tv', halflife=16))
    ticks = [line for line in capsys.readouterr().out.splitlines() if line.startswith('tick ')]
    # Snapshots at ticks 0 and 2 (the last): the usage on data is measured there only.
    assert [' data used ' in line for line in ticks] == [True, False, True], ticks
    stats = [json.loads(line) for line in (run_dir / 'stats.jsonl').read_text().splitlines()]
    assert stats[1]['Usage/layer0_used'] == stats[0]['Usage/layer0_used']    # The collector keeps the last snapshot's.
    last = stats[-1]
    # The snapshot (EMA) encodes the 50 training images: its layer 0 figures match code_usage's.
    snap = snapshot_io.load_network(str(run_dir))[1]
    images, labels = usage_batch(DigitsDataset(resolution=8, max_size=50))
    assert images.shape[0] == 50
    u = usage_on_data(snap, images)
    assert last['Usage/layer0_used']['mean'] == u['used'][0]
    assert last['Usage/layer0_bits']['mean'] == pytest.approx(u['entropy'][0])
    assert 0 < last['Usage/min_used_share']['mean'] <= 1 and 0 <= last['Usage/entropy_share']['mean'] <= 1
    assert f'data {usage_line(u)}' in ticks[-1]
    assert len(list(run_dir.glob('node-usage-*.png'))) == 2

# train.py --balance-halflife reaches split_prune.balance (balance_kwargs); omitted, the statistics never forget.
@pytest.mark.parametrize('args,expected', [([], dict(method='tv')), (['--balance-halflife=32'], dict(method='tv', halflife=32.0))])
def test_train_cli_balance_halflife(tmp_path, args, expected):
    import train
    from click.testing import CliRunner
    result = CliRunner().invoke(train.main, [f'--outdir={tmp_path / "out"}', '--dry-run', '--batch=50', *args])
    assert result.exit_code == 0, result.output
    config = json.loads(result.output[result.output.index('{') : result.output.rindex('}') + 1])
    assert config['balance_kwargs'] == expected

# ----------------------------------------------------------------------------
# The digits recipe (README's first command: lr 3e-3 with a 2-kimg ramp, batch 32, EMA 2 kimg, chain
# dropout 0, the tv rule) on a smaller net (K=16, one block per scale, 16 channels) for 300 steps.
# With statistics that never forget, the snapshot's first layer (1x1: its 16 candidates are scalars,
# the image's mean) already chooses only 14 of its 16 nodes on the training images (3.34 of 4 bits;
# 11 nodes and 2.94 bits after 400 steps); with a half-life of 32 targets per node, all 16 (3.90 bits).

def _digits_recipe_usage(halflife, steps=300, seed=0):
    images, _ = usage_batch(DigitsDataset(resolution=16), num=2000)
    torch.manual_seed(seed)
    net = DDNGenerator(16, 1, max_outputk=16, max_blockn=1, max_channels=16, chain_dropout=0.0).train()
    ema = copy.deepcopy(net).eval().requires_grad_(False)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    step = TrainingStep(net, ema, DDNLoss(report_layers=False), opt, 32, balance_kwargs=dict(method='tv', halflife=halflife))
    gen = torch.Generator().manual_seed(seed)
    for i in range(steps):
        misc.set_seed_for_step(seed, 0, i)
        step.accumulate(images[torch.randint(0, images.shape[0], (32,), generator=gen)])
        step.update(learning_rate(3e-3, i * 32, 2), ema_beta(i * 32, 32, 2, 0.05))
    return usage_on_data(ema, images[:512])

def test_usage_on_data_stays_near_uniform_on_the_digits_recipe():
    u = _digits_recipe_usage(halflife=32)
    assert u['ks'][0] == 16
    assert u['used'][0] == 16 and u['entropy'][0] > 3.7, u['entropy']
    assert min(u['used']) >= 15, u['used']
