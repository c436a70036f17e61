"""Tests of tree.py: layout of the recursive grid, node images, and the CLI's PNG."""

import os
import pickle

import numpy as np
import PIL.Image
import pytest
import torch
from click.testing import CliRunner
from torch.nn import functional as F

import tree
from training.images import to_uint8
from training.networks import DDNGenerator

@pytest.fixture(scope='module')
def tiny_net():
    torch.manual_seed(0)
    return DDNGenerator(img_resolution=8, img_channels=1, max_outputk=8, max_blockn=1, max_channels=32).eval()

def test_grid_layout():
    assert [tree.grid_side(k) for k in (1, 2, 8, 9, 24, 25)] == [3, 3, 3, 5, 5, 7]
    cells = tree.child_cells(8)
    assert len(set(cells)) == 8 and (1, 1) not in cells
    assert tree.tree_size([8, 8, 8], 24) == 27 * 24

def test_node_images_are_the_layers_choices(tiny_net):
    images, mean = tree.node_images(tiny_net, 2, batch=20)     # Several batches.
    assert images[0].shape == (8, 1, 8, 8) and images[1].shape == (64, 1, 8, 8) and mean.shape == (1, 8, 8)
    out = tiny_net(codes=torch.tensor([[3, 5]]), num_layers=2, return_layers=True)
    for level, node in [(0, 3), (1, 3 * 8 + 5)]:
        image = F.interpolate(out.layer_images[level], size=(8, 8), mode='bilinear', align_corners=False)
        expected = to_uint8(image)[0].numpy().astype(int)
        assert np.abs(images[level][node].astype(int) - expected).max() <= 1

def test_cli_draws_png_of_expected_size_from_run_folder(tmp_path, tiny_net):
    run = tmp_path / 'run'
    os.makedirs(run)
    for kimg in (0, 5):
        with open(run / f'network-snapshot-{kimg:06d}.pkl', 'wb') as f:
            pickle.dump(dict(ema=tiny_net), f)
    out = tmp_path / 'tree.png'
    result = CliRunner().invoke(tree.main, ['--network', str(run), '--levels', '2', '--cell', '20', '--out', str(out), '--device', 'cpu'])
    assert result.exit_code == 0, result.output
    assert 'network-snapshot-000005.pkl' in result.stdout
    with PIL.Image.open(out) as image:
        assert image.size == (9 * 20, 9 * 20) and image.mode == 'RGB'
        pixels = np.asarray(image)
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 8     # Images and coloured frames, not a blank.

def test_cli_levels_beyond_the_network(tmp_path, tiny_net):
    pkl = tmp_path / 'net.pkl'
    with open(pkl, 'wb') as f:
        pickle.dump(dict(ema=tiny_net), f)
    result = CliRunner().invoke(tree.main, ['--network', str(pkl), '--levels', '5', '--out', str(tmp_path / 't.png'), '--device', 'cpu'])
    assert result.exit_code != 0 and 'L=4' in result.output
