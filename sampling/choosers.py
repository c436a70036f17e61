"""Choosers of zero-shot conditional generation: distances (B, K) of a layer's K candidates + the
LayerInfo + this layer's per-seed uniform numbers u (B,) -> the codes kept (B,). Every chooser here uses
u for its randomness and its tie breaks (so guided sampling is deterministic per seed and does not
depend on the batch), and gives `floor(u * K)`, the unguided sample's code, on a constant row. The
network's default chooser is `training.ddl.argmin`; `sampling/guide_spec.make_chooser` picks one by name.
"""

import torch

from training.ddl import argmin, uniform_to_codes
from sampling.guidance import normalize_distances


# Sample from softmax(-z / T), z the per-sample z-scored distances, by inverse CDF of u: the same u
# gives the same choice whatever the batch. T -> 0 is argmin; T = 1: a candidate one standard
# deviation better is e times as likely; T -> inf is uniform sampling.
class TemperatureChooser:
    def __init__(self,
        temperature,                # T >= 0.
    ):
        if not temperature >= 0:
            raise ValueError(f'temperature must be >= 0, got {temperature}')
        self.temperature = float(temperature)

    def __call__(self, dist, info=None, u=None):
        if self.temperature == 0:
            return argmin(dist, info, u)
        B, K = dist.shape
        if u is None:
            u = torch.rand(B, device=dist.device, dtype=torch.float64)
        u = u.to(dist.device).double()
        p = torch.softmax(-normalize_distances(dist) / self.temperature, dim=1)
        cdf = p.cumsum(1)
        codes = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True)[:, 0].clamp_(max=K - 1)
        flat = (dist == dist[:, :1]).all(1)                                  # Exactly uniform on constant rows.
        return torch.where(flat, uniform_to_codes(u, K), codes)

# Uniform choice among the n best candidates (ties in rank broken by index), with u.
class TopKChooser:
    def __init__(self,
        n,                          # Number of best candidates to choose from, >= 1.
    ):
        if int(n) != n or n < 1:
            raise ValueError(f'top-k needs n >= 1 (an integer), got {n!r}')
        self.n = int(n)

    def __call__(self, dist, info=None, u=None):
        B, K = dist.shape
        n = min(self.n, K)
        if u is None:
            u = torch.rand(B, device=dist.device, dtype=torch.float64)
        u = u.to(dist.device).double()
        order = torch.sort(dist, dim=1, stable=True).indices
        codes = order.gather(1, uniform_to_codes(u, n)[:, None])[:, 0]
        flat = (dist == dist[:, :1]).all(1)
        return torch.where(flat, uniform_to_codes(u, K), codes)

# ----------------------------------------------------------------------------
