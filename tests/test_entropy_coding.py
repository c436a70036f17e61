"""Entropy coding of latents (training/entropy_coding.py) and compress.py's prior-coded files: exact
round trips on random and adversarial symbol streams (near-zero probabilities, K = 1, 2, 1024), codes
of a learned prior decoded layer by layer, and compress.py encode -> decode giving the same PNGs as the
fixed-length format, with fewer bits when the prior is skewed."""

import pickle
import re

import numpy as np
import PIL.Image
import pytest
import torch
from click.testing import CliRunner

import compress
from training import entropy_coding as ec
from training import prior as prior_lib
from training import prior_files
from training.dataset import open_dataset
from training.images import to_float
from training.latent import stored_bits
from training.networks import DDNGenerator

def _tables(log_p, K):
    return ec.frequencies(torch.as_tensor(log_p, dtype=torch.float32), K)

# ----------------------------------------------------------------------------
# Frequency tables.

def test_frequencies_are_valid_and_follow_the_probabilities():
    rng = np.random.default_rng(0)
    for K in (1, 2, 7, 1024):
        log_p = torch.log_softmax(torch.tensor(rng.normal(size=(50, K)) * 4, dtype=torch.float32), 1)
        f = ec.frequencies(log_p, K)
        assert f.shape == (50, K) and f.dtype == np.int64 and (f >= 1).all() and (f.sum(1) == ec.TOTAL).all()
        assert np.array_equal(f, ec.frequencies(log_p.clone(), K))            # Deterministic.
        if K > 1:
            # Within the rounding (1 per entry) plus the remainder given to the most probable code.
            err = np.abs(f / ec.TOTAL - log_p.double().exp().numpy())
            assert err.max() < (K + 1) / ec.TOTAL
    # -inf (a code the prior rules out) still gets frequency 1: it stays decodable.
    f = ec.frequencies(torch.tensor([[0.0, -np.inf, -1e30]]), 3)
    assert f[0, 1] == 1 and f[0, 2] == 1 and f[0, 0] == ec.TOTAL - 2
    with pytest.raises(ValueError, match='non-finite'):
        ec.frequencies(torch.tensor([[np.nan, 0.0]]), 2)

# ----------------------------------------------------------------------------
# The coder on symbol streams.

def _round_trip(symbols, tables):
    data = ec.encode_symbols(symbols, tables)
    np.testing.assert_array_equal(ec.decode_symbols(data, tables), symbols)
    return len(data) * 8

@pytest.mark.parametrize('K', [1, 2, 3, 1024])
def test_round_trip_random_streams_cost_their_information(K):
    rng = np.random.default_rng(K)
    n = 3000
    log_p = torch.log_softmax(torch.tensor(rng.normal(size=(n, K)) * 2, dtype=torch.float32), 1)
    tables = _tables(log_p, K)
    p = tables / ec.TOTAL
    symbols = np.array([rng.choice(K, p=row) for row in p])
    bits = _round_trip(symbols, tables)
    ideal = ec.table_bits(tables, symbols).sum()
    assert ideal <= bits <= ideal + 2 + 8                                      # 2 bits of the end, 8 of byte padding.

