"""Tests of conditional DDNs: condition transforms, the network's condition input, and a brief
colour-conditional training that colours grayscale inputs better than an unconditional net."""

import numpy as np
import pytest
import torch

from training.conditions import condition_tensor, parse_condition
from training.image_ops import edge_map, grayscale
from training.dataset import DigitsDataset
from training.networks import DDNGenerator
from training.split_prune import split_and_prune

# ----------------------------------------------------------------------------
# Parsing and transforms.

def test_parse_condition():
    assert parse_condition('class') == ('class', 0)
    assert parse_condition('resize8') == ('resize', 8)
    for bad in ['resize6', 'resize', 'colour', '', 'resize0']:
        with pytest.raises(ValueError, match='Unknown condition'):
            parse_condition(bad)

def test_condition_tensor_shapes_and_semantics():
    torch.manual_seed(0)
    x = torch.rand(4, 3, 16, 16) * 2 - 1
    assert condition_tensor('resize4', x).shape == (4, 3, 4, 4)
    torch.testing.assert_close(condition_tensor('resize4', x)[:, :, 0, 0], x[:, :, :4, :4].mean((2, 3)))
    eval_gray = condition_tensor('color', x, training=False)
    torch.testing.assert_close(eval_gray, x.mean(1, keepdim=True))
    g = torch.Generator().manual_seed(1)
    train_gray = condition_tensor('color', x, training=True, generator=g)
    assert train_gray.shape == (4, 1, 16, 16) and not torch.allclose(train_gray, eval_gray)
    # Random weights are a convex mix: the result stays within the channel range.
    assert (train_gray <= x.max(1, keepdim=True).values + 1e-6).all()
    labels = torch.eye(10)[[1, 2, 3, 4]]
    assert torch.equal(condition_tensor('class', labels=labels), labels)
    with pytest.raises(ValueError, match='one-hot labels'):
        condition_tensor('class', images=x)
    with pytest.raises(ValueError, match='RGB'):
        condition_tensor('color', x[:, :1])

def test_edge_map_marks_a_step():
    img = -torch.ones(1, 1, 8, 8)
    img[..., 4:] = 1
    edges = condition_tensor('edge', img)
    assert set(edges.unique().tolist()) <= {-1.0, 1.0}
    assert (edges[0, 0, :, 3:5] == 1).all() and (edges[0, 0, :, :2] == -1).all() and (edges[0, 0, :, 6:] == -1).all()
    # The condition is the hard form of guidance's one edge map: the soft map thresholded at 1/2.
    x = torch.rand(2, 3, 8, 8) * 2 - 1
    torch.testing.assert_close(condition_tensor('edge', x), (edge_map(x) > 0.5).float() * 2 - 1)

# ----------------------------------------------------------------------------
# The network's condition input.

def test_conditional_network_uses_its_condition():
    torch.manual_seed(0)
    net = DDNGenerator(8, 3, max_outputk=8, max_blockn=1, max_channels=16, condition='color').eval()
    x = torch.rand(2, 3, 8, 8) * 2 - 1
    a = net(seeds=[0, 1], condition=grayscale(x)).images
    b = net(seeds=[0, 1], condition=-grayscale(x)).images
    assert not torch.allclose(a, b)
    with pytest.raises(ValueError, match='conditioned on'):
        net(seeds=[0])
    with pytest.raises(ValueError, match='must have shape'):
        net(seeds=[0, 1], condition=x)
    uncond = DDNGenerator(8, 3, max_outputk=8, max_blockn=1, max_channels=16)
    with pytest.raises(ValueError, match='unconditional'):
        uncond(seeds=[0], condition=grayscale(x[:1]))

def test_class_conditional_network():
    torch.manual_seed(0)
    net = DDNGenerator(8, 1, max_outputk=8, max_blockn=1, max_channels=16, condition='class', label_dim=10).eval()
    assert net.label_dim == 10
    one, two = torch.eye(10)[[1]], torch.eye(10)[[2]]
    assert not torch.allclose(net(seeds=[0], condition=one).images, net(seeds=[0], condition=two).images)
    with pytest.raises(ValueError, match='label_dim'):
        DDNGenerator(8, 1, condition='class')

