"""Shared pytest fixtures. Puts the repository root on sys.path, so tests import `dnnlib`,
`torch_utils` and `training` exactly as the scripts at the root do, without installing anything."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

# The repository root (the folder holding train.py, dnnlib/, torch_utils/, training/).
REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from training.dataset import DigitsDataset
from training.networks import DDNGenerator
from training.split_prune import balance, find_node_sets

# The tests run tiny networks: one thread avoids the synchronisation overhead that dominates
# small ops and keeps the suite fast on a busy 2-core machine (torchrun children already get
# OMP_NUM_THREADS=1).
torch.set_num_threads(1)

# ----------------------------------------------------------------------------
# Path of the repository root.

@pytest.fixture
def repo_root():
    return REPO_ROOT

# ----------------------------------------------------------------------------
# Environment for child processes (fresh interpreters, torchrun): the repository and tests importable.

def child_env():
    env = os.environ.copy()
    paths = [str(REPO_ROOT), str(REPO_ROOT / 'tests')]
    if env.get('PYTHONPATH'):
        paths.append(env['PYTHONPATH'])
    env['PYTHONPATH'] = os.pathsep.join(paths)
    return env

@pytest.fixture
def subprocess_env():
    return child_env()

# ----------------------------------------------------------------------------
# A TCP port that is free on the loopback interface right now.

@pytest.fixture
def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(('127.0.0.1', 0))
        return sock.getsockname()[1]

# ----------------------------------------------------------------------------
# A private download cache ($DDN_CACHE_DIR), so tests never read or fill the user's ~/.cache/ddn.

@pytest.fixture
def ddn_cache_dir(tmp_path, monkeypatch):
    cache_dir = tmp_path / 'ddn-cache'
    monkeypatch.setenv('DDN_CACHE_DIR', str(cache_dir))
    return cache_dir

# ----------------------------------------------------------------------------
# The built-in digits at 8x8: images (N, 1, 8, 8) in [-1, 1] and their labels (N,).

@pytest.fixture(scope='session')
def digits():
    ds = DigitsDataset(resolution=8, use_labels=True)
    images = torch.from_numpy(np.stack([ds[i][0] for i in range(len(ds))])).float() / 127.5 - 1
    labels = torch.from_numpy(np.stack([ds.get_label(i) for i in range(len(ds))])).argmax(1)
    return images, labels

# An MLP digit classifier on those images (frozen); about 95% training accuracy after a second.
# The classifier guide's tests score candidates with it.

@pytest.fixture(scope='session')
def digit_classifier(digits):
    images, labels = digits
    torch.manual_seed(0)
    clf = nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    opt = torch.optim.Adam(clf.parameters(), lr=1e-2)
    for _ in range(150):
        loss = nn.functional.cross_entropy(clf(images), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    clf.eval().requires_grad_(False)
    assert (clf(images).argmax(1) == labels).float().mean() > 0.9
    return clf

# ----------------------------------------------------------------------------
# The tiny trained DDN that the generation, guidance and demo tests sample (test_generate.py,
# test_generate_guided.py, test_guidance.py, test_demo.py): 8x8 digits, K=16, max_blockn 2, 32 channels,
# trained 150 Adam steps (lr 3e-3, batch 64 drawn with a seeded generator) with Split-and-Prune after each
# step, on the first 1000 built-in digits; digits 1000.. stay unseen (the guidance tests take their
# conditions there). Trained once per session, in eval mode without gradients: tests must not modify it.

TINY_NET_TRAIN_IMAGES = 1000

@pytest.fixture(scope='session')
def tiny_net(digits):
    from training.split_prune import split_and_prune
    images = digits[0][:TINY_NET_TRAIN_IMAGES]
    torch.manual_seed(0)
    net = DDNGenerator(8, 1, max_outputk=16, max_blockn=2, max_channels=32)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    net.train()
    for _ in range(150):
        loss = net(target=images[torch.randint(0, len(images), (64,), generator=gen)]).losses.mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        split_and_prune(net, opt)
    return net.eval().requires_grad_(False)

# `tiny_net` as the training loop's snapshot pickle, dict(ema=...), alone in a run folder.
@pytest.fixture(scope='session')
def tiny_snapshot(tiny_net, tmp_path_factory):
    import pickle
    path = tmp_path_factory.mktemp('tiny-net') / 'network-snapshot-000001.pkl'
    with open(path, 'wb') as f:
        pickle.dump(dict(ema=tiny_net), f)
    return str(path)

# ----------------------------------------------------------------------------
# Overfitting a few images (test_networks.py, test_balance.py, test_recurrent.py). Each training
# run is made once per session and shared by the tests that look at it: they only read the result.

class OverfitRun:
    def __init__(self, net, splits, mse_before, mse_after, half_counts):
        self.net = net                      # The trained network (do not modify).
        self.splits = splits                # Total number of splits over the run.
        self.mse_before = mse_before        # Reconstruction MSE (encode) before training ...
        self.mse_after = mse_after          # ... and after.
        self.half_counts = half_counts      # (L, K) node counts of the second half of training.

# One balancing step after the optimizer step, `method` in 'tv', 'paper' (Split-and-Prune with
# that rule), 'bias' (selection bias) or 'none': the one place the tests call the balancing API.
def balance_step(net, optimizer, method, bias_rate):
    return balance(net, optimizer, method, bias_rate=bias_rate)

# Node counts (L, K) of every node set of `net`.
def node_counts(net):
    return torch.stack([ns.node_stats.count for ns in find_node_sets(net)])

# Train `net` on the images x for `steps` Adam steps (lr 3e-3), balancing after each step.
def overfit(net, x, method, steps, bias_rate=0.2):
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    mse_before = (net.encode(x)[1] - x).square().mean().item()
    splits = torch.zeros([], dtype=torch.int64)
    for step in range(steps):
        loss = net(target=x).losses.mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        splits += balance_step(net, opt, method, bias_rate)
        if step == steps // 2 - 1:
            half = node_counts(net)
    mse_after = (net.encode(x)[1] - x).square().mean().item()
    return OverfitRun(net, int(splits), mse_before, mse_after, node_counts(net) - half)

# `overfit` itself, for tests that train their own network (test_recurrent.py).
@pytest.fixture(scope='session')
def overfit_fn():
    return overfit

# A small generator overfitting the first 8 built-in digits for 300 steps with balancing `method`
# (same seed for every method): `overfit_digits(method)` -> OverfitRun, trained on first use.
@pytest.fixture(scope='session')
def overfit_digits(digits):
    runs = {}
    def get(method):
        if method not in runs:
            torch.manual_seed(0)
            net = DDNGenerator(8, 1, max_outputk=8, max_blockn=1, max_channels=16, chain_dropout=0.05)
            runs[method] = overfit(net, digits[0][:8], method, steps=300)
        return runs[method]
    return get

# ----------------------------------------------------------------------------
# tests/scripts/ddl_two_ranks.py under torchrun (2 gloo processes), launched once for all its
# rules: {rule: findings} (test_networks.py: 'tv', test_balance.py: 'bias').

@pytest.fixture(scope='session')
def ddl_two_ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp('ddl-two-ranks') / 'result.json'
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
           str(REPO_ROOT / 'tests' / 'scripts' / 'ddl_two_ranks.py'), str(out), 'tv', 'bias']
    proc = subprocess.run(cmd, env=child_env(), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())

# ----------------------------------------------------------------------------
# An untrained tiny network (8x8 grayscale, K=4) saved as .safetensors: the network file of the
# bad-input and output tests, which need a valid file and not a trained one.

NET_FILE_KWARGS = dict(img_resolution=8, img_channels=1, max_channels=8, max_blockn=1, max_outputk=4)

@pytest.fixture
def net_file(tmp_path):
    from training import snapshot
    torch.manual_seed(0)
    path = tmp_path / 'net.safetensors'
    snapshot.save_network_safe(DDNGenerator(**NET_FILE_KWARGS), path)
    return path