def test_round_trip_adversarial_streams():
    rng = np.random.default_rng(1)
    # Every symbol is one the tables give (almost) no probability: about 24 bits each.
    K, n = 1024, 400
    log_p = torch.full((n, K), -np.inf)
    log_p[:, 0] = 0.0
    tables = _tables(log_p, K)
    symbols = rng.integers(1, K, n)
    assert _round_trip(symbols, tables) >= 23 * n
    # Near-certain symbols: long stretches with no output bit, then the improbable one.
    K, n = 2, 20000
    log_p = torch.tensor([[0.0, -40.0]]).expand(n, 2)
    symbols = np.zeros(n, np.int64)
    symbols[[0, 5000, n - 1]] = 1
    bits = _round_trip(symbols, _tables(log_p, K))
    assert bits < 3 * 24 + n * 1e-3 + 16
    # Probabilities near 1/2 and just below it (the pending-bit / straddle case), and alternating tables.
    for p0 in (0.5, 0.5 - 1e-7, 0.25 + 1e-7):
        log_p = torch.log(torch.tensor([[p0, 1 - p0]])).expand(5000, 2)
        _round_trip(rng.integers(0, 2, 5000), _tables(log_p, 2))
    # Mixed tables, and the empty stream.
    _round_trip(np.array([], np.int64), np.zeros((0, 4), np.int64) + ec.TOTAL // 4)
    tables = np.stack([np.array([ec.TOTAL - 3, 1, 1, 1]), np.array([1, 1, 1, ec.TOTAL - 3])] * 500)
    _round_trip(rng.integers(0, 4, 1000), tables)

# ----------------------------------------------------------------------------
# Codes of images with a prior: the decoder recomputes each layer's rows from what it has decoded.

def _skewed_codes(ks, n, seed=0):
    # Layer 0 uses few of its codes, later layers depend on the layer above (a Markov-like source).
    rng = np.random.default_rng(seed)
    codes = np.zeros((n, len(ks)), np.int64)
    codes[:, 0] = rng.choice(min(3, ks[0]), n)
    for l in range(1, len(ks)):
        codes[:, l] = (codes[:, l - 1] * 3 + rng.integers(0, 2, n)) % ks[l]
    return codes

@pytest.mark.parametrize('kind', ['frequency', 'transformer'])
def test_codes_round_trip_with_a_prior(kind):
    ks = [8, 8, 2, 16, 8]
    codes = _skewed_codes(ks, 70)
    if kind == 'frequency':
        prior = prior_lib.fit_frequency_prior(torch.from_numpy(codes), ks)
    else:
        torch.manual_seed(0)
        prior = prior_lib.TransformerPrior(ks, dim=16, depth=1, heads=2)
        prior_lib.train_prior(prior, torch.from_numpy(codes), steps=60, batch=32, lr=1e-2)
    for chunk in (16, 256):
        data, bits = ec.encode_codes(prior, codes, ks, chunk=chunk)
        np.testing.assert_array_equal(ec.decode_codes(prior, data, ks, len(codes), chunk=chunk), codes)
        assert len(data) * 8 <= bits.sum() + 10
    # Fewer bits than fixed length: the prior learned the skew.
    assert len(data) * 8 / len(codes) < 0.8 * stored_bits(ks)
    # The per-image cost is the prior's likelihood (quantised tables): within 0.01 bit of code_bits.
    np.testing.assert_allclose(bits, prior_lib.code_bits(prior, torch.from_numpy(codes)).numpy(), atol=0.01)

# A test double whose row l depends on code l-1: decoding with the wrong history gives other tables.
class _MarkovDouble(prior_lib.CodePrior):
    def logits(self, codes):
        prev = torch.cat([torch.zeros_like(codes[:, :1]), codes[:, :-1]], 1)
        target = (prev * 3 + 1) % torch.tensor(self.ks)[None]
        return torch.nn.functional.one_hot(target, self.kmax).float() * 6

def test_the_decoder_needs_the_exact_history():
    ks = [4] * 6
    prior = _MarkovDouble(ks)
    codes = np.random.default_rng(0).integers(0, 4, (30, 6))
    data, _ = ec.encode_codes(prior, codes, ks, chunk=8)
    np.testing.assert_array_equal(ec.decode_codes(prior, data, ks, 30, chunk=8), codes)
    # Another chunking is another symbol order: not the same codes (the file records its chunk).
    assert not np.array_equal(ec.decode_codes(prior, data, ks, 30, chunk=7), codes)

# ----------------------------------------------------------------------------
# compress.py: entropy-coded files decode to the same images as fixed-length ones.

@pytest.fixture(scope='module')
def net_files(tmp_path_factory):
    torch.manual_seed(0)
    net = DDNGenerator(img_resolution=8, img_channels=1, max_outputk=8, max_blockn=1, max_channels=32).eval()
    folder = tmp_path_factory.mktemp('compress')
    pkl = folder / 'net.pkl'
    with open(pkl, 'wb') as f:
        pickle.dump(dict(ema=net), f)
    dataset = open_dataset('digits', resolution=8)
    images = torch.from_numpy(np.stack([dataset[i][0] for i in range(200, 400)]))
    codes = net.encode(to_float(images))[0]
    prior = prior_lib.fit_frequency_prior(codes, net.ks)            # On other images than those encoded below.
    prior_files.save_prior(prior, prior_files.prior_path(pkl))
    return net, pkl, folder

def _cli(*args):
    result = CliRunner().invoke(compress.main, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result.stdout

def _pngs(folder):
    return {p.name: np.asarray(PIL.Image.open(p)) for p in sorted(folder.glob('*.png'))}

def test_compress_with_the_prior_decodes_the_same_images_in_fewer_bits(net_files, tmp_path):
    net, pkl, _ = net_files
    common = ['--network', pkl, '--device', 'cpu', '--batch', '10']
    coded = _cli('encode', *common, '--data', 'digits', '--max-images', '30', '--out', tmp_path / 'p.bin')
    fixed = _cli('encode', *common, '--data', 'digits', '--max-images', '30', '--out', tmp_path / 'f.bin', '--prior', 'off')
    fixed_bits = stored_bits(net.ks)
    bits = float(coded.split('bits_per_image=')[1].split()[0])
    print(f'bits/image: prior {bits:.2f}, fixed-length {fixed_bits}')
    assert f'bits_per_image={fixed_bits} (fixed-length' in fixed and f'fixed_bits_per_image={fixed_bits}' in coded
    assert 'entropy-coded with the prior' in coded and bits < fixed_bits
    payload = [int(re.search(r'(\d+) bytes of codes', out).group(1)) for out in (coded, fixed)]
    assert payload[0] < payload[1]
    # The PSNR line is about the same images in both.
    assert coded.split('psnr=')[1] == fixed.split('psnr=')[1]
    codes_p, ks = compress.read_codes_file(tmp_path / 'p.bin', prior=prior_files.load_prior(prior_files.prior_path(pkl)))
    np.testing.assert_array_equal(codes_p, compress.read_codes_file(tmp_path / 'f.bin')[0])
    _cli('decode', *common, '--codes', tmp_path / 'p.bin', '--outdir', tmp_path / 'dp')
    _cli('decode', *common, '--codes', tmp_path / 'f.bin', '--outdir', tmp_path / 'df')
    a, b = _pngs(tmp_path / 'dp'), _pngs(tmp_path / 'df')
    assert len(a) == 30 and a.keys() == b.keys()
    for name in a:
        np.testing.assert_array_equal(a[name], b[name])

def test_prior_coded_files_need_their_prior(net_files, tmp_path):
    net, pkl, folder = net_files
    common = ['--network', pkl, '--device', 'cpu']
    _cli('encode', *common, '--data', 'digits', '--max-images', '5', '--out', tmp_path / 'p.bin')
    result = CliRunner().invoke(compress.main, ['decode', *map(str, common), '--codes', str(tmp_path / 'p.bin'),
                                                '--outdir', str(tmp_path / 'o1'), '--prior', 'off'])
    assert result.exit_code != 0 and 'entropy-coded with a prior' in result.output and 'Traceback' not in result.output
    other = folder / 'other.prior.safetensors'
    prior_files.save_prior(prior_lib.fit_frequency_prior(torch.zeros(3, net.num_layers, dtype=torch.long), net.ks), other)
    result = CliRunner().invoke(compress.main, ['decode', *map(str, common), '--codes', str(tmp_path / 'p.bin'),
                                                '--outdir', str(tmp_path / 'o2'), '--prior', str(other)])
    assert result.exit_code != 0 and 'another prior' in result.output
    # A corrupted payload is caught by the checksum, not returned as other images.
    data = bytearray((tmp_path / 'p.bin').read_bytes())
    data[-3] ^= 0xFF
    (tmp_path / 'bad.bin').write_bytes(bytes(data))
    result = CliRunner().invoke(compress.main, ['decode', *map(str, common), '--codes', str(tmp_path / 'bad.bin'),
                                                '--outdir', str(tmp_path / 'o3')])
    assert result.exit_code != 0 and 'checksum' in result.output
    # A header claiming far more images than the payload can hold is refused before decoding.
    data = bytearray((tmp_path / 'p.bin').read_bytes())
    data[5:9] = (1 << 31).to_bytes(4, 'little')
    (tmp_path / 'huge.bin').write_bytes(bytes(data))
    result = CliRunner().invoke(compress.main, ['decode', *map(str, common), '--codes', str(tmp_path / 'huge.bin'),
                                                '--outdir', str(tmp_path / 'o4')])
    assert result.exit_code != 0 and 'cannot hold' in result.output
