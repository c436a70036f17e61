"""The Discrete Distribution Layer (DDL), the building block of a Discrete Distribution Network.

A DDL turns features into K candidate images at once (one bias-free 1x1 conv with K*C outputs) and a
selector keeps one candidate per sample (paper §3.1, our spec `DDN.md` §2):
- training / reconstruction: the candidate nearest (L2) to the target resized to this layer (in
  training, after the node set's balancing bias of `--balance=bias`, zero otherwise);
- decoding: the candidate named by a given code;
- sampling: a uniformly random candidate (the caller passes per-seed random codes);
- guided (zero-shot conditional generation): the argmin of any black-box scorer's distances.
The chosen index is the layer's code; the codes of all layers form the sample's 1D discrete latent.

Implementation notes (why it is fast):
- Candidates are scored without autograd, in fp32 even under autocast, so selection never depends
  on the training precision. For the L2 distance the K candidates are not even materialised when a
  Gram-matrix expansion is cheaper (large K, small feature maps).
- The chosen image is then recomputed from the chosen head alone (its C rows of the weight gathered
  per sample, one `bmm`): the only path autograd sees, K times cheaper than the all-K conv. Every
  mode produces its output image this way, so decode(encode(x)) is bit-identical to the
  reconstruction, and sampling costs one head per layer instead of K.
"""

import contextlib
import math
from typing import Callable, NamedTuple, Optional

import torch
from torch import nn
from torch.nn import functional as F

from training.split_prune import SplittableNodes

# ----------------------------------------------------------------------------
# What a guidance scorer learns about the layer it scores.

class LayerInfo(NamedTuple):
    index:      int     # Layer index l, 0-based.
    num_layers: int     # Latent length L of the network (0 when the layer is used alone).
    K:          int     # Number of candidates of this layer.
    size:       int     # Spatial size H (= W) of this layer's images.

# A scorer maps candidates (B, K, C, H, W) in [-1, 1] and LayerInfo to distances (B, K); lower is better.
Scorer = Callable[[torch.Tensor, LayerInfo], torch.Tensor]

# A chooser turns distances (B, K) into codes (B,); the default is `argmin` below. Its third argument
# is one uniform number in [0, 1) per sample (from the sample's seed, or None), for choosers that
# draw at random (temperature, top-k) and must stay deterministic per seed.
Chooser = Callable[[torch.Tensor, LayerInfo, Optional[torch.Tensor]], torch.Tensor]

# Results of one DDL call.
class DDLOutput(NamedTuple):
    image:  torch.Tensor                    # (B, C, H, W) the chosen candidate x_l, fp32.
    codes:  torch.Tensor                    # (B,) int64 chosen index k_l.
    loss:   Optional[torch.Tensor]          # (B,) loss of the chosen candidate vs the target, or None.
    leak:   Optional[torch.Tensor]          # (B, C, H, W) leak map of the chosen head, or None.
    dist:   Optional[torch.Tensor]          # (B, K) selection distances (no balancing bias), or None.

# Area-resize an image batch to (size, size); identity when already there.
def resize_area(x, size):
    if x.shape[-1] == size and x.shape[-2] == size:
        return x
    if x.shape[-1] < size:
        return F.interpolate(x, size=(size, size), mode='bilinear', align_corners=False)
    return F.interpolate(x, size=(size, size), mode='area')

# Map uniform numbers in [0, 1) to codes in [0, K): the per-seed sampling rule.
def uniform_to_codes(u, K):
    return (u.double() * K).long().clamp_(0, K - 1)

# Index of the j-th True (0-based) in each row of a boolean (B, K) mask; j (B,) < row count.
def _nth_true(mask, j):
    rank = mask.long().cumsum(1) - 1
    return (mask & (rank == j[:, None])).long().argmax(1)

# The default chooser: argmin with exact ties (cloned nodes after a split, constant rows) broken by
# u, so a constant row gives floor(u * K) like an unguided sample; without u the first minimum.
def argmin(dist, info=None, u=None):
    dmin = dist.amin(1, keepdim=True)
    tied = dist == dmin
    if u is None:
        return tied.long().argmax(1)
    n = tied.sum(1).clamp(min=1)                                          # 0 only on NaN rows.
    j = (u.to(dist.device).double() * n).long().clamp_(max=n - 1)
    return _nth_true(tied, j)

# Bilinear upsampling of the previous choice to this layer's size (learning residual).
def upsample(x, size):
    if x.shape[-1] == size and x.shape[-2] == size:
        return x
    return F.interpolate(x, size=(size, size), mode='bilinear', align_corners=False)

