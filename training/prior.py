"""A prior over DDN latents: p(k_1..k_L) = prod_l p(k_l | k_<l), learned from the codes of training images.

A DDN samples by picking every layer's candidate uniformly; its nodes are equally likely only on
average over training, not on the data and not given the choices above. A prior over the codes turns
the reconstructor into a better generator (as a learned prior does for VQ-VAE), shortens the codes
(entropy coding, compress.py) and gives a likelihood (bits per image).

- `CodePrior`: the interface. `log_probs(codes)` (teacher forcing): (B, L) codes -> (B, L, Kmax)
  log p(k_l | k_<l); row l depends only on `codes[:, :l]`, bit for bit (whatever `codes[:, l:]` holds);
  entries >= K_l are -inf. `begin` / `step` give the same rows one layer at a time (sampling, guidance).
- `FrequencyPrior`: each layer's node frequencies on the data (add-one smoothing), independent of the
  layers above: the baseline every learned prior must beat.
- `TransformerPrior`: a small causal transformer. Position l reads the code of layer l-1 (a BOS vector
  at l = 0), embedded per layer (layer l's vocabulary is its K_l codes), plus a learned embedding of l;
  a per-layer output head gives the K_l logits of layer l.
- `train_prior` (cross-entropy, AdamW, keeps the state with the best held-out bits), `bits_per_image`,
  `fit_frequency_prior`.
- `sample`: codes from per-seed uniforms (B, L) by inverse CDF, layer after layer, with temperature,
  top-k and top-p (`choose`), so the codes of seed s do not depend on the batch; a uniform prior gives
  exactly the codes of uniform sampling (`floor(u * K)`).
- Files: `save_prior` / `load_prior`, the safe format of networks (training/snapshot.py) for priors: a
  safetensors file whose metadata `ddn` is the JSON constructor call (`format` = 'ddn-prior',
  `class_name` one of `PRIOR_CLASSES`); loading calls one of our constructors with plain values and
  copies tensors, nothing from the file runs. The prior of a network file `X.safetensors` or `X.pkl`
  sits beside it as `X.prior.safetensors` (`prior_path`): `network-snapshot-000480.prior.safetensors`
  in a run folder (not matched by the snapshot patterns, which match whole names).
"""

import json
import math
import os
from typing import NamedTuple, Optional, Sequence

import torch
from torch import nn
from torch.nn import functional as F

import dnnlib
from torch_utils import checkpoint, persistence
from training.ddl import _nth_true, argmin
from training.snapshot import UnsafeFileError, safetensors_metadata

# Name and version of the prior file format, stored in its metadata.
PRIOR_FORMAT = 'ddn-prior'
PRIOR_VERSION = 1
PRIOR_SUFFIX = '.prior.safetensors'

# The classes a prior file may name.
PRIOR_CLASSES = ('training.prior.FrequencyPrior', 'training.prior.TransformerPrior')

# ----------------------------------------------------------------------------
# The interface.

def _check_ks(ks):
    ks = [int(k) for k in ks]
    if not ks or min(ks) < 1:
        raise ValueError(f'ks must be a non-empty list of K >= 1, got {ks}')
    return ks

