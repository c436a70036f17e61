"""Drawing codes from a prior over DDN latents (training/prior.py): the sampling rule.

- `sample`: codes from per-seed uniforms (B, L) by inverse CDF, layer after layer, with temperature,
  top-k and top-p (`choose`), so the codes of seed s do not depend on the batch; a uniform prior gives
  exactly the codes of uniform sampling (`floor(u * K)`).
- `PriorRule`: a prior with its temperature, top-k and top-p, as the samplers take it (sampling/).
- `seed_uniforms`: the per-seed uniforms of `net.seed_uniforms(seeds)` without a network.
"""

import math
from typing import NamedTuple

import torch

from training.ddl import _nth_true, argmin
from training.prior import CodePrior


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
        uniforms = uniforms.to(prior.valid.device)      # Per-seed uniforms may come from the host.
        state = prior.begin(B)
        codes = torch.zeros(B, L, dtype=torch.long, device=prior.valid.device)
        prev = None
        for l in range(L):
            row = prior.step(state, prev)[:, :prior.ks[l]]
            prev = codes[:, l] = choose(row, uniforms[:, l], temperature, top_k, top_p)
        return codes
    finally:
        prior.train(was_training)

# Per-seed uniforms (B, L) float64, exactly those of `net.seed_uniforms(seeds)` for a network of L layers.
def seed_uniforms(seeds, num_layers):
    rows = [torch.rand(num_layers, generator=torch.Generator().manual_seed(int(s)), dtype=torch.float64) for s in seeds]
    return torch.stack(rows) if rows else torch.zeros(0, num_layers, dtype=torch.float64)
