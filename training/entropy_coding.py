"""Entropy coding of DDN latents with a prior over the codes: shorter codes than L * log2 K, decoded exactly.

A prior (training/prior.py's `CodePrior`: `log_probs(codes)` -> (B, L, Kmax) log p(k_l | k_<l),
row l depending only on `codes[:, :l]`) gives each layer's code a probability; an arithmetic coder
spends about -log2 p bits on it, so a skewed prior (a layer that uses few of its K nodes) shortens
the latents. Our own coder, exact with Python integers, no dependency:

- Probabilities -> integer frequencies (`frequencies`): a fixed total of 2^24, every code of the
  layer at least 1 (so any code stays decodable, however unlikely the prior finds it), the
  rounding remainder given to the most probable code; the same float32 rows give the same tables.
- The coder (`ArithmeticEncoder`, `ArithmeticDecoder`): Witten-Neal-Cleary arithmetic coding with
  a 62-bit interval and pending (carry) bits; its cost is within about 2 bits of the sum of
  -log2(freq / total) over the whole stream.
- The order of the symbols: images in chunks of `chunk` images; in a chunk, layer by layer, every
  image's code of that layer. The decoder recomputes the prior's rows of layer l from the codes it
  has decoded so far (layers < l, zeros beyond), one batched call per layer and chunk; the encoder
  computes the rows in exactly the same way (same chunk, same tensor shapes, zeros beyond l, in
  `batch_invariant()`), so both see bit-identical tables. The tables depend on the prior's float
  arithmetic: decode with the same prior on the same kind of device and software; a CRC-32 of the
  codes (compress.py stores it) detects any divergence instead of returning other images.
"""

import hashlib
import math
import zlib

import numpy as np
import torch

from training.determinism import batch_invariant

TOTAL_BITS = 24                 # Frequencies of each table sum to 2^24.
TOTAL = 1 << TOTAL_BITS
PRECISION = 62                  # Bits of the coder's interval.
_FULL = 1 << PRECISION
_HALF = _FULL >> 1
_QUARTER = _FULL >> 2

# ----------------------------------------------------------------------------
# Probabilities -> frequency tables.

def frequencies(log_p, K):
    """Integer frequency tables (B, K) int64 from log-probabilities (B, >= K) of K codes: every entry
    >= 1, each row sums to TOTAL. Deterministic: the same float rows give the same tables."""
    if not 1 <= K < TOTAL:
        raise ValueError(f'K={K} does not fit a frequency total of {TOTAL}')
    p = np.exp(torch.as_tensor(log_p)[:, :K].detach().to('cpu', torch.float64).numpy())
    if not np.isfinite(p).all():
        raise ValueError('the prior gave non-finite probabilities')
    mass = p.sum(1, keepdims=True)
    p = np.where(mass > 0, p / np.where(mass > 0, mass, 1), 1.0 / K)    # A row of zeros: uniform.
    f = np.floor(p * (TOTAL - K)).astype(np.int64) + 1                  # Sum <= TOTAL - K + K.
    rows = np.arange(f.shape[0])
    f[rows, f.argmax(1)] += TOTAL - f.sum(1)
    return f

# Bits the coder spends on codes (B,) under tables (B, K): -sum log2(freq / TOTAL) (before the <= 2 bits of its end).
def table_bits(freqs, codes):
    freqs = np.asarray(freqs)
    return -np.log2(freqs[np.arange(len(codes)), np.asarray(codes)] / TOTAL)

# ----------------------------------------------------------------------------
# The arithmetic coder (Witten, Neal & Cleary 1987), exact in Python integers.

class ArithmeticEncoder:
    """Symbols (cum, freq) of tables summing to TOTAL -> a bit string (`finish()` returns bytes)."""
    def __init__(self):
        self.low, self.high, self.pending = 0, _FULL - 1, 0
        self.bits = []

    def _emit(self, bit):
        self.bits.append(bit)
        self.bits.extend([1 - bit] * self.pending)
        self.pending = 0

    def encode(self, cum, freq):
        span = self.high - self.low + 1
        self.high = self.low + span * (cum + freq) // TOTAL - 1
        self.low = self.low + span * cum // TOTAL
        while True:
            if self.high < _HALF:
                self._emit(0)
            elif self.low >= _HALF:
                self._emit(1)
                self.low -= _HALF
                self.high -= _HALF
            elif self.low >= _QUARTER and self.high < 3 * _QUARTER:
                self.pending += 1
                self.low -= _QUARTER
                self.high -= _QUARTER
            else:
                break
            self.low, self.high = 2 * self.low, 2 * self.high + 1

    def finish(self):
        """The bytes of the stream (zero-padded to whole bytes); the encoder is spent after this."""
        self.pending += 1
        self._emit(0 if self.low < _QUARTER else 1)
        return np.packbits(np.asarray(self.bits, dtype=np.uint8)).tobytes()

    @property
    def num_bits(self):
        return len(self.bits)

class ArithmeticDecoder:
    """Reads the symbols of an ArithmeticEncoder's bytes back, given the same tables in the same order."""
    def __init__(self, data):
        self.bits = np.unpackbits(np.frombuffer(bytes(data), dtype=np.uint8))
        self.pos = 0
        self.low, self.high, self.value = 0, _FULL - 1, 0
        for _ in range(PRECISION):
            self.value = 2 * self.value + self._next()

    def _next(self):
        bit = int(self.bits[self.pos]) if self.pos < len(self.bits) else 0     # Past the end: zeros.
        self.pos += 1
        return bit

    def decode(self, cum):
        """The symbol of table `cum` (K + 1 cumulative frequencies, cum[0] = 0, cum[K] = TOTAL)."""
        span = self.high - self.low + 1
        target = ((self.value - self.low + 1) * TOTAL - 1) // span
        s = int(np.searchsorted(cum, target, side='right')) - 1
        lo, hi = int(cum[s]), int(cum[s + 1])
        self.high = self.low + span * hi // TOTAL - 1
        self.low = self.low + span * lo // TOTAL
        while True:
            if self.high < _HALF:
                pass
            elif self.low >= _HALF:
                self.low -= _HALF
                self.high -= _HALF
                self.value -= _HALF
            elif self.low >= _QUARTER and self.high < 3 * _QUARTER:
                self.low -= _QUARTER
                self.high -= _QUARTER
                self.value -= _QUARTER
            else:
                break
            self.low, self.high = 2 * self.low, 2 * self.high + 1
            self.value = 2 * self.value + self._next()
        return s