# A distribution over the codes (k_1..k_L) of a network whose layer l has ks[l] candidates.
class CodePrior(nn.Module):
    def __init__(self, ks):
        super().__init__()
        self.ks = _check_ks(ks)
        kmax = max(self.ks)
        valid = torch.arange(kmax)[None, :] < torch.tensor(self.ks)[:, None]             # (L, Kmax)
        self.register_buffer('valid', valid, persistent=False)

    @property
    def num_layers(self):
        return len(self.ks)

    @property
    def kmax(self):
        return max(self.ks)

    # Raw logits (B, L, Kmax) of every layer given the codes above it (teacher forcing); subclasses.
    def logits(self, codes):
        raise NotImplementedError

    # log p(k_l | k_<l): (B, L) codes -> (B, L, Kmax) fp32, entries >= K_l are -inf.
    def log_probs(self, codes):
        codes = self._check_codes(codes)
        logits = self.logits(codes).float().masked_fill(~self.valid, -math.inf)
        return torch.log_softmax(logits, dim=-1)

    # Incremental evaluation (sampling): `state = begin(B)`, then for l = 0..L-1
    # `row = step(state, codes_of_layer_l_minus_1)` (None at l = 0) gives log p(k_l | k_<l) (B, Kmax).
    # This default recomputes `log_probs` on the codes so far; subclasses may cache.
    def begin(self, batch_size):
        return dnnlib.EasyDict(l=0, codes=torch.zeros(batch_size, self.num_layers, dtype=torch.long, device=self.valid.device))

    def step(self, state, prev):
        if state.l > 0:
            state.codes[:, state.l - 1] = prev
        row = self.log_probs(state.codes)[:, state.l]
        state.l += 1
        return row

    def _check_codes(self, codes):
        if codes.ndim != 2 or codes.shape[1] != self.num_layers:
            raise ValueError(f'codes must have shape (B, {self.num_layers}), got {tuple(codes.shape)}')
        return codes.to(device=self.valid.device, dtype=torch.long)

# ----------------------------------------------------------------------------
# The baseline: independent per-layer node frequencies.

@persistence.persistent_class
class FrequencyPrior(CodePrior):
    def __init__(self,
        ks,                         # K of each layer.
    ):
        super().__init__(ks)
        self.register_buffer('counts', torch.ones(len(self.ks), self.kmax) * self.valid)   # Smoothed counts.

    def logits(self, codes):
        log_p = (self.counts.clamp(min=1e-30)).log()
        return log_p[None].expand(codes.shape[0], -1, -1)

    def step(self, state, prev):
        row = self.log_probs(torch.zeros(state.codes.shape[0], self.num_layers, dtype=torch.long,
                                         device=self.valid.device))[:, state.l]
        state.l += 1
        return row

    def extra_repr(self):
        return f'L={self.num_layers}, ks={sorted(set(self.ks))}'

# A FrequencyPrior of codes (N, L): counts + `smoothing` (add-one by default) per layer.
def fit_frequency_prior(codes, ks, smoothing=1.0):
    prior = FrequencyPrior(ks)
    codes = check_codes(codes, prior.ks)
    counts = torch.zeros(prior.num_layers, prior.kmax, dtype=torch.float64)
    for l in range(prior.num_layers):
        counts[l] = torch.bincount(codes[:, l].cpu(), minlength=prior.kmax)[:prior.kmax].double()
    with torch.no_grad():
        prior.counts.copy_(((counts + smoothing) * prior.valid).float())
    return prior

# Codes (N, L) as an int64 tensor, checked against ks (a clear ValueError for the first bad code).
def check_codes(codes, ks, what='codes'):
    codes = torch.as_tensor(codes)
    ks = _check_ks(ks)
    if codes.ndim != 2 or codes.shape[1] != len(ks):
        raise ValueError(f'{what} must have shape (N, {len(ks)}), got {tuple(codes.shape)}')
    if codes.numel() and (codes.is_floating_point() or codes.is_complex()):
        raise ValueError(f'{what} must be integers, got {codes.dtype}')
    codes = codes.long()
    bad = (codes < 0) | (codes >= torch.tensor(ks, device=codes.device)[None])
    if bad.any():
        n, l = bad.nonzero()[0].tolist()
        raise ValueError(f'{what}: code {codes[n, l].item()} of row {n} at layer {l} is outside [0, K={ks[l]})')
    return codes

# ----------------------------------------------------------------------------
# The learned prior: a small causal transformer (pre-norm, GPT-style).

