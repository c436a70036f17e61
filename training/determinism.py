"""Determinism of generation: `batch_invariant()`, the context in which an image does not depend on its batch.

Every generation entry point enters it (the network's `encode`/`decode`, sampling/generation.py, the demo,
zscg.py, tree.py, compress.py, the training loop's sample grid); training does not. It lives apart from the
model so that code that only generates need not import the model file for it (`training.networks.batch_invariant`
remains the same object, for code written before the move).
"""

import contextlib

import torch

# Generation context: convolutions whose result for one image does not depend on the rest of the
# batch. oneDNN (CPU) and cuDNN's autotuner pick kernels by batch size, which changes the last bits
# of the output, so per-seed generation is bit-identical whatever the batch only inside
# `with batch_invariant():`. Every generation entry point enters it explicitly: the network's
# `encode`/`decode`, generate.py, the demo, zscg.py, tree.py, compress.py and the training loop's sample grid.
# A plain `net(...)` outside it uses the fastest kernels (training always does). On CPU the native
# kernels it selects are also faster for this network.

# TF32 is off here as in training (training_loop turns cuDNN and matmul TF32 off): the selection
# of a candidate is an argmin over distances that can differ in the last bits, so evaluation
# (reconstruction, encoding, guided choice) must see the same fp32 precision as training did.
# `cudnn.flags()` would otherwise switch cuDNN TF32 *on* (its default argument) inside the block.

@contextlib.contextmanager
def batch_invariant():
    with torch.backends.mkldnn.flags(enabled=False, allow_tf32=None), \
         torch.backends.cudnn.flags(enabled=True, benchmark=False, deterministic=True, allow_tf32=False):
        yield