# ----------------------------------------------------------------------------
# bmm(w, f.float()) with f in a lower precision (the block output under autocast), where the caller
# has the fp32 copy f32 already (the DDL's selection made it): the chosen head is computed in fp32 as
# always, backward reads that copy (no second cast of f) and returns f's gradient in f's dtype. The
# values, and both gradients, are those of bmm(w, f.float()) bit for bit. An fp32 f takes the plain bmm.

class _FloatBmm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w, f, f32):
        ctx.save_for_backward(w, f32)
        ctx.f_dtype = f.dtype
        return torch.bmm(w, f32)

    @staticmethod
    def backward(ctx, grad):
        w, f32 = ctx.saved_tensors
        grad_w = torch.bmm(grad, f32.transpose(1, 2)) if ctx.needs_input_grad[0] else None
        grad_f = torch.bmm(w.transpose(1, 2), grad).to(ctx.f_dtype) if ctx.needs_input_grad[1] else None
        return grad_w, grad_f, None

# The chosen nodes' rows of the head weight (K*C, Cin), C rows per node: (B, C*Cin). An embedding
# lookup, whose backward is one operator (indexing's is two: a zero tensor and an index_put).
def _rows(weight, codes, C):
    return F.embedding(codes, weight.view(-1, C * weight.shape[1]))

# `f32`: f.float() when the caller has it already (the DDL's selection made it), to cast once.
def _float_bmm(w, f, f32=None):
    if f32 is None:
        f32 = f.float()
    if f.dtype == torch.float32 or not torch.is_grad_enabled():
        return torch.bmm(w, f32)
    return _FloatBmm.apply(w, f, f32)

# ----------------------------------------------------------------------------
# The reference output path, for tests and benchmarks: inside `with reference_heads(module):` every
# DDL in `module` evaluates all K heads and gathers the chosen one, instead of computing the chosen
# head alone. Both paths give the same image up to rounding; production code never enters it.

@contextlib.contextmanager
def reference_heads(module):
    layers = [m for m in module.modules() if isinstance(m, DiscreteDistributionLayer)]
    saved = [m.reference for m in layers]
    for m in layers:
        m.reference = True
    try:
        yield module
    finally:
        for m, was in zip(layers, saved, strict=True):
            m.reference = was

# ----------------------------------------------------------------------------
# Discrete Distribution Layer: K candidates, a selector, and the running statistics that
# Split-and-Prune needs (inherited from SplittableNodes; node k = rows [k*C, (k+1)*C) of `weight`).