# Causal self-attention; with a cache (a dict), the new positions attend to the cached ones too.
class _Attention(nn.Module):
    def __init__(self, dim, heads, dropout):
        super().__init__()
        if dim % heads:
            raise ValueError(f'dim ({dim}) must be a multiple of heads ({heads})')
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x, cache=None):
        B, T, D = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)   # (B, H, T, dh)
        if cache is not None:
            if 'k' in cache:
                k, v = torch.cat([cache['k'], k], 2), torch.cat([cache['v'], v], 2)
            cache['k'], cache['v'] = k, v
        past = k.shape[2] - T
        # The mask makes the weights of later positions exactly 0, so row l never sees codes[:, l:].
        allowed = torch.arange(k.shape[2], device=x.device)[None, :] <= torch.arange(past, past + T, device=x.device)[:, None]
        att = (q @ k.transpose(-1, -2)) * (1 / math.sqrt(q.shape[-1]))
        att = self.drop(torch.softmax(att.masked_fill(~allowed, -math.inf), dim=-1))
        return self.proj((att @ v).transpose(1, 2).reshape(B, T, D))

class _Block(nn.Module):
    def __init__(self, dim, heads, mlp_ratio, dropout):
        super().__init__()
        self.norm0 = nn.LayerNorm(dim)
        self.attn = _Attention(dim, heads, dropout)
        self.norm1 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_ratio * dim), nn.GELU(), nn.Linear(mlp_ratio * dim, dim), nn.Dropout(dropout))
        self.drop = nn.Dropout(dropout)

    def forward(self, x, cache=None):
        x = x + self.drop(self.attn(self.norm0(x), cache))
        return x + self.mlp(self.norm1(x))

