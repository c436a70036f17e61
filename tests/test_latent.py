"""Tests of latent bit packing (training/latent.py) and the compress.py CLI: exact round trips for
mixed K per layer (K = 2, powers of two, and not), and decode(unpacked codes) == encode's reconstruction."""

import math
import pickle

import numpy as np
import PIL.Image
import pytest
import torch
from click.testing import CliRunner

import compress
from training.dataset import open_dataset
from training.images import to_float, to_uint8
from training.latent import latent_bits, pack_codes, packed_size, stored_bits, unpack_codes
from training.networks import DDNGenerator

def random_codes(ks, B, seed=0):
    rng = np.random.default_rng(seed)
    return np.stack([rng.integers(0, k, B) for k in ks], axis=1).reshape(B, len(ks)).astype(np.int64)

@pytest.mark.parametrize('ks', [[2] * 13, [3, 5, 7], [2, 3, 4, 1000, 1, 17, 256], [64] * 63, [1], [1024] * 5 + [2, 3]])
@pytest.mark.parametrize('B', [0, 1, 7, 50])
def test_pack_unpack_round_trip(ks, B):
    codes = random_codes(ks, B, seed=B)
    codes[:1] = np.asarray(ks) - 1                              # Largest codes in the first row.
    packed = pack_codes(codes, ks)
    assert packed.dtype == np.uint8 and packed.shape == (packed_size(ks, B),)
    assert packed.size == math.ceil(B * stored_bits(ks) / 8)
    np.testing.assert_array_equal(unpack_codes(packed, ks, B), codes)
    np.testing.assert_array_equal(unpack_codes(packed.tobytes(), ks, B), codes)

def test_stored_bits():
    assert stored_bits([2] * 10) == 10 and latent_bits([2] * 10) == 10
    assert stored_bits([64] * 63) == 378                        # The reference CIFAR model.
    assert stored_bits([512] * 128) == 1152                     # The paper's faces.
    assert stored_bits([3, 5, 7]) == 7                          # ceil(log2 105), not 2 + 3 + 3 = 8.
    assert latent_bits([3, 5, 7]) == pytest.approx(math.log2(105))
    assert stored_bits([1, 1]) == 0

def test_taiji_latent_is_a_plain_binary_string():
    codes = random_codes([2] * 11, 5)
    bits = np.unpackbits(pack_codes(codes, [2] * 11))
    np.testing.assert_array_equal(bits[:codes.size], codes.reshape(-1))
    assert not bits[codes.size:].any()                          # Zero padding to the byte.

def test_powers_of_two_are_fixed_width_fields():
    codes = np.array([[5, 1, 200]])                             # 3 + 1 + 8 bits.
    bits = np.unpackbits(pack_codes(codes, [8, 2, 256]))[:12]
    assert ''.join(map(str, bits)) == '101' + '1' + format(200, '08b')

def test_invalid_input_is_rejected():
    with pytest.raises(ValueError, match='outside'):
        pack_codes(np.array([[0, 3]]), [4, 3])
    with pytest.raises(ValueError, match='outside'):
        pack_codes(np.array([[-1, 0]]), [4, 3])
    with pytest.raises(ValueError, match='shape'):
        pack_codes(np.zeros((2, 3), np.int64), [4, 3])
    with pytest.raises(ValueError, match='bytes'):
        unpack_codes(pack_codes(np.zeros((3, 2), np.int64), [4, 3]), [4, 3], 5)   # 2 bytes, not 3.
    with pytest.raises(ValueError, match='beyond'):
        unpack_codes(np.full(1, 255, np.uint8), [3, 5, 7], 1)   # 127 >= 3 * 5 * 7.

# ----------------------------------------------------------------------------

@pytest.fixture(scope='module')
def tiny_net():
    torch.manual_seed(0)
    return DDNGenerator(img_resolution=8, img_channels=1, max_outputk=8, max_blockn=1, max_channels=32).eval()

@pytest.fixture(scope='module')
def digits_u8():
    dataset = open_dataset('digits', resolution=8)
    return torch.from_numpy(np.stack([dataset[i][0] for i in range(24)]))

def test_decode_of_unpacked_codes_equals_encode_reconstruction(tiny_net, digits_u8):
    codes, recon = tiny_net.encode(to_float(digits_u8))
    unpacked = unpack_codes(pack_codes(codes.numpy(), tiny_net.ks), tiny_net.ks, len(digits_u8))
    decoded = tiny_net.decode(torch.from_numpy(unpacked))
    assert torch.equal(decoded, recon)

def test_compress_cli_round_trip(tmp_path, tiny_net, digits_u8):
    pkl, codes_file, outdir = tmp_path / 'net.pkl', tmp_path / 'codes.bin', tmp_path / 'decoded'
    with open(pkl, 'wb') as f:
        pickle.dump(dict(ema=tiny_net), f)
    runner = CliRunner()
    result = runner.invoke(compress.main, ['encode', '--network', str(pkl), '--data', 'digits', '--max-images', '24',
                                           '--batch', '10', '--out', str(codes_file), '--device', 'cpu'])
    assert result.exit_code == 0, result.output
    assert f'bits_per_image={stored_bits(tiny_net.ks)}' in result.stdout and 'psnr=' in result.stdout
    codes, ks = compress.read_codes_file(codes_file)
    assert ks == tiny_net.ks and codes.shape == (24, tiny_net.num_layers)
    result = runner.invoke(compress.main, ['decode', '--network', str(pkl), '--codes', str(codes_file),
                                           '--outdir', str(outdir), '--data', 'digits', '--device', 'cpu'])
    assert result.exit_code == 0, result.output
    expected = to_uint8(tiny_net.encode(to_float(digits_u8))[1]).numpy()
    for i in range(24):
        np.testing.assert_array_equal(np.asarray(PIL.Image.open(outdir / f'{i:06d}.png')), expected[i, 0])

def test_decode_rejects_codes_of_another_network(tmp_path, tiny_net):
    codes_file, pkl = tmp_path / 'codes.bin', tmp_path / 'net.pkl'
    compress.write_codes_file(codes_file, np.zeros((2, 3), np.int64), [4, 4, 4])
    with open(pkl, 'wb') as f:
        pickle.dump(dict(ema=tiny_net), f)
    result = CliRunner().invoke(compress.main, ['decode', '--network', str(pkl), '--codes', str(codes_file),
                                                '--outdir', str(tmp_path / 'out'), '--device', 'cpu'])
    assert result.exit_code != 0 and 'K per layer' in result.output
