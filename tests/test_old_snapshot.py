"""A snapshot written before the package move (commit 4aa7b5a, tests/data/old_snapshot/) still loads, from
its pickle and its safetensors file, and samples bit-identically the images recorded when it was written."""

import os

import numpy as np
import pytest
import torch

from sampling.generation import generate_batches
from training.snapshot import load_network

DATA = os.path.join(os.path.dirname(__file__), 'data', 'old_snapshot')

@pytest.mark.parametrize('name', ['network-snapshot-000000.pkl', 'network-snapshot-000000.safetensors'])
def test_old_snapshot_samples_bit_identically(name):
    torch.set_num_threads(1)
    _, net = load_network(os.path.join(DATA, name))           # No trust_pickle: the restricted unpickler.
    images = torch.cat([b.images for b in generate_batches(net, list(range(8)), batch=8)]).cpu().numpy()
    expected = np.load(os.path.join(DATA, 'images-seeds0-7.npy'))
    assert images.dtype == expected.dtype and images.shape == expected.shape == (8, 1, 8, 8)
    np.testing.assert_array_equal(images, expected)
