"""DDN latents: packing the codes (k_1..k_L) of images into bit strings and back, and the latents.npz
files that generate.py writes and decodes.

A DDN image's latent is the list of indices chosen by its L layers, layer l choosing among K_l
candidates: log2(K_1) + ... + log2(K_L) bits of information (`DDN.md` §1; L * log2 K for one K).

Packing is **mixed-radix**: the codes of one image are read as the digits of one integer
    N = (((k_1) * K_2 + k_2) * K_3 + k_3) ... * K_L + k_L,    0 <= N < K_1 * ... * K_L,
written MSB first in exactly `stored_bits(ks)` = ceil(log2(K_1 * ... * K_L)) bits; the images'
fields follow each other with no gap, and the last byte is padded with zero bits. So the storage
cost is the information content rounded up once per image (not once per layer, as fixed
ceil(log2 K_l)-bit fields would be for K that are not powers of two). When every K_l is a power of
two, N's bits are just the layers' fixed-width fields in layer order: for K = 2 ("Taiji-DDN") the
bit string IS the code sequence, one bit per layer.

The arithmetic is vectorised over images: each image's N is a row of base-256 digits, and each layer
costs one multiply-add (packing) or one long division (unpacking) over the digit columns.

latents.npz (generate.py's `--outdir`, read by `--codes`): `seeds` or `indices` (N,), `codes` (N, L) and
`ks` (L,) int64, the fingerprint of the network that made them (`network`), and for conditional
networks `classes` (N,) or `conditions` (N or 1, C, h, w), so decoding the file reproduces the images.
"""

import math
import os
from typing import NamedTuple, Optional, Sequence

import numpy as np

from torch_utils import limits
from torch_utils.checkpoint import write_atomic

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
def stored_bits(ks: Sequence[int]) -> int:
    return (math.prod(_check_ks(ks)) - 1).bit_length()

# Bytes of the packed codes of `num_images` images.
def packed_size(ks: Sequence[int], num_images: int) -> int:
    return (stored_bits(ks) * num_images + 7) // 8

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
    B, nbits = codes.shape[0], stored_bits(ks)
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
    nbits = stored_bits(ks)
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
# latents.npz files.

def save_latents(path, name_key, names, codes, ks, classes=None, conditions=None, network=None):
    """`names` (N,) under `name_key` ('seeds' or 'indices'), `codes` (N, L) and `ks` (L,), all int64;
    for conditional networks also `classes` (N,) int64 or `conditions` (N or 1, C, h, w) float32;
    `network`: the fingerprint of the network that made them (snapshot.fingerprint), a string."""
    arrays = {name_key: np.asarray(names, np.int64).reshape(-1),
              'codes': np.asarray(codes, np.int64).reshape(len(names), len(ks)),
              'ks': np.asarray(ks, np.int64)}
    if network is not None:
        arrays['network'] = np.asarray(network)
    if classes is not None:
        arrays['classes'] = np.asarray(classes, np.int64).reshape(-1)
    if conditions is not None:
        arrays['conditions'] = np.asarray(conditions, np.float32)
    write_atomic(path, lambda f: np.savez(f, **arrays))

# Refuse a codes file that is not a regular file, or whose arrays inflate far beyond its size (np.savez
# stores them uncompressed, so only a crafted file does).
def _check_npz(path):
    limits.require_regular_file(path, f'Codes file {path}')
    limits.check_zip_inflation(path, what=f'Codes file {path}')

# The arrays of an .npz file, with errors that name the file and what it should be.
def _read_npz(path):
    if not os.path.exists(path):
        raise FileNotFoundError(f'Codes file not found: {path}')
    _check_npz(path)
    try:
        with np.load(path, allow_pickle=False) as npz:
            return {key: npz[key] for key in npz.files}
    except Exception as e:
        raise ValueError(f'Cannot read codes file {path} (expected a latents.npz written by generate.py): {e}') from e