# ----------------------------------------------------------------------------
# Colourisation: digits tinted with a colour that depends on the digit's class. Briefly trained
# colour-conditional nets (sampling with the grayscale as condition) beat same-budget unconditional
# nets steered zero-shot toward the same grayscale (luminance guidance), on average over 3 seeds.
#
# Measured (224 training digits, batch 64, lr 3e-3; MSE on 32 held-out digits, seeds 0/1/2;
# conditional vs unconditional + luminance guidance):
#   150 steps, per-image colour weights (ours): 0.198/0.251, 0.237/0.257, 0.224/0.271 -> ratio of means 0.85
#   150 steps, per-batch weights (the author's): 0.190/0.251, 0.241/0.257, 0.243/0.271 -> 0.87
#    75 steps: 0.214/0.266, 0.311/0.278, 0.231/0.238 -> 0.95 (one seed loses: too short to test)
#   450 steps: 0.197/0.209, 0.215/0.216, 0.191/0.251 -> 0.89 (the guided net catches up on some seeds)
#   150 steps, 1541 training digits (256 held out): 0.209/0.248, 0.223/0.223, 0.214/0.251 -> 0.89
#   150 steps under ATEN_CPU_CAPABILITY=default (other kernels, other rounding, other runs):
#       0.204/0.232, 0.211/0.253, 0.236/0.272 -> 0.86
# Single seeds vary by about +-0.07 in the ratio (and a different CPU kernel set acts like a
# different seed), which is why the old one-seed test failed on some machines. The mean of three
# keeps a margin of about 0.1 below the 0.95 bound under both capabilities.

def _tinted_digits(n=256):
    ds = DigitsDataset(resolution=8)
    tints = torch.tensor([[1.0, 0.2, 0.2], [0.2, 1.0, 0.2], [0.2, 0.2, 1.0]])
    imgs, labels = [], []
    for i in range(n):
        img, label = ds[i]
        imgs.append(torch.tensor(img, dtype=torch.float32) / 255)
        labels.append(int(np.argmax(label)) if len(label) else i % 10)
    gray = torch.stack(imgs)                                    # (n, 1, 8, 8) in [0, 1].
    tint = tints[torch.tensor(labels) % 3][:, :, None, None]    # Colour follows the class.
    return (gray * tint) * 2 - 1

def _train(net, x, steps, seed):
    torch.manual_seed(seed)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(seed)
    for step in range(steps):
        batch = x[torch.randint(0, len(x), (64,), generator=g)]
        cond = net.make_condition(batch, generator=g)
        loss = net(target=batch, condition=cond).losses.mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        split_and_prune(net, opt)
    return net.eval()

def test_color_conditional_beats_unconditional_colourisation_on_average():
    x = _tinted_digits()
    train, test = x[:224], x[224:]
    kwargs = dict(img_resolution=8, img_channels=3, max_outputk=16, max_blockn=2, max_channels=32)
    gray = condition_tensor('color', test)                      # The eval-time condition: the channel mean.
    seeds = list(range(len(test)))
    def luminance_scorer(cand, info):
        target = torch.nn.functional.interpolate(gray, size=cand.shape[-2:], mode='area')
        return (cand.mean(2) - target[:, None, 0]).square().mean((2, 3))
    errs = []
    for seed in range(3):
        torch.manual_seed(seed)
        cond_net = _train(DDNGenerator(condition='color', **kwargs), train, 150, seed=seed)
        torch.manual_seed(seed)
        uncond_net = _train(DDNGenerator(**kwargs), train, 150, seed=seed)
        with torch.no_grad():
            coloured = cond_net(seeds=seeds, condition=gray).images
            guided = uncond_net(seeds=seeds, scorer=luminance_scorer).images
        errs.append(((coloured - test).square().mean().item(), (guided - test).square().mean().item()))
    print('colourisation MSE (conditional, unconditional + luminance guidance) per seed:', errs)
    err_cond, err_uncond = np.mean(errs, axis=0)
    assert err_cond < 0.95 * err_uncond, errs