class DiscreteDistributionLayer(SplittableNodes):
    def __init__(self,
        in_channels,                # Feature channels Cf of the block output.
        out_channels,               # Image channels C (1 = grayscale, 3 = RGB).
        K,                          # Number of candidates (nodes).
        learn_residual  = True,     # Candidates are corrections added to the upsampled previous choice.
        leak            = True,     # Candidates read the first half of the features; the chosen head
                                    # applied to the second half gives a leak map for the next block.
        chain_dropout   = 0.05,     # Probability, per layer and step, that the batch takes random codes.
        loss_type       = 'l2',     # 'l2' (MSE) or 'l1'; also the selection distance.
        index           = 0,        # Position l of this layer in its network (for scorers).
        num_layers      = 0,        # Latent length L of the network (for scorers).
    ):
        super().__init__(K)
        if loss_type not in ('l2', 'l1'):
            raise ValueError(f'loss_type must be "l2" or "l1", got {loss_type!r}')
        if leak and in_channels % 2:
            raise ValueError(f'leak=True needs an even number of feature channels, got {in_channels}')
        self.in_channels, self.out_channels = in_channels, out_channels
        self.learn_residual, self.leak, self.chain_dropout, self.loss_type = learn_residual, leak, chain_dropout, loss_type
        self.index, self.num_layers = index, num_layers
        self.head_channels = in_channels // 2 if leak else in_channels
        self.reference = False      # All-K output path (see `reference_heads`); not saved.
        # The 1x1 conv as a (K*C, Cin) matrix; same init as nn.Conv2d's default.
        self.weight = nn.Parameter(torch.empty(K * out_channels, self.head_channels))
        bound = 1 / math.sqrt(self.head_channels)
        nn.init.uniform_(self.weight, -bound, bound)

    def node_params(self):
        return [(self.weight, self.out_channels)]

    def info(self, size):
        return LayerInfo(self.index, self.num_layers, self.K, size)

    def extra_repr(self):
        return (f'in={self.in_channels}, C={self.out_channels}, K={self.K}, learn_residual={self.learn_residual}, '
                f'leak={self.leak}, chain_dropout={self.chain_dropout}, loss={self.loss_type}')

    # The chosen head only: (B, Cin, H, W) x codes (B,) -> (B, C, H, W), fp32 whatever feat's dtype
    # (`feat32`: feat.float(), if the caller has it).
    def chosen_head(self, feat, codes, feat32=None):
        B, Cin, H, W = feat.shape
        w = _rows(self.weight, codes, self.out_channels).view(B, self.out_channels, Cin)
        f32 = None if feat32 is None else feat32.flatten(2)
        return _float_bmm(w, feat.flatten(2), f32).view(B, self.out_channels, H, W)

    # With leak: the chosen head applied to both halves of the features in one bmm, so autograd
    # sees no slicing of the feature tensor: (B, 2*Cin, H, W) -> image, leak (B, C, H, W), fp32.
    def chosen_head_and_leak(self, feat, codes, feat32=None):
        B, Cf, H, W = feat.shape
        C, Cin = self.out_channels, self.head_channels
        w = _rows(self.weight, codes, C).view(B, C, Cin)                     # (B, C, Cin)
        w2 = w[:, None].expand(B, 2, C, Cin).reshape(2 * B, C, Cin)
        f32 = None if feat32 is None else feat32.reshape(2 * B, Cin, H * W)
        both = _float_bmm(w2, feat.reshape(2 * B, Cin, H * W), f32).view(B, 2, C, H, W)
        return both.unbind(1)           # unbind: one operator in backward (two select's would make two zero tensors).

    # All K heads: (B, Cin, H, W) -> (B, K, C, H, W), without the residual.
    def all_heads(self, feat):
        B, Cin, H, W = feat.shape
        return torch.matmul(self.weight, feat.flatten(2)).view(B, self.K, self.out_channels, H, W)

    # Selection distances (B, K) of the candidates (heads + residual) to `target`, fp32, no autograd.
    @torch.no_grad()
    def distances(self, feat, residual, target):
        B, Cin, H, W = feat.shape
        C, K, P = self.out_channels, self.K, H * W
        e = (residual - target).flatten(2)                                   # (B, C, P)
        if self.loss_type == 'l1':
            return (self.all_heads(feat) + e.view(B, 1, C, H, W)).abs().mean((2, 3, 4))
        f = feat.flatten(2)                                                  # (B, Cin, P)
        # |h_k + e|^2 with h_k = W_k f: either materialise the heads (cost K*C*Cin*P per sample)
        # or expand |h_k|^2 + 2 h_k.e + |e|^2 through the Gram matrix f f^T and each node's
        # W_k^T W_k (cost Cin^2 * (P + K)), whichever is cheaper. Both are exact up to rounding.
        if Cin * (P + K) < K * C * P:
            W3 = self.weight.view(K, C, Cin)
            gram = torch.bmm(f, f.transpose(1, 2)).reshape(B, Cin * Cin)     # (B, Cin^2)
            wtw = torch.einsum('kci,kcj->kij', W3, W3).reshape(K, Cin * Cin)  # (K, Cin^2)
            fe = torch.bmm(e, f.transpose(1, 2)).reshape(B, C * Cin)         # (B, C*Cin)
            # |e|^2 (one product), + 2 h_k.e, then + |h_k|^2: two matrix products that add into their
            # input, the mean over C*P folded into their scale factors.
            e_sq = torch.bmm(e.view(B, 1, C * P), e.view(B, C * P, 1)).view(B, 1)
            scale = 1 / (C * P)
            dist = torch.addmm(e_sq, fe, self.weight.view(K, C * Cin).t(), beta=scale, alpha=2 * scale)
            dist = torch.addmm(dist, gram, wtw.t(), alpha=scale)
        else:
            heads = torch.bmm(self.weight.expand(B, -1, -1), f)              # (B, K*C, P)
            heads.view(B, K, C, P).add_(e[:, None])
            h = heads.view(B, K, C * P)
            dist = torch.einsum('bkn,bkn->bk', h, h) / (C * P)
        return dist.clamp_(min=0)

    # Run the layer. The mode follows from the arguments:
    #   codes  -> decode those codes;
    #   target -> nearest candidate (training: with statistics, chain dropout and the
    #             balancing bias of --balance=bias, see `NodeStatistics.select`);
    #   scorer -> argmin (or `chooser`) of the scorer's distances;
    #   none   -> uniformly random codes: floor(uniform * K) when `uniform` is given (per-seed
    #             sampling), else from the global RNG.
    # The output image comes from the chosen head alone (all K heads under `reference_heads`).
    def forward(self,
        feat:       torch.Tensor,                   # (B, Cf, H, W) block output.
        prev:       Optional[torch.Tensor] = None,  # (B, C, h, w) previous chosen image, or None.
        target:     Optional[torch.Tensor] = None,  # (B, C, *, *) training / reconstruction target.
        codes:      Optional[torch.Tensor] = None,  # (B,) codes to decode.
        scorer:     Optional[Scorer] = None,        # Guidance distances for the candidates.
        chooser:    Optional[Chooser] = None,       # Turns scorer distances into codes.
        uniform:    Optional[torch.Tensor] = None,  # (B,) per-sample uniform numbers in [0, 1).
        chain:      Optional[tuple] = None,         # Training: this step's chain-dropout draw for the layer,
                                                    # (drop, codes): a 0-d bool and (B,) random codes
                                                    # (drawn for all layers at once by the network);
                                                    # None: drawn here with probability chain_dropout.
    ) -> DDLOutput:
        B, Cf, H, W = feat.shape
        if H != W:
            raise ValueError(f'DDL expects square feature maps, got {H}x{W}')
        device_type = feat.device.type
        with torch.autocast(device_type, enabled=False):
            # Features in a lower precision (bf16 / fp16 under autocast) are cast to fp32 once, for
            # the selection and the chosen head, whose backward keeps that copy; nothing keeps feat.
            feat_head = feat[:, :self.head_channels]
            if self.learn_residual and prev is not None:
                residual = upsample(prev.float(), H)
            else:
                residual = torch.zeros(B, self.out_channels, H, W, device=feat.device)
            if target is not None:
                target = resize_area(target.float(), H)

            # Select.
            dist, feat32 = None, None
            if codes is not None:
                codes = codes.to(device=feat.device, dtype=torch.long)
            elif target is not None:
                # One fp32 copy of the features serves the selection and the chosen head.
                feat32 = feat.detach().float() if feat.dtype != torch.float32 and not self.reference else None
                with torch.no_grad():
                    dist = self.distances(feat_head.float() if feat32 is None else feat32[:, :self.head_channels], residual, target)
                if self.training:
                    # The node set selects (nearest after its balancing bias, zero unless
                    # --balance=bias) and records the choice in its statistics. Reconstruction
                    # (eval) stays the plain nearest node.
                    codes = self.node_stats.select(dist)
                    if chain is not None:
                        codes = torch.where(chain[0], chain[1], codes)
                    elif self.chain_dropout > 0:
                        # One draw per layer per step, kept on the device.
                        drop = torch.rand([], device=feat.device) < self.chain_dropout
                        codes = torch.where(drop, torch.randint(0, self.K, [B], device=feat.device), codes)
                else:
                    codes = dist.argmin(dim=1)
            elif scorer is not None:
                with torch.no_grad():
                    cand = self.all_heads(feat_head.float()) + residual[:, None]
                    info = self.info(H)
                    dist = scorer(cand, info).float()
                    if dist.shape != (B, self.K):
                        raise ValueError(f'Scorer returned shape {tuple(dist.shape)}, expected {(B, self.K)}')
                    codes = (chooser or argmin)(dist, info, uniform)
            elif uniform is not None:
                codes = uniform_to_codes(uniform.to(feat.device), self.K)
            else:
                codes = torch.randint(0, self.K, [B], device=feat.device)

            # Output the chosen candidate through the chosen head only.
            leak = None
            if self.reference:
                image = self.all_heads(feat_head.float())[torch.arange(B, device=feat.device), codes]
                if self.leak:
                    leak = self.chosen_head(feat[:, self.head_channels:], codes)
            elif self.leak:
                image, leak = self.chosen_head_and_leak(feat, codes, feat32)
            else:
                image = self.chosen_head(feat_head, codes, feat32)
            image = image + residual
            loss = None
            if target is not None:
                lossf = F.mse_loss if self.loss_type == 'l2' else F.l1_loss     # One operator each way.
                loss = lossf(image, target, reduction='none').mean((1, 2, 3))
        return DDLOutput(image, codes, loss, leak, dist)

# ----------------------------------------------------------------------------
