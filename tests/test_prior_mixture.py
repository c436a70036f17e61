"""The mixture prior (training/prior.py MixturePrior): transformer + pairwise conditional + frequencies."""

import pytest
import torch

from training import prior as prior_lib
from training import prior_files
from training import prior_rule
from training import prior_training
from training.prior import MixturePrior

KS = [4, 8, 8, 6, 8]

# Codes where layer 3 is a noisy function of layer 1 and layer 4 of layer 0; the rest independent, skewed.
def _source(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    codes = torch.stack([torch.randint(0, k, [n], generator=g) for k in KS], dim=1)
    codes[:, 2] = torch.where(torch.rand(n, generator=g) < 0.5, 0, codes[:, 2])
    noise = torch.rand(n, generator=g) < 0.2
    codes[:, 3] = torch.where(noise, torch.randint(0, 6, [n], generator=g), codes[:, 1] % 6)
    codes[:, 4] = torch.where(torch.rand(n, generator=g) < 0.3, torch.randint(0, 8, [n], generator=g), codes[:, 0] * 2)
    return codes

# A mixture with random transformer weights, pairs counted on `codes`, and non-trivial weights.
def _mixture(codes, seed=0):
    torch.manual_seed(seed)
    p = MixturePrior(KS, dim=16, depth=1, heads=2, dropout=0.0)
    with torch.no_grad():
        for param in p.transformer.parameters():
            param.add_(torch.randn_like(param) * 0.5)
        p.set_counts(codes, parents=[-1, 0, 1, 1, 0], alphas=[1, 3, 10, 1, 2])
        w = torch.rand(len(KS), 3, generator=torch.Generator().manual_seed(seed))
        p.weights.copy_(w / w.sum(1, keepdim=True))
    return p.eval()

def test_choose_pairs_finds_the_parents():
    codes = _source(3000)
    parents, alphas = prior_lib.choose_pairs(codes[:2500], codes[2500:], KS)
    assert parents[3] == 1 and parents[4] == 0
    assert parents[0] == -1 and all(j < l for l, j in enumerate(parents))

def test_mixture_never_worse_than_its_components_on_validation_codes():
    codes = _source(1200, seed=1)
    fit, val = codes[:1000], codes[1000:]
    p = _mixture(fit)
    p.set_counts(fit, *prior_lib.choose_pairs(fit, val, KS))
    weights = prior_lib.fit_mixture_weights(p, val)
    assert torch.allclose(weights.sum(1), torch.ones(len(KS))) and (weights >= 0).all()
    mixed = prior_lib.bits_per_image(p, val)
    for c in range(3):          # Each component alone (a vertex of the simplex), per layer too.
        with torch.no_grad():
            p.weights.copy_(torch.eye(3)[c].expand(len(KS), -1))
        assert mixed <= prior_lib.bits_per_image(p, val) + 1e-6, prior_lib.MIXTURE_COMPONENTS[c]
    # And strictly better than the frequencies where a layer depends on another one.
    with torch.no_grad():
        p.weights.copy_(weights)
    assert mixed < prior_lib.bits_per_image(prior_lib.fit_frequency_prior(fit, KS), val) - 1.0
    # One set of weights for all layers: never better than per layer on the same codes.
    prior_lib.fit_mixture_weights(p, val, per_layer=False)
    assert (p.weights == p.weights[0]).all()
    assert prior_lib.bits_per_image(p, val) >= mixed - 1e-6

def test_frequency_weights_give_the_baseline_exactly():
    codes = _source(500, seed=2)
    p = _mixture(codes)
    with torch.no_grad():
        p.weights.copy_(torch.tensor([0.0, 0.0, 1.0]).expand(len(KS), -1))
    freq = prior_lib.fit_frequency_prior(codes, KS)
    torch.testing.assert_close(p.log_probs(codes[:20]), freq.log_probs(codes[:20]), atol=1e-6, rtol=0)

def test_rows_depend_only_on_the_codes_above_and_step_matches():
    codes = _source(400, seed=3)
    p = _mixture(codes)
    c = codes[:6]
    lp = p.log_probs(c)
    for l in range(len(KS)):
        other = c.clone()
        other[:, l:] = 99 if l % 2 else 0
        assert torch.equal(p.log_probs(other)[:, l], lp[:, l]), l
    assert not torch.equal(p.log_probs(torch.where(torch.arange(5) == 1, (c + 1) % 4, c))[:, 3], lp[:, 3])
    state, prev = p.begin(6), None
    for l in range(len(KS)):
        torch.testing.assert_close(p.step(state, prev), lp[:, l], atol=1e-5, rtol=1e-5)
        prev = c[:, l]
    torch.testing.assert_close(lp[:, :, :].exp().sum(2), torch.ones(6, len(KS)))

def test_round_trip_through_the_prior_file(tmp_path):
    codes = _source(400, seed=4)
    p = _mixture(codes)
    path = tmp_path / 'net.prior.safetensors'
    prior_files.save_prior(p, path)
    q = prior_files.load_prior(path)
    assert type(q) is MixturePrior and q.ks == KS
    assert torch.equal(q.parent, p.parent) and torch.equal(q.weights, p.weights)
    assert torch.equal(q.log_probs(codes[:9]), p.log_probs(codes[:9]))

def test_samples_are_per_seed_deterministic():
    codes = _source(400, seed=5)
    p = _mixture(codes)
    u = torch.rand(12, len(KS), generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    whole = prior_rule.sample(p, u, temperature=0.9)
    single = torch.cat([prior_rule.sample(p, u[i:i + 1], temperature=0.9) for i in range(12)])
    assert torch.equal(whole, single) and torch.equal(whole, prior_rule.sample(p, u, temperature=0.9))
    # Follows the pairwise part: with all weight on it, layer 3 mostly copies layer 1 (mod 6).
    with torch.no_grad():
        p.set_counts(codes, parents=[-1, -1, -1, 1, -1], alphas=[1] * 5)
        p.weights.copy_(torch.tensor([0.0, 1.0, 0.0]).expand(len(KS), -1))
    s = prior_rule.sample(p, torch.rand(2000, len(KS), generator=torch.Generator().manual_seed(4), dtype=torch.float64))
    assert (s[:, 3] == s[:, 1] % 6).double().mean() > 0.7

def test_fit_prior_mixture_beats_the_frequency_baseline_on_held_out_codes():
    codes = _source(1600, seed=6)
    train, held = codes[:1300], codes[1300:]
    fit, val = prior_training.split_validation(train)
    p, _ = prior_training.fit_prior('mixture', KS, fit, val, steps=20, eval_every=10, dim=16, depth=1, heads=2, refit=train)
    freq = prior_lib.fit_frequency_prior(train, KS)
    assert prior_lib.bits_per_image(p, held) < prior_lib.bits_per_image(freq, held) - 1.0
    with pytest.raises(ValueError, match='validation codes'):
        prior_training.fit_prior('mixture', KS, fit, None, steps=1)

def test_bad_parents_are_refused():
    p = MixturePrior(KS, dim=16, depth=1, heads=2)
    with pytest.raises(ValueError, match='parents'):
        p.set_counts(_source(10), parents=[-1, 1, 0, 0, 0])

def test_refresh_and_train_prior_cli_with_a_mixture(tmp_path):
    from training.dataset import DigitsDataset
    from training.networks import DDNGenerator
    from training.prior_training import PriorRefresh
    from training.snapshot import save_network_safe
    torch.manual_seed(0)
    net = DDNGenerator(16, 1, max_channels=8, max_blockn=1, max_outputk=8).eval().requires_grad_(False)
    refresh = PriorRefresh(DigitsDataset(resolution=16), net.ks, 'cpu', kind='mixture', num_images=200, steps=10,
                           replay_samples=50, dim=16, depth=1, heads=2)
    report = refresh.refresh(net)
    assert isinstance(refresh.prior, MixturePrior) and report['prior_bits'] < report['uniform_bits']
    assert torch.allclose(refresh.prior.weights.sum(1), torch.ones(net.num_layers))
    # train_prior.py --kind mixture writes a prior file that loads as one.
    from click.testing import CliRunner

    import train_prior
    save_network_safe(net, tmp_path / 'net.safetensors')
    result = CliRunner().invoke(train_prior.main, [f'--network={tmp_path / "net.safetensors"}', '--kind=mixture', '--max-images=300',
                                                   '--steps=10', '--dim=16', '--depth=1', '--heads=2', '--samples=20', '--device=cpu'])
    assert result.exit_code == 0, result.output
    prior = prior_files.load_prior(tmp_path / 'net.prior.safetensors')
    assert isinstance(prior, MixturePrior) and 'mixture' in result.output
