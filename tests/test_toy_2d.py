"""Tests of the 2D density toy: densities, sampling and KL conventions, Split-and-Prune vs plain
gradient descent, and the CLI's outputs (last line, points file, GIF)."""

import numpy as np
import PIL.Image
import pytest
import torch
from click.testing import CliRunner

import toy_2d
from training.split_prune import SplittableNodes, find_node_sets

@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

@pytest.mark.parametrize('name', sorted(toy_2d.BUILTIN_DENSITIES))
def test_builtin_densities_are_probability_maps(name):
    d = toy_2d.load_density(name, 40)
    assert d.shape == (40, 40) and d.dtype == np.float64
    assert np.isclose(d.sum(), 1) and (d > 0).all()

def test_blur_circles_has_empty_cells_and_sharp_top_left():
    d = toy_2d.load_density('blur_circles', 100)
    assert d.min() < 1e-20 < d.max()                          # Empty cells carry only the epsilon mass.
    # A ring centred at (25, 25): its hole is empty in the sharp (top-left) quadrant.
    assert d[25, 25] < 1e-20 and d[25, 25 + 7] > 1e-5

def test_sampling_and_kl_conventions():
    rng = np.random.default_rng(0)
    d = np.zeros((4, 4))
    d[0, 3] = 1.0                                              # All mass in the top-right cell.
    xy = toy_2d.sample_density(d, 1000, rng)
    assert (xy[:, 0] > 0.5).all() and (xy[:, 1] > 0.5).all()  # x right, y up, domain [-1, 1].
    assert toy_2d.kl_divergence(xy, d) == pytest.approx(0)
    # Points at the cell centres in exact proportion to the map: zero KL; all in one cell: -log q.
    q = np.array([[0.5, 0.25], [0.125, 0.125]])
    centres = np.array([[-0.5, 0.5]] * 4 + [[0.5, 0.5]] * 2 + [[-0.5, -0.5], [0.5, -0.5]])
    assert toy_2d.kl_divergence(centres, q) == pytest.approx(0, abs=1e-12)
    assert toy_2d.kl_divergence(np.array([[0.5, -0.5]]), q) == pytest.approx(np.log(8))

def test_free_points_are_splittable_nodes():
    model = toy_2d.FreePoints(5, init=np.zeros((5, 2)))
    assert find_node_sets(model) == [model] and isinstance(model, SplittableNodes)
    assert model.node_params() == [(model.points, 1)]
    batch = torch.tensor([[0.5, 0.0], [0.0, -1.0]])
    loss = model(batch)
    assert loss.shape == (2,) and torch.allclose(loss, torch.tensor([0.25, 1.0]))
    assert model.node_stats.pending_seen == 2
    assert model.node_stats.near2.numel() == 0 and model.node_stats.pending_near2.numel() == 0  # O(K) statistics.

# With --balance=bias the points' training selection follows the balancing bias, as the DDL's does;
# evaluation (and the returned distances' meaning) stays the plain nearest point.
def test_free_points_training_selection_uses_the_bias():
    model = toy_2d.FreePoints(2, init=np.array([[0.0, 0.0], [1.0, 0.0]]))
    model.node_stats.select_bias.copy_(torch.tensor([3.0, -3.0], dtype=torch.float64))
    batch = torch.tensor([[0.4, 0.0]])                     # Nearest to point 0 (0.16 vs 0.36).
    assert torch.allclose(model(batch), torch.tensor([0.36]))  # exp(3) * 0.16 > exp(-3) * 0.36.
    assert model.node_stats.pending_count.tolist() == [0.0, 1.0]
    assert torch.allclose(model.eval()(batch), torch.tensor([0.16]))

# Fit K points with and without Split-and-Prune from the same seed.
def _fit(method, K=64, steps=300, seed=0):
    density = toy_2d.load_density('blur_circles', 20)
    torch.manual_seed(seed)
    model = toy_2d.FreePoints(K)
    optimizer = toy_2d.make_optimizer(model, 'adam', 3e-3)
    toy_2d.fit(model, optimizer, density, steps, 40, np.random.default_rng(seed), method=method)
    points = model.points.detach().numpy().astype(np.float64)
    dead = toy_2d.count_dead(points, toy_2d.sample_density(density, 50_000, np.random.default_rng(seed + 1)))
    return toy_2d.kl_divergence(points, density), dead, model

def test_split_and_prune_beats_plain_gradient_descent():
    kl_sp, dead_sp, model = _fit('tv')
    kl_gd, dead_gd, _ = _fit('none')
    assert int(model.node_stats.num_splits) > 0
    assert dead_sp == 0, f'{dead_sp} dead points left by Split-and-Prune'
    assert dead_gd > 0                                         # The ablation does leave dead points ...
    assert kl_sp < kl_gd / 2, (kl_sp, kl_gd)                   # ... and fits the density much worse.

def test_cli_points_gif_and_last_line(tmp_path):
    gif, npy = tmp_path / 'toy.gif', tmp_path / 'points.npy'
    args = ['--density', 'gaussian,blur_circles', '--k', '50', '--steps', '40', '--bins', '20',
            '--frames', '4', '--size', '32', '--gif', str(gif), '--out', str(npy)]
    result = CliRunner().invoke(toy_2d.main, args)
    assert result.exit_code == 0, result.output
    lines = result.stdout.strip().splitlines()                # Progress bars go to stderr.
    assert lines[-1].startswith('kl=') and float(lines[-1][3:]) >= 0
    assert [line.split()[0] for line in lines if 'kl_real_samples=' in line] == ['gaussian', 'blur_circles']
    points = np.load(npy)
    assert points.shape == (50, 2) and np.isfinite(points).all()
    with PIL.Image.open(gif) as image:
        assert image.size == (64, 32)                          # Points | density, 32 px each.
        assert image.n_frames == 8                             # 4 frames per density, carried over.

def test_cli_rejects_unknown_density():
    result = CliRunner().invoke(toy_2d.main, ['--density', 'no_such_density', '--steps', '1'])
    assert result.exit_code != 0 and 'no_such_density' in result.output

@pytest.mark.skipif(toy_2d.playground_image_dir() is None, reason='distribution-playground is not installed')
def test_playground_image_densities():
    for name in ['QR_code', 'spiral', 'words']:
        d = toy_2d.load_density(name, 50)
        assert d.shape == (50, 50) and np.isclose(d.sum(), 1)
        assert d.min() < d.max() / 100                         # Dark pixels are (nearly) empty cells.
