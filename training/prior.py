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
- `MixturePrior`: per layer, a mixture of the transformer, a smoothed conditional on one earlier layer
  and the frequencies (`choose_pairs`, `fit_mixture_weights`: chosen on validation codes), so the
  baseline is inside it; on the digits it beats the baseline in held-out bits and sample FD.
- `train_prior` (cross-entropy, AdamW, keeps the state with the best held-out bits), `bits_per_image`,
  `fit_frequency_prior`.

Beside it: training/prior_rule.py draws codes from a prior (`sample`, `PriorRule`),
training/prior_files.py saves and loads priors, training/prior_training.py fits them to a network's
codes of a dataset (`fit_prior`, and train.py --prior). Prior files name the classes of this module
(`training.prior.FrequencyPrior`, `training.prior.TransformerPrior`, `training.prior.MixturePrior`): keep them here.
"""

import math

import torch
from torch import nn
from torch.nn import functional as F

import dnnlib
from torch_utils import persistence

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
        code_dropout= 0.0,          # In training, the share of input codes read as unknown (the BOS vector).
    ):
        super().__init__(ks)
        if not 0 <= code_dropout < 1:
            raise ValueError(f'code_dropout must be in [0, 1), got {code_dropout}')
        self.code_dropout = float(code_dropout)
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
        unknown = (layers < 0)[None, :, None]
        if self.training and self.code_dropout > 0:     # Code dropout: the model learns from partial prefixes.
            unknown = unknown | (torch.rand(B, T, 1, device=x.device) < self.code_dropout)
        x = torch.where(unknown, self.bos.to(x.dtype), x)
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

# ----------------------------------------------------------------------------
# The learned prior that contains the baseline: a per-layer mixture of the transformer, a smoothed
# pairwise conditional and the frequencies.

# The components of a MixturePrior, in the order of its weights.
MIXTURE_COMPONENTS = ('transformer', 'pair', 'frequency')

# The smoothings tried for the pairwise conditionals (pseudo-counts of the frequency prior).
PAIR_SMOOTHINGS = (1.0, 3.0, 10.0, 30.0, 100.0, 300.0)

@persistence.persistent_class
class MixturePrior(CodePrior):
    """p(k_l | k_<l) = w_l0 p_transformer(k_l | k_<l) + w_l1 p_pair(k_l | k_parent(l)) + w_l2 p_frequency(k_l).

    The pairwise component conditions layer l on one earlier layer parent(l) (none: the frequencies):
    p(b | a) = (n(a, b) + alpha_l p_frequency(b)) / (n(a) + alpha_l), counts of codes. `fit_pairs`
    chooses parent(l) and alpha_l, `fit_mixture_weights` the weights w_l (a point of the simplex), both
    on validation codes; on those codes the mixture then scores no worse than any of its components
    (a concave problem per layer). With w_l = (0, 0, 1) it is the per-layer frequency prior, the baseline.
    """
    def __init__(self,
        ks,                         # K of each layer.
        **transformer_kwargs,       # Options of the TransformerPrior component (dim, depth, heads, mlp_ratio, dropout, code_dropout).
    ):
        super().__init__(ks)
        L, kmax = self.num_layers, self.kmax
        self.transformer = TransformerPrior(ks, **transformer_kwargs)
        self.frequency = FrequencyPrior(ks)
        self.register_buffer('parent', torch.full([L], -1, dtype=torch.long))           # parent(l) < l, -1: none.
        self.register_buffer('pair_log_p', torch.zeros(L, kmax, kmax))                   # log p_pair(b | a) at [l, a, b].
        weights = torch.zeros(L, len(MIXTURE_COMPONENTS))
        weights[:, 0] = 1                                                                 # The transformer alone.
        self.register_buffer('weights', weights)

    # log p_pair (B, L, Kmax) of codes (B, L): row l reads only codes[:, parent(l)] (0 where there is none).
    def _pair_log_probs(self, codes):
        prev = torch.where(self.parent[None] >= 0, codes.gather(1, self.parent.clamp(min=0)[None].expand(codes.shape[0], -1)), 0)
        prev = prev.clamp(0, self.kmax - 1)
        return self.pair_log_p[torch.arange(self.num_layers, device=codes.device)[None], prev]

    # The mixture of component rows (..., C, K) with weights (..., C) (rows outside K are -inf).
    def _mix(self, rows, weights, valid):
        rows = rows.double().masked_fill(~valid[..., None, :], 0) + weights.double().log()[..., None]
        return torch.logsumexp(rows, dim=-2).masked_fill(~valid, -math.inf).float()

    def _components(self, codes):   # (B, L, C, Kmax) log-probabilities of the components.
        return torch.stack([self.transformer.log_probs(codes), self._pair_log_probs(codes),
                            self.frequency.log_probs(codes)], dim=2)

    def logits(self, codes):        # Normalised log-probabilities (a valid set of logits).
        return self._mix(self._components(codes), self.weights[None], self.valid)

    def begin(self, batch_size):
        return dnnlib.EasyDict(l=0, inner=self.transformer.begin(batch_size), batch_size=batch_size,
                               codes=torch.zeros(batch_size, self.num_layers, dtype=torch.long, device=self.valid.device))

    def step(self, state, prev):
        l = state.l
        row_t = self.transformer.step(state.inner, prev)
        if l > 0:
            state.codes[:, l - 1] = prev.to(self.valid.device, torch.long)
        row_p = self._pair_log_probs(state.codes)[:, l]
        row_f = self.frequency.log_probs(state.codes[:1])[:, l].expand_as(row_t)
        state.l += 1
        return self._mix(torch.stack([row_t, row_p, row_f], dim=1), self.weights[l][None], self.valid[l])

    # The frequency and pairwise components from codes (N, L): add-one frequencies, and the pairwise
    # conditionals of the chosen parents and smoothings (`parents`, `alphas`: lists of L; parent -1 = none).
    @torch.no_grad()
    def set_counts(self, codes, parents=None, alphas=None):
        codes = check_codes(codes, self.ks)
        L, kmax = self.num_layers, self.kmax
        parents = [-1] * L if parents is None else [int(j) for j in parents]
        alphas = [1.0] * L if alphas is None else [float(a) for a in alphas]
        if len(parents) != L or len(alphas) != L or any(not -1 <= j < l for l, j in enumerate(parents)) or min(alphas) <= 0:
            raise ValueError(f'parents must be L={L} layers each -1 or earlier than its own, alphas L values > 0; got {parents}, {alphas}')
        freq = fit_frequency_prior(codes, self.ks)
        self.frequency.counts.copy_(freq.counts.to(self.frequency.counts.device))
        p_f = (freq.counts / freq.counts.sum(1, keepdim=True)).double()                  # (L, Kmax)
        table = torch.zeros(L, kmax, kmax, dtype=torch.float64)
        for l, (j, a) in enumerate(zip(parents, alphas)):
            joint = torch.zeros(kmax, kmax, dtype=torch.float64)
            if j >= 0:
                joint.index_put_((codes[:, j].cpu(), codes[:, l].cpu()), torch.ones(codes.shape[0], dtype=torch.float64), accumulate=True)
            table[l] = (joint + a * p_f[l][None]) / (joint.sum(1, keepdim=True) + a)
        log_table = table.clamp(min=1e-300).log().masked_fill(~self.valid.cpu()[:, None, :], 0)
        self.pair_log_p.copy_(log_table.float().to(self.pair_log_p.device))
        self.parent.copy_(torch.tensor(parents, dtype=torch.long))
        return self

    def extra_repr(self):
        return f'L={self.num_layers}, ks={sorted(set(self.ks))}, parents={self.parent.tolist()}'

# The -log p (N,) of codes (N, L) at layer l under a pairwise conditional on layer j (-1: the
# frequencies) with smoothing a, counted on `fit` (N', L); all in float64.
def _pair_bits(fit, codes, l, j, a, k):
    freq = (torch.bincount(fit[:, l], minlength=k)[:k].double() + 1)
    p_f = freq / freq.sum()
    if j < 0:
        return -p_f[codes[:, l]].log()
    joint = torch.zeros(int(max(fit[:, j].max(), codes[:, j].max())) + 1, k, dtype=torch.float64)
    joint.index_put_((fit[:, j], fit[:, l]), torch.ones(fit.shape[0], dtype=torch.float64), accumulate=True)
    cond = (joint + a * p_f[None]) / (joint.sum(1, keepdim=True) + a)
    return -cond[codes[:, j], codes[:, l]].log()

# Choose each layer's parent and smoothing for the pairwise component of a MixturePrior: the pair
# (parent j < l or none, alpha in `smoothings`) whose conditional counted on `fit` codes gives the
# `val` codes the highest likelihood. Returns (parents, alphas), lists of L.
def choose_pairs(fit, val, ks, smoothings=PAIR_SMOOTHINGS):
    ks = _check_ks(ks)
    fit, val = check_codes(fit, ks).cpu(), check_codes(val, ks, 'validation codes').cpu()
    if fit.shape[0] == 0 or val.shape[0] == 0:
        raise ValueError('choosing the pairwise conditionals needs fit and validation codes')
    parents, alphas = [], []
    for l, k in enumerate(ks):
        best = (float(_pair_bits(fit, val, l, -1, 1.0, k).sum()), -1, 1.0)
        for j in range(l):
            for a in smoothings:
                best = min(best, (float(_pair_bits(fit, val, l, j, a, k).sum()), j, float(a)))
        parents.append(best[1])
        alphas.append(best[2])
    return parents, alphas

# The weights w in the simplex maximising sum_n log(sum_c w_c p[n, c]) for probabilities p (N, C) > 0:
# EM (monotone; the problem is concave), then the best of that and the C single components.
def _best_weights(p, iters=500):
    p = p.double().clamp(min=1e-300)
    total = lambda w: float((p @ w).log().sum())
    w = torch.full([p.shape[1]], 1 / p.shape[1], dtype=torch.float64)
    for _ in range(iters):
        w = (p * w / (p @ w)[:, None]).mean(0)
    candidates = [w] + list(torch.eye(p.shape[1], dtype=torch.float64))
    return max(candidates, key=total)

# Choose the mixture weights of `prior` (a MixturePrior) on validation codes (N, L): per layer
# (`per_layer`, the default) or one set for all layers; on these codes the mixture then scores no
# worse than any of its components. Returns the weights (L, C) as a tensor.
@torch.no_grad()
def fit_mixture_weights(prior, codes, per_layer=True, batch=1024):
    codes = check_codes(codes, prior.ks, 'validation codes')
    if codes.shape[0] == 0:
        raise ValueError('fit_mixture_weights needs at least one row of validation codes')
    was_training = prior.training
    prior.eval()
    try:
        p = []
        for start in range(0, codes.shape[0], batch):
            c = codes[start:start + batch].to(prior.valid.device)
            lp = prior._components(c)                                                    # (B, L, C, Kmax)
            p.append(lp.gather(3, c[:, :, None, None].expand(-1, -1, lp.shape[2], 1))[..., 0].double().exp().cpu())
        p = torch.cat(p)                                                                 # (N, L, C)
        if per_layer:
            weights = torch.stack([_best_weights(p[:, l]) for l in range(prior.num_layers)])
        else:
            weights = _best_weights(p.flatten(0, 1))[None].expand(prior.num_layers, -1)
        prior.weights.copy_(weights.to(prior.weights))
        return weights.float()
    finally:
        prior.train(was_training)

# The prior classes by short name (train.py --prior, train_prior.py --kind).
PRIOR_KINDS = dict(frequency=FrequencyPrior, transformer=TransformerPrior, mixture=MixturePrior)

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
