"""The training loss of a Discrete Distribution Network (paper §3.2, our spec `DDN.md` §1).

Every DDL chooses the candidate nearest to the training image (resized to the layer) and is scored by
the distance of that choice (L2 by default, L1 with the network's `loss_type='l1'`). The loss of the
model is the mean over its L layers. The argmin is the only discrete step: the gradient flows through
every chosen candidate, back through the whole coarse-to-fine chain.

Like EDM's loss objects, `DDNLoss` is built from constructor arguments only (`loss_kwargs` in
`training_options.json`) and called as `loss_fn(net=net, images=images, labels=labels)`; it returns a
per-sample loss that the training loop sums and scales. The reference code multiplies its loss by
C*H*W (EDM's `.sum()` convention). Adam is invariant to that constant except through its `eps`: our
eps 1e-8 on the mean acts like eps 1e-8*C*H*W on the reference's sum (~3e-5 for CIFAR-10), i.e.
the reference's run equals ours with eps = 1e-8 / (C*H*W). We keep the mean, so the numbers in the
log are readable MSEs: measured on the built-in 16x16 digits (C*H*W = 256, 300 Adam steps, batch
32, lr 3e-3, two seeds), mean vs sum gave training losses 0.0199 / 0.0206 and 0.0219 / 0.0216 and
held-out reconstruction 0.0194 / 0.0198 and 0.0213 / 0.0231: no difference beyond seed noise.
"""

import torch

from torch_utils import training_stats

# ----------------------------------------------------------------------------
# Mean over layers of the per-layer loss of the chosen candidates; reports per-layer losses.

class DDNLoss:
    def __init__(self,
        report_layers   = True,     # Report the loss of the first, middle and last layers to training_stats.
    ):
        self.report_layers = report_layers

    def __call__(self,
        net,                                        # DDNGenerator in training mode.
        images:     torch.Tensor,                   # (B, C, H, W) training images in [-1, 1].
        labels:     torch.Tensor = None,            # (B, label_dim) one-hot labels (class-conditional nets).
    ) -> torch.Tensor:                              # (B,) per-sample loss, fp32.
        # Conditional nets see the condition made from the batch (random colour weights in training).
        condition = net.make_condition(images, labels) if getattr(net, 'condition', None) else None
        losses = net(target=images, condition=condition).losses                  # (B, L)
        loss = losses.mean(dim=1)
        training_stats.report('Loss/loss', loss)
        if self.report_layers:
            L = losses.shape[1]
            training_stats.report('Loss/layer_first', losses[:, 0])
            training_stats.report('Loss/layer_mid', losses[:, L // 2])
            training_stats.report('Loss/layer_last', losses[:, L - 1])
        return loss

# ----------------------------------------------------------------------------
