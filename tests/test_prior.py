"""The code prior (training/prior.py): causality, files, sampling rules, and that it learns."""

import math

import pytest
import torch

from training import prior as prior_lib
from training import prior_files
from training import prior_rule
from training import prior_training
from training.ddl import uniform_to_codes
from training.prior import FrequencyPrior, TransformerPrior
from training.snapshot import UnsafeFileError

KS = [4, 8, 8, 3, 8]

# A transformer prior with random (non-zero) weights everywhere, head included.
def _random_prior(ks=KS, seed=0, **kwargs):
    torch.manual_seed(seed)
    p = TransformerPrior(ks, dim=32, depth=2, heads=2, dropout=0.0, **kwargs)
    with torch.no_grad():
        for param in p.parameters():
            param.add_(torch.randn_like(param) * 0.5)
    return p.eval()

def _random_codes(n, ks=KS, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randint(0, k, [n], generator=g) for k in ks], dim=1)

# A first-order Markov source over L layers of K codes: k_l = k_{l-1} + small noise (mod K),
# so every layer alone is uniform but the chain is very predictable.
def _markov_codes(n, L=6, K=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    codes = torch.zeros(n, L, dtype=torch.long)
    codes[:, 0] = torch.randint(0, K, [n], generator=g)
    for l in range(1, L):
        step = torch.randint(0, 2, [n], generator=g)
        codes[:, l] = (codes[:, l - 1] + step) % K
    return codes

def test_log_probs_shape_and_mask():
    p = _random_prior()
    lp = p.log_probs(_random_codes(5))
    assert lp.shape == (5, len(KS), max(KS))
    for l, k in enumerate(KS):
        assert torch.isinf(lp[:, l, k:]).all() and torch.isfinite(lp[:, l, :k]).all()
        torch.testing.assert_close(lp[:, l, :k].exp().sum(1), torch.ones(5))

@pytest.mark.parametrize('kind', ['transformer', 'frequency'])
def test_row_l_depends_only_on_codes_above(kind):
    p = _random_prior() if kind == 'transformer' else prior_lib.fit_frequency_prior(_random_codes(50), KS)
    codes = _random_codes(6)
    lp = p.log_probs(codes)
    for l in range(len(KS)):
        for fill in ('zeros', 'random', 'out-of-range'):
            other = codes.clone()
            other[:, l:] = {'zeros': 0, 'random': _random_codes(6, seed=l + 7)[:, l:], 'out-of-range': 99}[fill]
            assert torch.equal(p.log_probs(other)[:, l], lp[:, l]), (l, fill)
    if kind == 'transformer':   # And it does depend on the codes above (the test above could not fail otherwise).
        other = codes.clone()
        other[:, 0] = (other[:, 0] + 1) % KS[0]
        assert not torch.equal(p.log_probs(other)[:, 1], lp[:, 1])

def test_step_matches_log_probs():
    p = _random_prior()
    codes = _random_codes(7)
    lp = p.log_probs(codes)
    state, prev = p.begin(7), None
    for l in range(len(KS)):
        row = p.step(state, prev)
        torch.testing.assert_close(row, lp[:, l], atol=1e-5, rtol=1e-5)
        prev = codes[:, l]

@pytest.mark.parametrize('kind', ['transformer', 'frequency'])
def test_save_load_round_trip(tmp_path, kind):
    p = _random_prior() if kind == 'transformer' else prior_lib.fit_frequency_prior(_random_codes(50), KS)
    path = tmp_path / 'net.prior.safetensors'
    prior_files.save_prior(p, path, extra_metadata=dict(held_out_bits=12.5))
    q = prior_files.load_prior(path)
    assert type(q) is type(p) and q.ks == KS and not q.training
    codes = _random_codes(9)
    assert torch.equal(q.log_probs(codes), p.log_probs(codes))
    assert prior_files.prior_metadata(path.read_bytes())['held_out_bits'] == 12.5

def test_load_refuses_other_files(tmp_path):
    from training.networks import DDNGenerator
    from training.snapshot import save_network_safe
    net = DDNGenerator(4, 1, max_channels=8, max_blockn=1, max_outputk=4)
    save_network_safe(net, tmp_path / 'net.safetensors')
    with pytest.raises(ValueError, match='not a prior file'):
        prior_files.load_prior(tmp_path / 'net.safetensors')
    (tmp_path / 'junk.safetensors').write_bytes(b'not a file at all')
    with pytest.raises(ValueError, match='not a safetensors file'):
        prior_files.load_prior(tmp_path / 'junk.safetensors')
    # A prior file naming another class is refused before anything is built.
    data = prior_files.prior_bytes(_random_prior()).replace(b'training.prior.TransformerPrior', b'training.prior.TransformerPriox')
    with pytest.raises(UnsafeFileError, match='refusing prior class'):
        prior_files.prior_from_bytes(data, 'evil.safetensors')

def test_prior_path():
    assert prior_files.prior_path('run/network-snapshot-000480.safetensors') == 'run/network-snapshot-000480.prior.safetensors'
    assert prior_files.prior_path('run/network-snapshot-000480.pkl') == 'run/network-snapshot-000480.prior.safetensors'
    # A run folder's prior files are never taken for its newest snapshot.
    import os
    import tempfile
    from training.snapshot import resolve_network
    with tempfile.TemporaryDirectory() as d:
        for name in ('network-snapshot-000004.safetensors', 'network-snapshot-000008.prior.safetensors'):
            open(os.path.join(d, name), 'wb').close()
        assert resolve_network(d).endswith('network-snapshot-000004.safetensors')

def test_uniform_prior_gives_uniform_codes():
    # Equal counts everywhere: exactly floor(u * K), the codes of sampling without a prior.
    p = FrequencyPrior(KS)
    u = torch.rand(200, len(KS), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    expected = torch.stack([uniform_to_codes(u[:, l], k) for l, k in enumerate(KS)], dim=1)
    assert torch.equal(prior_rule.sample(p, u), expected)
    assert torch.equal(prior_rule.sample(_random_prior().requires_grad_(False).apply(_zero_head), u), expected)

def _zero_head(m):
    if isinstance(m, TransformerPrior):
        with torch.no_grad():
            m.head.zero_()
            m.head_bias.zero_()

def test_sample_is_per_row():
    # Row i's codes depend only on row i's uniforms: the same whatever the batch.
    p = _random_prior()
    u = torch.rand(10, len(KS), generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    whole = prior_rule.sample(p, u, temperature=0.8, top_p=0.95)
    parts = torch.cat([prior_rule.sample(p, u[i:i + 3], temperature=0.8, top_p=0.95) for i in range(0, 10, 3)])
    assert torch.equal(whole, parts)
    single = torch.cat([prior_rule.sample(p, u[i:i + 1], temperature=0.8, top_p=0.95) for i in range(10)])
    assert torch.equal(whole, single)

def test_temperature_zero_is_argmax():
    p = _random_prior()
    u = torch.rand(20, len(KS), generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    codes = prior_rule.sample(p, u, temperature=0)
    lp = p.log_probs(codes)
    for l, k in enumerate(KS):
        assert torch.equal(codes[:, l], lp[:, l, :k].argmax(1))
    # ... and a small temperature draws it too (not the same code path).
    assert torch.equal(prior_rule.sample(p, u, temperature=1e-4), codes)

def test_top_k_and_top_p_restrict_the_codes():
    p = _random_prior()
    u = torch.rand(300, len(KS), generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    for top_k, top_p in ((2, 1.0), (0, 0.5)):
        codes = prior_rule.sample(p, u, top_k=top_k, top_p=top_p)
        lp = p.log_probs(codes)
        for l, k in enumerate(KS):
            row = lp[:, l, :k]
            rank = (row > row.gather(1, codes[:, l:l + 1])).sum(1)    # How many codes are more probable.
            if top_k:
                assert (rank < top_k).all()
                assert len(codes[:, l].unique()) >= min(2, k)         # Not only the argmax.
            else:
                before = torch.where(row > row.gather(1, codes[:, l:l + 1]), row.exp(), 0).sum(1)
                assert (before < top_p + 1e-6).all()

def test_sampled_codes_follow_the_prior():
    # Frequencies of sampled codes match a frequency prior's probabilities (temperature 1).
    codes = _random_codes(400, seed=9)
    codes[:, 1] = torch.where(codes[:, 1] < 4, 0, codes[:, 1])   # Skewed layer 1.
    p = prior_lib.fit_frequency_prior(codes, KS)
    u = torch.rand(20000, len(KS), generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    s = prior_rule.sample(p, u)
    freq = torch.bincount(s[:, 1], minlength=8).double() / s.shape[0]
    torch.testing.assert_close(freq, p.log_probs(s[:1])[0, 1].exp().double(), atol=0.015, rtol=0)

def test_transformer_beats_frequencies_on_a_markov_source():
    codes = _markov_codes(1200)
    train, held = codes[:1000], codes[1000:]
    freq = prior_lib.fit_frequency_prior(train, [8] * 6)
    torch.manual_seed(0)
    p = TransformerPrior([8] * 6, dim=32, depth=1, heads=2, dropout=0.0)
    history = prior_lib.train_prior(p, train, steps=150, batch=128, lr=3e-3, held_out=held, eval_every=50)
    bits_freq, bits_prior = prior_lib.bits_per_image(freq, held), prior_lib.bits_per_image(p, held)
    # The source's entropy: 3 bits for layer 0, then 1 bit per layer: 8 bits; independent layers: ~18.
    assert bits_freq > 17
    assert bits_prior < 9.5, history
    assert history[-1]['held_out_bits'] >= min(h['held_out_bits'] for h in history)

def test_train_prior_keeps_the_best_held_out_state():
    codes = _markov_codes(200)
    torch.manual_seed(0)
    p = TransformerPrior([8] * 6, dim=32, depth=1, heads=2, dropout=0.0)
    history = prior_lib.train_prior(p, codes[:40], steps=200, batch=40, lr=1e-2, held_out=codes[100:], eval_every=20)
    best = min(h['held_out_bits'] for h in history)
    assert history[-1]['held_out_bits'] > best              # It overfits 40 rows...
    assert prior_lib.bits_per_image(p, codes[100:]) == pytest.approx(best, abs=1e-9)   # ...and the best state is kept.

def test_bad_codes_are_refused():
    p = FrequencyPrior(KS)
    with pytest.raises(ValueError, match='layer 3 is outside'):
        prior_lib.bits_per_image(p, torch.tensor([[0, 0, 0, 3, 0]]))
    with pytest.raises(ValueError, match='shape'):
        prior_lib.fit_frequency_prior(torch.zeros(3, 4, dtype=torch.long), KS)
    with pytest.raises(ValueError, match='temperature'):
        prior_rule.sample(p, torch.zeros(1, 5, dtype=torch.float64), temperature=-1)

def test_bits_per_image_of_a_uniform_prior():
    p = FrequencyPrior(KS)
    assert prior_lib.bits_per_image(p, _random_codes(10)) == pytest.approx(sum(math.log2(k) for k in KS))

def test_transformer_starts_as_the_frequency_prior():
    codes = _random_codes(300, seed=11)
    codes[:, 2] = torch.where(codes[:, 2] < 5, 1, codes[:, 2])
    freq = prior_lib.fit_frequency_prior(codes, KS)
    p = TransformerPrior(KS, dim=16, depth=1, heads=2).init_from_frequencies(codes).eval()
    torch.testing.assert_close(p.log_probs(codes[:7]), freq.log_probs(codes[:7]))
    # fit_prior starts there, and with early stopping never ends worse on its held-out codes.
    p, history = prior_training.fit_prior('transformer', KS, codes[:200], codes[200:], steps=30, eval_every=10, lr=3e-2,
                                     dim=16, depth=1, heads=2)
    assert history[0]['step'] == 0
    assert history[0]['held_out_bits'] == pytest.approx(prior_lib.bits_per_image(prior_lib.fit_frequency_prior(codes[:200], KS), codes[200:]))
    assert prior_lib.bits_per_image(p, codes[200:]) <= history[0]['held_out_bits'] + 1e-9

def test_split_validation():
    codes = _random_codes(25)
    fit, val = prior_training.split_validation(codes)
    assert torch.equal(torch.cat([fit, val]), codes) and val.shape[0] == 2        # round(2.5) = 2.
    fit, val = prior_training.split_validation(codes[:1])
    assert val is None and fit.shape[0] == 1
    assert prior_training.split_indices(10, 0.1) == (list(range(9)), [9])
    assert prior_training.split_indices(10, 0) == (list(range(10)), [])