# Raise ValueError unless `codes` (N, L) fit a network with K per layer `ks` (and the file's own `ks`).
def _check_latent_codes(path, codes, ks, file_ks):
    L = len(ks)
    if codes.ndim != 2 or not np.issubdtype(codes.dtype, np.integer):
        raise ValueError(f'Codes in {path} must be an (N, L) integer array, got {codes.dtype} of shape {codes.shape}')
    if codes.shape[1] != L:
        raise ValueError(f'Codes in {path} have L={codes.shape[1]} layers, but the network has L={L}')
    if file_ks is not None and list(np.asarray(file_ks).reshape(-1)) != list(ks):
        file_ks = np.asarray(file_ks).reshape(-1).tolist()
        bad = next((l for l in range(min(len(file_ks), L)) if file_ks[l] != ks[l]), min(len(file_ks), L))
        raise ValueError(f'Codes in {path} were made for K={file_ks[bad] if bad < len(file_ks) else "?"} at layer {bad}, '
                         f'but the network has K={ks[bad]} there: a different network')
    out_of_range = (codes < 0) | (codes >= np.asarray(ks)[None, :])
    if out_of_range.any():
        row, l = np.argwhere(out_of_range)[0]
        raise ValueError(f'Codes in {path}: row {row} has code {codes[row, l]} at layer {l}, outside [0, K={ks[l]})')

def load_latents(path, ks):
    """(name_key, names, codes) from a latents file, checked against a network with K per layer `ks`."""
    data = _read_npz(path)
    if 'codes' not in data:
        raise ValueError(f'Codes file {path} has no "codes" array (keys: {sorted(data)})')
    codes = data['codes']
    _check_latent_codes(path, codes, ks, data.get('ks'))
    name_key = next((key for key in ('seeds', 'indices') if key in data), 'indices')
    names = np.asarray(data.get(name_key, np.arange(codes.shape[0]))).reshape(-1)
    if names.shape[0] != codes.shape[0]:
        raise ValueError(f'{path}: {names.shape[0]} {name_key} for {codes.shape[0]} rows of codes')
    return name_key, names.astype(np.int64), codes.astype(np.int64)

def latents_network(path):
    """The fingerprint of the network that made a latents file, or None (older files)."""
    _check_npz(path)
    with np.load(path, allow_pickle=False) as npz:
        return str(npz['network']) if 'network' in npz.files else None

def load_latent_conditions(path, net, num):
    """The conditions stored with `num` rows of latents for a conditional `net`: (classes (num,) or
    None, conditions (num or 1, C, h, w) or None). Raises ValueError if they do not fit the network."""
    with np.load(path, allow_pickle=False) as npz:
        classes = npz['classes'] if 'classes' in npz.files else None
        conditions = npz['conditions'] if 'conditions' in npz.files else None
    if classes is not None:
        label_dim = int(getattr(net, 'label_dim', 0) or 0)
        classes = np.asarray(classes).reshape(-1)
        if classes.shape[0] != num or not np.issubdtype(classes.dtype, np.integer):
            raise ValueError(f'{path}: "classes" must hold {num} integers, got {classes.dtype} of shape {classes.shape}')
        if label_dim and (classes.min() < 0 or classes.max() >= label_dim):
            raise ValueError(f'{path}: classes outside [0, {label_dim}) of the network')
    if conditions is not None:
        cond_channels = getattr(net, 'cond_channels', None)
        if conditions.ndim != 4 or conditions.shape[0] not in (1, num) or conditions.shape[1] != cond_channels:
            raise ValueError(f'{path}: "conditions" of shape {conditions.shape} do not fit {num} rows of a network '
                             f'conditioned on {net.condition!r} ({cond_channels} channel(s))')
    return classes, conditions

# What decoding a latents file needs, checked against a network (read_latents).
class Latents(NamedTuple):
    name_key:   str                     # 'seeds' or 'indices'.
    names:      list                    # Seed or index of each row (int, unique): the image file names.
    codes:      np.ndarray              # (N, L) int64.
    classes:    Optional[np.ndarray]    # (N,) classes of a class-conditional net, or None.
    conditions: Optional[np.ndarray]    # (N or 1, C, h, w) conditions of an image-conditional net, or None.

def read_latents(path, net, max_images=None):
    """The rows of a latents file for `net` (the first `max_images`), with their conditions if `net` is
    conditional; raises ValueError if they do not fit the network or their names repeat."""
    name_key, names, codes = load_latents(path, net.ks)
    classes, conditions = load_latent_conditions(path, net, len(names)) if getattr(net, 'condition', None) else (None, None)
    if max_images is not None:
        names, codes = names[:max_images], codes[:max_images]
        classes = None if classes is None else classes[:max_images]
        conditions = conditions if conditions is None or len(conditions) == 1 else conditions[:max_images]
    names = [int(n) for n in names]
    if len(set(names)) != len(names):
        raise ValueError(f'{path}: the {name_key} are not unique, so image files would overwrite each other')
    return Latents(name_key, names, codes, classes, conditions)

# ----------------------------------------------------------------------------
