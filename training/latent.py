"""DDN latents as bit strings: packing the codes (k_1..k_L) of images into bytes and back.

A DDN image's latent is the list of indices chosen by its L layers, layer l choosing among K_l
candidates: log2(K_1) + ... + log2(K_L) bits of information (`DDN.md` §1; L * log2 K for one K).

Packing is **mixed-radix**: the codes of one image are read as the digits of one integer
    N = (((k_1) * K_2 + k_2) * K_3 + k_3) ... * K_L + k_L,    0 <= N < K_1 * ... * K_L,
written MSB first in exactly `bits_per_image(ks)` = ceil(log2(K_1 * ... * K_L)) bits; the images'
fields follow each other with no gap, and the last byte is padded with zero bits. So the storage
cost is the information content rounded up once per image (not once per layer, as fixed
ceil(log2 K_l)-bit fields would be for K that are not powers of two). When every K_l is a power of
two, N's bits are just the layers' fixed-width fields in layer order: for K = 2 ("Taiji-DDN") the
bit string IS the code sequence, one bit per layer.

The arithmetic is vectorised over images: each image's N is a row of base-256 digits, and each layer
costs one multiply-add (packing) or one long division (unpacking) over the digit columns.
"""

import math
from typing import Sequence

import numpy as np

# ----------------------------------------------------------------------------

def _check_ks(ks):
    ks = [int(k) for k in ks]
    if not ks or min(ks) < 1:
        raise ValueError(f'ks must be a non-empty list of positive K, got {ks}')
    return ks

# Information content of one latent: sum of log2 K_l.
def latent_bits(ks: Sequence[int]) -> float:
    return float(sum(math.log2(k) for k in _check_ks(ks)))

# Bits one image occupies in a packed string: ceil(log2(prod K_l)) (0 when every K_l is 1).
def bits_per_image(ks: Sequence[int]) -> int:
    return (math.prod(_check_ks(ks)) - 1).bit_length()

# Bytes of the packed codes of `num_images` images.
def packed_size(ks: Sequence[int], num_images: int) -> int:
    return (bits_per_image(ks) * num_images + 7) // 8

# ----------------------------------------------------------------------------

def pack_codes(codes, ks: Sequence[int]) -> np.ndarray:
    """Codes (B, L) with 0 <= codes[:, l] < ks[l] -> (packed_size(ks, B),) uint8 (see module doc)."""
    ks = _check_ks(ks)
    codes = np.asarray(codes)
    if codes.ndim != 2 or codes.shape[1] != len(ks):
        raise ValueError(f'codes must have shape (B, {len(ks)}), got {codes.shape}')
    if codes.size and not np.issubdtype(codes.dtype, np.integer):
        raise ValueError(f'codes must be integers, got {codes.dtype}')
    codes = codes.astype(np.int64)
    k = np.asarray(ks, dtype=np.int64)
    bad = (codes < 0) | (codes >= k[None, :])
    if bad.any():
        row, l = np.argwhere(bad)[0]
        raise ValueError(f'code {codes[row, l]} of image {row} at layer {l} is outside [0, K={ks[l]})')
    B, nbits = codes.shape[0], bits_per_image(ks)
    digits = np.zeros((B, (nbits + 7) // 8), dtype=np.int64)      # N in base 256, most significant first.
    for l, K in enumerate(ks):
        carry = codes[:, l].copy()                                  # N <- N * K + k_l
        for j in range(digits.shape[1] - 1, -1, -1):
            t = digits[:, j] * K + carry
            digits[:, j] = t & 255
            carry = t >> 8
    bits = np.unpackbits(digits.astype(np.uint8), axis=1)
    bits = bits[:, bits.shape[1] - nbits:]                          # Drop the leading zero bits.
    return np.packbits(bits.reshape(-1))

def unpack_codes(data, ks: Sequence[int], num_images: int) -> np.ndarray:
    """Inverse of pack_codes: packed bytes -> codes (num_images, L) int64."""
    ks = _check_ks(ks)
    data = np.frombuffer(bytes(data), dtype=np.uint8) if isinstance(data, (bytes, bytearray, memoryview)) else np.asarray(data, dtype=np.uint8)
    nbits = bits_per_image(ks)
    if data.size != packed_size(ks, num_images):
        raise ValueError(f'{data.size} bytes cannot hold {num_images} latents of {nbits} bits '
                         f'(expected {packed_size(ks, num_images)} bytes)')
    bits = np.unpackbits(data)[:num_images * nbits].reshape(num_images, nbits)
    nbytes = (nbits + 7) // 8
    bits = np.concatenate([np.zeros((num_images, 8 * nbytes - nbits), np.uint8), bits], axis=1)
    digits = np.packbits(bits, axis=1).astype(np.int64)             # (B, nbytes) N in base 256.
    codes = np.zeros((num_images, len(ks)), dtype=np.int64)
    for l in range(len(ks) - 1, -1, -1):                            # k_l = N mod K_l; N <- N // K_l
        K = ks[l]
        rem = np.zeros(num_images, dtype=np.int64)
        for j in range(digits.shape[1]):
            t = rem * 256 + digits[:, j]
            digits[:, j] = t // K
            rem = t % K
        codes[:, l] = rem
    if digits.any():
        raise ValueError('packed latents decode to values beyond prod(K): wrong network or corrupted data')
    return codes

# ----------------------------------------------------------------------------