# ----------------------------------------------------------------------------
# Streams of symbols with their tables (the coder alone, for any source of tables).

def encode_symbols(symbols, tables):
    """Bytes of `symbols` (n,) coded with `tables` (n, K) (each row >= 1, summing to TOTAL)."""
    enc = ArithmeticEncoder()
    cums = np.concatenate([np.zeros((len(tables), 1), np.int64), np.cumsum(tables, 1)], 1)
    for s, cum in zip(np.asarray(symbols).tolist(), cums):
        enc.encode(int(cum[s]), int(cum[s + 1] - cum[s]))
    return enc.finish()

def decode_symbols(data, tables):
    """The symbols of `encode_symbols` given the same tables."""
    dec = ArithmeticDecoder(data)
    cums = np.concatenate([np.zeros((len(tables), 1), np.int64), np.cumsum(tables, 1)], 1)
    return np.asarray([dec.decode(cum) for cum in cums], dtype=np.int64)

# ----------------------------------------------------------------------------
# Codes of images with a prior.

# log p(k_l | k_<l) (B, Kmax) of layer l for a chunk whose codes are known below l (zeros from l on).
@torch.no_grad()
def _layer_rows(prior, known, l):
    prefix = known.clone()
    prefix[:, l:] = 0
    with batch_invariant():
        return prior.log_probs(prefix)[:, l].float().cpu()

def _device(prior):
    return next(iter(list(prior.buffers()) + list(prior.parameters())), torch.zeros(())).device

def _check(prior, ks):
    if list(prior.ks) != [int(k) for k in ks]:
        raise ValueError(f'the prior is for K per layer {list(prior.ks)[:4]}..., the codes for {list(ks)[:4]}...')

def encode_codes(prior, codes, ks, chunk=256):
    """Bytes of codes (N, L) entropy-coded with `prior`, in chunks of `chunk` images (see module doc);
    returns (data, bits) with `bits` (N,) the table cost of each image (-sum log2 p, quantised)."""
    _check(prior, ks)
    codes = torch.as_tensor(np.asarray(codes), dtype=torch.long)
    device, (N, L) = _device(prior), codes.shape
    enc, bits = ArithmeticEncoder(), np.zeros(N)
    was_training = prior.training
    prior.eval()
    try:
        for start in range(0, N, chunk):
            part = codes[start:start + chunk].to(device)
            for l in range(L):
                freqs = frequencies(_layer_rows(prior, part, l), ks[l])
                cums = np.concatenate([np.zeros((len(freqs), 1), np.int64), np.cumsum(freqs, 1)], 1)
                symbols = part[:, l].cpu().numpy()
                bits[start:start + len(symbols)] += table_bits(freqs, symbols)
                for s, cum in zip(symbols.tolist(), cums):
                    enc.encode(int(cum[s]), int(cum[s + 1] - cum[s]))
    finally:
        prior.train(was_training)
    return enc.finish(), bits

def decode_codes(prior, data, ks, num, chunk=256):
    """Codes (num, L) int64 of `encode_codes` bytes, with the same prior and chunk."""
    _check(prior, ks)
    device, L = _device(prior), len(ks)
    dec = ArithmeticDecoder(data)
    out = torch.zeros(num, L, dtype=torch.long)
    was_training = prior.training
    prior.eval()
    try:
        for start in range(0, num, chunk):
            part = torch.zeros(min(chunk, num - start), L, dtype=torch.long, device=device)
            for l in range(L):
                freqs = frequencies(_layer_rows(prior, part, l), ks[l])
                cums = np.concatenate([np.zeros((len(freqs), 1), np.int64), np.cumsum(freqs, 1)], 1)
                part[:, l] = torch.as_tensor([dec.decode(cum) for cum in cums], dtype=torch.long, device=device)
            out[start:start + len(part)] = part.cpu()
    finally:
        prior.train(was_training)
    return out.numpy()

# CRC-32 of codes (N, L) as stored (int64 little endian): what a decoder checks its result against.
def codes_checksum(codes):
    return zlib.crc32(np.ascontiguousarray(np.asarray(codes, dtype='<i8')).tobytes())

# The fewest bits any prior can spend on one image: each code costs at least -log2 of the largest
# frequency a table can give (every other code keeps 1); lets a reader bound the images a payload holds.
def min_bits_per_image(ks):
    return sum(-math.log2(1 - (k - 1) / TOTAL) for k in ks)

# Fixed-length bits of one image (the packed format): sum log2 K_l, for comparison.
def fixed_bits(ks):
    return sum(math.log2(k) for k in ks)

# 8 bytes naming a prior's weights (class, ks and every state tensor), so that a codes file is
# decoded only with the prior that wrote it.
def prior_fingerprint(prior):
    h = hashlib.sha256(f'{type(prior).__qualname__}:{list(prior.ks)}'.encode())
    for name, value in sorted(prior.state_dict().items()):
        h.update(name.encode())
        h.update(value.detach().to('cpu').contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.digest()[:8]
