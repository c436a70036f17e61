"""Shared pytest fixtures. Puts the repository root on sys.path, so tests import `dnnlib`,
`torch_utils` and `training` exactly as the scripts at the root do, without installing anything."""

import os
import socket
import sys
from pathlib import Path

import pytest
import torch

# The repository root (the folder holding train.py, dnnlib/, torch_utils/, training/).
REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

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