@persistence.persistent_class
class TransformerPrior(CodePrior):
    def __init__(self,
        ks,                         # K of each layer.
        dim         = 64,           # Width of the tokens.
        depth       = 2,            # Number of transformer blocks.
        heads       = 4,            # Attention heads.
        mlp_ratio   = 4,            # Hidden width of the MLPs, in multiples of dim.
        dropout     = 0.3,          # Dropout (embeddings, attention, residual branches) in training.
    ):
        super().__init__(ks)
        L, kmax = self.num_layers, self.kmax
        self.embed = nn.Parameter(torch.randn(L, kmax, dim) * 0.02)       # Code k of layer l, read at position l+1.
        self.bos = nn.Parameter(torch.zeros(dim))                          # What position 0 reads.
        self.pos = nn.Parameter(torch.randn(L, dim) * 0.02)                # Layer index l.
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList([_Block(dim, heads, mlp_ratio, dropout) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Parameter(torch.zeros(L, kmax, dim))                # Layer l's K_l output rows;
        self.head_bias = nn.Parameter(torch.zeros(L, kmax))                # zero: the prior starts uniform.
        for block in self.blocks:
            for m in block.modules():
                if isinstance(m, nn.Linear):
                    nn.init.normal_(m.weight, std=0.02)
                    nn.init.zeros_(m.bias)

    # Input token of position l: the embedding of code k_{l-1} (BOS at l = 0) plus that of l.
    def _tokens(self, prev_codes, first):
        B, T = prev_codes.shape
        L, kmax, D = self.embed.shape
        layers = torch.arange(first - 1, first - 1 + T, device=prev_codes.device)                # Layer of each code.
        idx = layers.clamp(min=0)[None] * kmax + prev_codes.clamp(0, kmax - 1)                    # Anything is safe.
        x = self.embed.view(L * kmax, D)[idx]
        x = torch.where((layers < 0)[None, :, None], self.bos.to(x.dtype), x)
        return self.drop(x + self.pos[first:first + T])

    def _head(self, h, first):
        h = self.norm(h)
        T = h.shape[1]
        return torch.einsum('btd,tkd->btk', h, self.head[first:first + T]) + self.head_bias[first:first + T]

    def logits(self, codes):
        prev = F.pad(codes[:, :-1], (1, 0))                 # Position l reads codes[:, l - 1] (position 0: BOS).
        x = self._tokens(prev, 0)
        for block in self.blocks:
            x = block(x)
        return self._head(x, 0)

    def begin(self, batch_size):
        return dnnlib.EasyDict(l=0, caches=[{} for _ in self.blocks], batch_size=batch_size)

    def step(self, state, prev):
        l = state.l
        if l >= self.num_layers:
            raise ValueError(f'step: all {self.num_layers} layers were already given')
        prev = torch.zeros(state.batch_size, dtype=torch.long, device=self.valid.device) if prev is None else prev
        x = self._tokens(prev.to(self.valid.device, torch.long)[:, None], l)
        for block, cache in zip(self.blocks, state.caches, strict=True):
            x = block(x, cache)
        logits = self._head(x, l)[:, 0].float().masked_fill(~self.valid[l], -math.inf)
        state.l += 1
        return torch.log_softmax(logits, dim=-1)

    # Start from the per-layer frequency prior of `codes` (the output biases; the head is zero at
    # initialisation, so the untrained transformer IS that baseline): training then learns only what
    # the layers above add, and early stopping never ends worse than the baseline on its held-out codes.
    @torch.no_grad()
    def init_from_frequencies(self, codes, smoothing=1.0):
        freq = fit_frequency_prior(codes, self.ks, smoothing)
        self.head_bias.copy_(freq.counts.clamp(min=1e-30).log().to(self.head_bias.device) * self.valid)
        return self

    def extra_repr(self):
        return f'L={self.num_layers}, ks={sorted(set(self.ks))}'

# The prior classes by short name (train.py --prior, train_prior.py --kind).
PRIOR_KINDS = dict(frequency=FrequencyPrior, transformer=TransformerPrior)

# ----------------------------------------------------------------------------
# Likelihood and training.

# Negative log2-likelihood of every row of codes (N,) in bits, in batches, in eval mode.
@torch.no_grad()
def code_bits(prior, codes, batch=1024):
    codes = check_codes(codes, prior.ks)
    was_training = prior.training
    prior.eval()
    try:
        out = []
        for start in range(0, codes.shape[0], batch):
            c = codes[start:start + batch].to(prior.valid.device)
            lp = prior.log_probs(c).gather(2, c[:, :, None])[:, :, 0]
            out.append(-lp.double().sum(1).cpu() / math.log(2))
        return torch.cat(out) if out else torch.zeros(0, dtype=torch.float64)
    finally:
        prior.train(was_training)

# Mean bits per image of codes (N, L) under the prior: -sum_l log2 p(k_l | k_<l) (held-out likelihood).
def bits_per_image(prior, codes, batch=1024):
    bits = code_bits(prior, codes, batch)
    if bits.numel() == 0:
        raise ValueError('bits_per_image needs at least one row of codes')
    return float(bits.mean())

# Train a prior with cross-entropy on codes (N, L): AdamW on random batches drawn with a seeded
# generator; when `held_out` codes are given, they are scored before training and every `eval_every`
# steps and the state with the fewest held-out bits is kept (early stopping; a small code set overfits
# quickly).
# Returns a list of dicts (step, train_bits, held_out_bits) of the evaluations.
def train_prior(prior, codes, steps, batch=128, lr=1e-3, weight_decay=0.1, held_out=None, eval_every=25, seed=0,
                log=None):
    codes = check_codes(codes, prior.ks)
    held = check_codes(held_out, prior.ks, 'held_out') if held_out is not None else None
    if codes.shape[0] == 0:
        raise ValueError('train_prior needs at least one row of codes')
    device = prior.valid.device
    codes = codes.to(device)
    params = [p for p in prior.parameters() if p.requires_grad]
    history = []
    if not params or steps <= 0:
        return history
    decay = [p for p in params if p.ndim >= 2]
    plain = [p for p in params if p.ndim < 2]
    opt = torch.optim.AdamW([dict(params=decay, weight_decay=weight_decay), dict(params=plain, weight_decay=0)], lr=lr)
    gen = torch.Generator(device='cpu').manual_seed(seed)
    best, best_state = math.inf, None
    if held is not None:        # The starting point is a candidate too (e.g. the frequency baseline).
        best = bits_per_image(prior, held)
        best_state = {k: v.detach().clone() for k, v in prior.state_dict().items()}
        history.append(dict(step=0, held_out_bits=best))
        if log is not None:
            log(history[-1])
    prior.train()
    running = []
    for it in range(1, steps + 1):
        idx = torch.randint(0, codes.shape[0], [min(batch, codes.shape[0])], generator=gen).to(device)
        c = codes[idx]
        lp = prior.log_probs(c).gather(2, c[:, :, None])[:, :, 0]
        loss = -lp.sum(1).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        running.append(loss.detach())
        if it % eval_every == 0 or it == steps:
            row = dict(step=it, train_bits=float(torch.stack(running).mean()) / math.log(2))
            running = []
            if held is not None:
                row['held_out_bits'] = bits_per_image(prior, held)
                if row['held_out_bits'] < best:
                    best = row['held_out_bits']
                    best_state = {k: v.detach().clone() for k, v in prior.state_dict().items()}
            history.append(row)
            if log is not None:
                log(row)
    if best_state is not None:
        prior.load_state_dict(best_state)
    prior.eval()
    return history

# ----------------------------------------------------------------------------
# Sampling.

# How codes are drawn from the prior: log p / temperature, restricted to the top_k most probable
# codes (0: all) and to the smallest set whose probability reaches top_p (1: all).
class PriorRule(NamedTuple):
    prior:          CodePrior
    temperature:    float = 1.0
    top_k:          int = 0
    top_p:          float = 1.0

def check_rule(temperature=1.0, top_k=0, top_p=1.0):
    if not temperature >= 0:
        raise ValueError(f'prior temperature must be >= 0, got {temperature}')
    if int(top_k) != top_k or top_k < 0:
        raise ValueError(f'prior top_k must be an integer >= 0 (0 = all codes), got {top_k!r}')
    if not 0 < top_p <= 1:
        raise ValueError(f'prior top_p must be in (0, 1], got {top_p}')

# The codes a rule allows: (B, K) log-probs -> (B, K) bool, the top_k most probable (ties by index)
# and the smallest most-probable set whose probability reaches top_p (at least the most probable).
def allowed_codes(log_p, top_k=0, top_p=1.0):
    keep = torch.isfinite(log_p)
    if top_k or top_p < 1:
        order = torch.sort(log_p, dim=1, descending=True, stable=True).indices
        rank = torch.empty_like(order).scatter_(1, order, torch.arange(log_p.shape[1], device=log_p.device).expand_as(order))
        if top_k:
            keep &= rank < top_k
        if top_p < 1:
            p_sorted = log_p.double().exp().gather(1, order)
            before = p_sorted.cumsum(1) - p_sorted          # Probability of the more probable codes.
            keep &= (before < top_p).gather(1, rank)
    return keep

# Inverse-CDF draw (B,) from weights log_w (B, K) (-inf = excluded) with uniforms u (B,) in [0, 1).
# A row whose allowed weights are all equal gives the u-th allowed code, so a uniform prior gives
# floor(u * K) exactly: the codes of today's uniform sampling.
def inverse_cdf(log_w, u):
    u = u.to(log_w.device).double()
    finite = torch.isfinite(log_w)
    w = torch.softmax(log_w.double(), dim=1)
    cdf = w.cumsum(1)
    codes = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True)[:, 0].clamp_(max=log_w.shape[1] - 1)
    # Never an excluded code (a draw at the rounding edge of the cdf): the last allowed one instead.
    last = (finite.long() * torch.arange(log_w.shape[1], device=log_w.device)).argmax(1)
    codes = torch.where(finite.gather(1, codes[:, None])[:, 0], codes, last)
    row_max = log_w.masked_fill(~finite, -math.inf).amax(1, keepdim=True)
    flat = ((log_w == row_max) | ~finite).all(1)
    n = finite.sum(1).clamp(min=1)
    j = (u * n).long().clamp_(max=n - 1)
    return torch.where(flat, _nth_true(finite, j), codes)

# One layer's codes (B,) from its log-probs (B, K) and the seeds' uniforms u (B,). Temperature 0 is the
# argmax (ties broken by u, as ddl.argmin does).
def choose(log_p, u, temperature=1.0, top_k=0, top_p=1.0):
    keep = allowed_codes(log_p, top_k, top_p)
    if temperature == 0:
        return argmin(torch.where(keep, -log_p, math.inf), None, u)
    return inverse_cdf(torch.where(keep, log_p / temperature, -math.inf), u)

# Codes (B, L) from per-seed uniforms (B, L) (e.g. `net.seed_uniforms(seeds)`): layer after layer,
# code l drawn from p(k_l | codes above) by `choose`. Each row depends only on its own uniforms.
@torch.no_grad()
def sample(prior, uniforms, temperature=1.0, top_k=0, top_p=1.0):
    check_rule(temperature, top_k, top_p)
    if uniforms.ndim != 2 or uniforms.shape[1] != prior.num_layers:
        raise ValueError(f'uniforms must have shape (B, {prior.num_layers}), got {tuple(uniforms.shape)}')
    was_training = prior.training
    prior.eval()
    try:
        B, L = uniforms.shape
        state = prior.begin(B)
        codes = torch.zeros(B, L, dtype=torch.long, device=prior.valid.device)
        prev = None
        for l in range(L):
            row = prior.step(state, prev)[:, :prior.ks[l]]
            prev = codes[:, l] = choose(row, uniforms[:, l], temperature, top_k, top_p)
        return codes
    finally:
        prior.train(was_training)

# ----------------------------------------------------------------------------
# Fitting a prior to a network: its codes of a dataset, a held-out split, the figures to report.

# The codes (N, L) int64 on the CPU of dataset images `indices` (uint8 CHW), encoded by `net` (L2-guided,
# `net.encode`, in eval mode under batch_invariant()). Unconditional networks only.
@torch.no_grad()
def dataset_codes(net, dataset, indices, batch=256):
    import numpy as np
    from training.images import to_float
    if getattr(net, 'condition', None) is not None:
        raise ValueError(f'a prior over the codes of a conditional network ({net.condition!r}) is not supported')
    device = net.init_feature.device
    indices, out = list(indices), []
    for start in range(0, len(indices), batch):
        x = torch.from_numpy(np.stack([dataset[int(i)][0] for i in indices[start:start + batch]])).to(device)
        codes, _ = net.encode(to_float(x))
        out.append(codes.cpu())
    return torch.cat(out) if out else torch.zeros(0, net.num_layers, dtype=torch.long)

# (train, held-out) index lists of n images: the last max(1, round(n * fraction)) are held out (0: none).
def split_indices(n, held_out=0.1):
    if not 0 <= held_out < 1:
        raise ValueError(f'held_out must be a fraction in [0, 1), got {held_out}')
    num_held = 0 if held_out == 0 else max(1, round(n * held_out))
    if n - num_held < 1:
        raise ValueError(f'{n} images leave nothing to train the prior on after holding out {num_held}')
    return list(range(n - num_held)), list(range(n - num_held, n))

# Codes (N, L) -> (fit, validation): the last max(1, round(N * fraction)) rows validate (early stopping),
# so that the held-out codes a prior is reported on are never used to choose its state. (codes, None)
# when there are too few rows to split.
def split_validation(codes, fraction=0.1):
    num_val = max(1, round(codes.shape[0] * fraction))
    if codes.shape[0] - num_val < 1:
        return codes, None
    return codes[:-num_val], codes[-num_val:]

# Per-seed uniforms (B, L) float64, exactly those of `net.seed_uniforms(seeds)` for a network of L layers.
def seed_uniforms(seeds, num_layers):
    rows = [torch.rand(num_layers, generator=torch.Generator().manual_seed(int(s)), dtype=torch.float64) for s in seeds]
    return torch.stack(rows) if rows else torch.zeros(0, num_layers, dtype=torch.float64)

# The share of rows of `sampled` (N, L) equal to some row of `reference` (M, L): a prior that replays the
# training codes is not a generator.
def replay_share(sampled, reference):
    known = {bytes(row) for row in torch.as_tensor(reference).long().cpu().numpy()}
    rows = torch.as_tensor(sampled).long().cpu().numpy()
    return sum(bytes(row) in known for row in rows) / max(len(rows), 1)

# Make and train a prior of `kind` ('frequency' or 'transformer') on `train` codes (N, L), early-stopped
# on `held` (None: no early stopping); the transformer starts from the frequencies of `train`
# (`from_frequencies`). Returns (prior in eval mode, training history).
def fit_prior(kind, ks, train, held=None, steps=300, batch=128, lr=1e-3, weight_decay=0.1, eval_every=25, seed=0,
              device='cpu', log=None, from_frequencies=True, **prior_kwargs):
    if kind not in PRIOR_KINDS:
        raise ValueError(f'prior kind must be one of {", ".join(PRIOR_KINDS)}, got {kind!r}')
    if kind == 'frequency':
        if prior_kwargs:
            raise ValueError(f'the frequency prior takes no options, got {sorted(prior_kwargs)}')
        return fit_frequency_prior(train, ks).to(device).eval(), []
    torch.manual_seed(seed)
    prior = PRIOR_KINDS[kind](ks, **prior_kwargs).to(device)
    if from_frequencies:
        prior.init_from_frequencies(train)
    history = train_prior(prior, train, steps, batch=batch, lr=lr, weight_decay=weight_decay, held_out=held,
                          eval_every=eval_every, seed=seed, log=log)
    return prior.eval(), history

# The figures of a prior: held-out bits per image of uniform codes (sum log2 K), of the frequency baseline
# fitted to `train`, and of the prior; the share of sampled code sequences (from `uniforms`, (N, L)) equal
# to a training image's codes, for the prior, the frequency baseline and uniform codes.
@torch.no_grad()
def prior_report(prior, train, held, uniforms):
    freq = fit_frequency_prior(train, prior.ks).to(prior.valid.device)
    uniform = FrequencyPrior(prior.ks).to(prior.valid.device)
    report = dict(num_train=int(train.shape[0]), num_held_out=int(held.shape[0]),
                  uniform_bits=sum(math.log2(k) for k in prior.ks))
    if held.shape[0]:
        report.update(frequency_bits=bits_per_image(freq, held), prior_bits=bits_per_image(prior, held))
    if uniforms.shape[0]:
        uniforms = uniforms.to(prior.valid.device)
        report.update(num_samples=int(uniforms.shape[0]), prior_replay=replay_share(sample(prior, uniforms), train),
                      frequency_replay=replay_share(sample(freq, uniforms), train),
                      uniform_replay=replay_share(sample(uniform, uniforms), train))
    return report

# ----------------------------------------------------------------------------
# Files: safetensors + the constructor call as JSON metadata.

def prior_class(class_name, source='<prior>'):
    if class_name not in PRIOR_CLASSES:
        raise UnsafeFileError(f'{source}: refusing prior class {class_name!r}; a prior file may only name {", ".join(PRIOR_CLASSES)}')
    return dnnlib.util.get_obj_by_name(class_name)

# The safe file of a prior, as bytes; `extra_metadata` (JSON values) is stored beside the description.
def prior_bytes(prior, extra_metadata=None):
    from safetensors.torch import save
    cls = type(prior)
    class_name = f'{cls.__module__}.{cls.__qualname__}'
    if class_name not in PRIOR_CLASSES or 'init_kwargs' not in prior.__dict__:
        raise ValueError(f'Only our prior classes ({", ".join(PRIOR_CLASSES)}) can be saved, got {class_name}')
    meta = dict(format=PRIOR_FORMAT, version=PRIOR_VERSION, class_name=class_name,
                init_args=json.loads(json.dumps(list(prior.init_args))), init_kwargs=json.loads(json.dumps(dict(prior.init_kwargs))))
    metadata = {'ddn': json.dumps(meta)}
    for key, value in (extra_metadata or {}).items():
        metadata[key] = value if isinstance(value, str) else json.dumps(value, default=str)
    return save({k: v.detach().cpu().contiguous() for k, v in prior.state_dict().items()}, metadata=metadata)

def save_prior(prior, path, extra_metadata=None):
    """Write `prior` to `path` (safetensors + JSON description), atomically."""
    checkpoint.save_atomic(prior_bytes(prior, extra_metadata), path, mode='bytes')

def prior_from_bytes(data, source='<prior>'):
    """A prior from the bytes of a prior file, in eval mode. Raises ValueError naming `source`."""
    from safetensors.torch import load
    metadata = safetensors_metadata(data)
    if metadata is None:
        raise ValueError(f'{source} is not a safetensors file (expected a prior written by train_prior.py or by train.py)')
    try:
        meta = json.loads(metadata['ddn'])
    except (KeyError, TypeError, ValueError):
        raise ValueError(f'{source} is a safetensors file without ddn metadata') from None
    if not isinstance(meta, dict) or meta.get('format') != PRIOR_FORMAT:
        found = meta.get('format') if isinstance(meta, dict) else None
        raise ValueError(f'{source} is not a prior file (its ddn metadata has format {found!r}, expected {PRIOR_FORMAT!r})')
    if meta.get('version') != PRIOR_VERSION:
        raise ValueError(f'{source}: {PRIOR_FORMAT} version {meta.get("version")!r}; this code reads version {PRIOR_VERSION}')
    cls = prior_class(meta.get('class_name'), source)
    args, kwargs = meta.get('init_args', []), meta.get('init_kwargs', {})
    if not isinstance(args, list) or not isinstance(kwargs, dict):
        raise ValueError(f'{source}: init_args must be a list and init_kwargs an object')
    try:
        prior = cls(*args, **kwargs)
        prior.load_state_dict(load(bytes(data)), strict=True)
    except (TypeError, ValueError, RuntimeError) as err:
        raise ValueError(f'{source}: the weights do not fit {meta["class_name"]}({args}, {kwargs}): {err}') from None
    return prior.eval().requires_grad_(False)

def prior_metadata(data):
    """The extra metadata of a prior file's bytes (JSON values decoded where they parse)."""
    out = {}
    for key, value in (safetensors_metadata(data) or {}).items():
        if key == 'ddn':
            continue
        try:
            out[key] = json.loads(value)
        except ValueError:
            out[key] = value
    return out

def load_prior(path, device='cpu'):
    """The prior in file `path`, in eval mode without gradients, on `device`."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f'Prior not found: {path}')
    with open(path, 'rb') as f:
        data = f.read()
    return prior_from_bytes(data, path).to(device)

# Where the prior of a network file lives: X.safetensors / X.pkl -> X.prior.safetensors.
def prior_path(network_path):
    network_path = os.fspath(network_path)
    for ext in ('.safetensors', '.pkl'):
        if network_path.endswith(ext) and not network_path.endswith(PRIOR_SUFFIX):
            return network_path[:-len(ext)] + PRIOR_SUFFIX
    return network_path + PRIOR_SUFFIX

# The prior file of a network file, or None if it has none.
def find_prior(network_path) -> Optional[str]:
    path = prior_path(network_path)
    return path if os.path.isfile(path) else None

# A prior whose ks must match a network's (a clear message otherwise).
def check_prior_fits(prior, ks: Sequence[int], source='<prior>'):
    if list(prior.ks) != [int(k) for k in ks]:
        raise ValueError(f'{source}: the prior is for {len(prior.ks)} layers of K={sorted(set(prior.ks))}, '
                         f'the network has {len(ks)} layers of K={sorted(set(int(k) for k in ks))}')
    return prior
