"""Low-precision copies of the weights, made once per training step instead of once per use.

Under bf16 / fp16 autocast every convolution casts its fp32 weight and bias to the low dtype, and
our GroupNorm casts its affine parameters: one cast per parameter in forward, and its backward (the
gradient cast back to fp32) in backward. For the reference CIFAR-10 net that is 510 + 635 operators
per step, a sixth of all the step's launches, each a kernel on a GPU (bench/step_cost.py counts them).

`StepWeights` casts all of them with ONE foreach operator per step into persistent low-precision
leaf tensors, and after each backward adds their gradients into the fp32 gradients with one more
(`accumulate_grads`). While it is active (`with weights:`), `param_as(p, dtype)` returns p's copy;
the network's convolutions and GroupNorms read their parameters through it. The results are those
of autocast's own casts bit for bit: the same rounding of each weight, the same low-precision
gradient, widened exactly and added in fp32 as autograd's AccumulateGrad would.

Outside a `with`, or for a dtype other than the copies', `param_as` is `p.to(dtype)`: generation,
fp32 training and compiled training (inductor fuses the casts itself) are unchanged.
"""

from typing import Optional

import torch

# id(parameter) -> its low-precision copy, while a StepWeights is active (one at a time).
_active: dict = {}

# Parameter `p` in `dtype`: its step copy when one is active, else autocast's cast (p.to(dtype)).
def param_as(p: Optional[torch.Tensor], dtype: torch.dtype) -> Optional[torch.Tensor]:
    if p is None:
        return None
    if torch.compiler.is_compiling():       # Compiled regions cast (and fuse) themselves; no guard on ids.
        return p.to(dtype)
    copy = _active.get(id(p))
    if copy is not None and copy.dtype == dtype:
        return copy
    return p.to(dtype)

# The dtype the network computes its convolutions in: autocast's dtype when autocast is on, else None.
def autocast_dtype_of(x: torch.Tensor) -> Optional[torch.dtype]:
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None

class StepWeights:
    """Low-precision copies of `params`, refreshed once per step; their gradients flow into the params'.

    Usage per step: `refresh()` after the weights change (TrainingStep does it before the first round
    of a step); for each round `with weights: forward`, backward, then `accumulate_grads(first)`."""

    def __init__(self, params, dtype):
        self.params = [p for p in params if p.requires_grad]
        self.dtype = dtype
        self.copies = [torch.empty_like(p, dtype=dtype).requires_grad_(True) for p in self.params]
        self.grads = [None] * len(self.params)      # Persistent fp32 gradient buffers, made on first use.

    # Copy the current fp32 weights into the low-precision copies: one operator.
    @torch.no_grad()
    def refresh(self):
        if self.params:
            torch._foreach_copy_(self.copies, self.params)

    def __enter__(self):
        if _active:
            raise RuntimeError('StepWeights: another set of step weights is already active')
        _active.update({id(p): c for p, c in zip(self.params, self.copies, strict=True)})
        return self

    def __exit__(self, *exc):
        _active.clear()

    # After a round's backward: add the copies' gradients into the parameters' .grad (fp32) and clear
    # them. A parameter whose copy got no gradient (its module ran in fp32, or not at all) keeps
    # whatever autograd gave it directly. Two foreach operators at most.
    @torch.no_grad()
    def accumulate_grads(self):
        fresh, fresh_src, add, add_src = [], [], [], []
        for i, (p, c) in enumerate(zip(self.params, self.copies, strict=True)):
            if c.grad is None:
                continue
            if p.grad is None:
                if self.grads[i] is None:
                    self.grads[i] = torch.empty_like(p)
                p.grad = self.grads[i]
                fresh.append(p.grad)
                fresh_src.append(c.grad)
            else:
                add.append(p.grad)
                add_src.append(c.grad)
        if fresh:
            torch._foreach_copy_(fresh, fresh_src)
        if add:
            torch._foreach_add_(add, add_src)
        for c in self.copies:
            c.grad = None
