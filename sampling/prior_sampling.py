"""Sampling a DDN through a prior over its codes (training/prior.py), unguided or guided.

Unguided: the prior draws the whole latent first, layer after layer from p(k_l | k_<l) with the seed's
own uniforms (inverse CDF, `training.prior_rule.sample`), then the network decodes it (`net(codes=...)`):
the image of seed s does not depend on the batch, and a uniform prior gives exactly today's samples.

Guided (zero-shot conditional generation): the scorer ranks a layer's K candidates, the prior weighs
them. With the prior's row p_l(k) = p(k | k_<l), its temperature T (p^(1/T)) and the set A of codes its
top-k / top-p allow, the guided choice rule (`--guide-temp`, `--guide-topk`, default argmin) becomes:
- argmin (default): the candidates of A with the smallest distance; exact ties (among them a layer the
  scorer does not distinguish, with constant distances) are drawn from p_l^(1/T);
- `--guide-temp tau`: sample from softmax(log p_l(k) / T - z_k / tau) over A, z the per-sample z-scored
  distances (`guidance.normalize_distances`);
- `--guide-topk n`: the n candidates of A with the smallest distance, drawn from p_l^(1/T) (constant
  distances: all of A).
So a scorer that gives every candidate the same distance leaves exactly the unguided prior sample.
Prior temperature 0 takes the most probable code of the set instead of drawing.
"""

import math

import torch

from training import prior_files
from training import prior_rule
from training.ddl import argmin
from training.prior_rule import PriorRule
from sampling.choosers import TemperatureChooser, TopKChooser
from sampling.guidance import normalize_distances

# ----------------------------------------------------------------------------
# The guided choice with a prior: a chooser (training/ddl.py `Chooser`) that keeps the codes it chose
# within one network call, so it can ask the prior for p(k_l | k_<l). It must see every layer in
# order from layer 0 (a network driven by a scorer from its first layer, as guided sampling is).

class PriorChooser:
    def __init__(self,
        rule:       PriorRule,          # The prior and its temperature / top-k / top-p.
        chooser     = None,             # The guided rule it weights: argmin (None), TemperatureChooser or TopKChooser.
    ):
        chooser = argmin if chooser is None else chooser
        if not (chooser is argmin or isinstance(chooser, (TemperatureChooser, TopKChooser))):
            raise ValueError(f'a prior combines with the argmin, temperature or top-k guided choice, not {chooser!r}')
        prior_rule.check_rule(rule.temperature, rule.top_k, rule.top_p)
        self.rule, self.base = rule, chooser
        self._state = self._prev = None

    def __call__(self, dist, info, u=None):
        prior, l = self.rule.prior, info.index
        B, K = dist.shape
        if l == 0:
            self._state, self._prev = prior.begin(B), None
        elif self._state is None or self._state.l != l:
            raise ValueError(f'PriorChooser: asked for layer {l} before layer {0 if self._state is None else self._state.l}; '
                             'a prior guides only a network run from its first layer')
        if K != prior.ks[l]:
            raise ValueError(f'PriorChooser: layer {l} has K={K}, the prior expects {prior.ks[l]}')
        if u is None:
            u = torch.rand(B, dtype=torch.float64, device=dist.device)
        u = u.to(dist.device).double()
        log_p = prior.step(self._state, self._prev)[:, :K].to(dist.device).double()
        codes = self.choose(dist.double(), log_p, u)
        self._prev = codes
        return codes

    # The rule of the module docstring, for one layer: distances and prior log-probs (B, K) -> (B,).
    def choose(self, dist, log_p, u):
        T = self.rule.temperature
        allowed = prior_rule.allowed_codes(log_p, self.rule.top_k, self.rule.top_p)
        if isinstance(self.base, TemperatureChooser) and self.base.temperature > 0:
            score = (log_p / T if T > 0 else torch.zeros_like(log_p)) - normalize_distances(dist) / self.base.temperature
            return prior_rule.inverse_cdf(torch.where(allowed, score, -math.inf), u)
        masked = torch.where(allowed, dist, math.inf)
        if isinstance(self.base, TopKChooser):
            flat = (dist == dist[:, :1]).all(1, keepdim=True)
            order = torch.sort(masked, dim=1, stable=True).indices
            rank = torch.empty_like(order).scatter_(1, order, torch.arange(dist.shape[1], device=dist.device).expand_as(order))
            chosen = allowed & ((rank < self.base.n) | flat)
        else:                                               # argmin (also --guide-temp 0).
            chosen = allowed & (masked == masked.amin(1, keepdim=True))
        return prior_rule.choose(torch.where(chosen, log_p, -math.inf), u, T)

# ----------------------------------------------------------------------------
# One batch of samples with a prior: codes from the seeds (unguided) or the guided rule above.
# Call it inside `batch_invariant()` (as generate_batches does) for per-seed results.

@torch.no_grad()
def sample_with_prior(net, seeds, rule: PriorRule, scorer=None, chooser=None, condition=None):
    prior_files.check_prior_fits(rule.prior, net.ks)
    if scorer is None:
        codes = prior_rule.sample(rule.prior, net.seed_uniforms(seeds), rule.temperature, rule.top_k, rule.top_p)
        return net(codes=codes, condition=condition)
    return net(seeds=seeds, scorer=scorer, chooser=PriorChooser(rule, chooser), condition=condition)
