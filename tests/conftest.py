"""Shared pytest fixtures. Puts the repository root on sys.path, so tests import `dnnlib`,
`torch_utils` and `training` exactly as the scripts at the root do, without installing anything."""

import os
import socket
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

from training.dataset import DigitsDataset  # noqa: E402

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

@pytest.fixture
def subprocess_env():
    env = os.environ.copy()
    paths = [str(REPO_ROOT), str(REPO_ROOT / 'tests')]
    if env.get('PYTHONPATH'):
        paths.append(env['PYTHONPATH'])
    env['PYTHONPATH'] = os.pathsep.join(paths)
    return env

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
