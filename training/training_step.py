"""One optimisation step of a DDN, and the schedules that drive it.

`TrainingStep` is the step the training loop runs (and bench/train_step.py measures): gradient
accumulation over rounds under `torch.autocast` for bf16/fp16; gradients summed across ranks by
torch's DistributedDataParallel, bucket by bucket while the backward pass still runs, and only after
the last round (`no_sync` before; no buffer sync in forward, since the DDL statistics are buffers that
Split-and-Prune reduces itself); the Adam step; node balancing (`balance(net, optimizer,
mirrors=[ema])`: Split-and-Prune, paper §3.3); the EMA update. `learning_rate` and `ema_beta` are
EDM's schedules of the training progress. Nothing here waits for the device.
"""

import contextlib
import inspect

import torch

from torch_utils import distributed
from training.low_precision import StepWeights
from training.split_prune import balance, find_node_sets

# Precisions: autocast dtype of each (None = plain fp32).
PRECISIONS = {'fp32': None, 'bf16': torch.bfloat16, 'fp16': torch.float16}

# The autocast dtype of `precision` (None = plain fp32); ValueError naming the choices otherwise. The one
# check of a precision, for TrainingStep and for the training loop, which checks before its setup.
def autocast_dtype(precision):
    if precision not in PRECISIONS:
        raise ValueError(f'precision must be one of {list(PRECISIONS)}, got {precision!r}')
    return PRECISIONS[precision]

# torch.optim.Adam's implementations, as keyword arguments ('auto' = torch's choice: for-loop on
# the CPU, foreach on CUDA; both give identical results, 'fused' differs in the last bits).
ADAM_IMPLEMENTATIONS = {'auto': {}, 'for-loop': dict(foreach=False), 'foreach': dict(foreach=True), 'fused': dict(fused=True)}

# ----------------------------------------------------------------------------
# The training forward (network + loss) as one module, so that DistributedDataParallel sees every
# parameter it reduces. `loss_fn` gets the network itself, not a wrapper: it may read the network's
# attributes (e.g. its condition).
#
# `compile` compiles regions, not the whole forward (whose 63-layer graph took minutes to compile):
# every residual Block is compiled with dynamic=False, so blocks of the same shape share one graph
# (the reference net has 11 shapes, hence 11 graphs) and inductor fuses GroupNorm + SiLU, the
# residual add and its sqrt(1/2) scale; the DDLs stay eager. The recompile limit is raised to
# REGION_RECOMPILE_LIMIT (torch's default 8 would silently leave later shapes uncompiled). The
# compiled call is installed on each block only while this forward runs (as nn.Module.compile()
# does, but transiently), so the network pickles and generates exactly as an eager one.

REGION_RECOMPILE_LIMIT = 64

def _raise_recompile_limit(limit=REGION_RECOMPILE_LIMIT):
    import torch._dynamo
    for name in ('recompile_limit', 'cache_size_limit'):       # torch >= 2.6 / older name.
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, max(getattr(torch._dynamo.config, name), limit))
            return

# The modules compiled as regions: every residual block of the generators.
def compile_regions(net):
    from training.networks import Block
    return [m for m in net.modules() if isinstance(m, Block)]

class _TrainingForward(torch.nn.Module):
    def __init__(self, net, loss_fn, compile=False):
        super().__init__()
        self.net = net
        self.loss_fn = loss_fn
        self._regions = []          # (module, compiled call) while not installed.
        if compile:
            _raise_recompile_limit()
            backend = compile if isinstance(compile, str) else 'inductor'
            self._regions = [(m, torch.compile(m._call_impl, backend=backend, dynamic=False)) for m in compile_regions(net)]

    def forward(self, images, labels):
        for module, call in self._regions:
            module._compiled_call_impl = call
        try:
            return self.loss_fn(net=self.net, images=images, labels=labels)
        finally:
            for module, _ in self._regions:
                module._compiled_call_impl = None

# ----------------------------------------------------------------------------
# One optimisation step of a DDN: gradient accumulation, all-reduce, Adam, node balancing, EMA.
# Shared by the training loop and bench/train_step.py, so the benchmark measures the real step.

# torch.nan_to_num(g, out=g) for every tensor of `tensors`, in three operators per device and dtype
# instead of one per tensor (577 for the reference net): the tensors are concatenated, cleaned and
# copied back (torch has no foreach form of nan_to_num). The same values bit for bit.
def nan_to_num_(tensors, nan=0.0, posinf=None, neginf=None):
    groups = {}
    for t in tensors:
        groups.setdefault((t.device, t.dtype), []).append(t)
    for group in groups.values():
        flat = torch.cat([t.reshape(-1) for t in group])
        torch.nan_to_num(flat, nan=nan, posinf=posinf, neginf=neginf, out=flat)
        torch._foreach_copy_(group, [part.view_as(t) for part, t in zip(flat.split([t.numel() for t in group]), group, strict=True)])

class TrainingStep:
    def __init__(self,
        net,                            # DDNGenerator in training mode, on `device`.
        ema,                            # EMA copy of `net`, or `net` itself (no EMA).
        loss_fn,                        # Callable(net=, images=, labels=) -> (B,) loss, e.g. DDNLoss.
        optimizer,                      # Optimizer over net's parameters.
        batch_size,                     # Global batch of one step (all ranks, all rounds).
        precision       = 'fp32',       # 'fp32', 'bf16' or 'fp16' (fp16: autocast + GradScaler loss scaling).
        balance_kwargs  = {},           # method, bias_rate: options of split_prune.balance().
        compile         = False,        # torch.compile the residual blocks (regions, see _TrainingForward);
                                        # a string names the backend (default inductor).
        channels_last   = False,        # Convolution weights and feature maps in channels-last layout
                                        # (with compile only, see below).
        bucket_cap_mb   = 25,           # Size of DDP's gradient buckets (multi-process runs).
    ):
        self.dtype = autocast_dtype(precision)
        if channels_last and not compile:
            # Eager GroupNorm on CUDA makes every NHWC input NCHW-contiguous (a copy each way, 369
            # per step for the reference net), which made channels-last training slower than NCHW.
            raise ValueError('channels_last=True needs compile=True: eager GroupNorm copies channels-last '
                             'feature maps to NCHW and back, which is slower than NCHW; the compiled blocks '
                             'normalise them in place')
        self.device = next(net.parameters()).device
        self.net, self.ema, self.loss_fn, self.optimizer = net, ema, loss_fn, optimizer
        self.batch_size = batch_size
        self.precision = precision
        self.balance_kwargs = dict(balance_kwargs)
        if channels_last:       # In place: the optimizer keeps the same parameter objects.
            for module in {id(net): net, id(ema): ema}.values():
                module.to(memory_format=torch.channels_last)
        self.params = [p for p in net.parameters() if p.requires_grad]
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=(precision == 'fp16'))
        if ema is not net:
            self.ema_params = list(ema.parameters())
            self.net_params = list(net.parameters())
        # Several processes: DDP reduces gradients bucket by bucket during the backward pass.
        self.forward = _TrainingForward(net, loss_fn, compile=compile)
        self.ddp = None
        if distributed.get_world_size() > 1:
            DDP = torch.nn.parallel.DistributedDataParallel
            # No buffer sync in forward (torch >= 2.13 names it forward_sync_buffers; buffers are
            # then still broadcast once at construction, when they are equal on all ranks anyway).
            no_buffer_sync = dict(forward_sync_buffers=False) if 'forward_sync_buffers' in inspect.signature(DDP).parameters \
                else dict(broadcast_buffers=False)
            self.ddp = DDP(self.forward, device_ids=[self.device.index] if self.device.type == 'cuda' else None,
                           bucket_cap_mb=bucket_cap_mb, gradient_as_bucket_view=True, **no_buffer_sync)
            self.ddp.register_comm_hook(None, distributed.allreduce_sum_hook)   # Sum: the loss is scaled by the global batch.
            self.forward = self.ddp
        self._synced = True     # Whether the last accumulate() reduced the gradients.
        # Eager low-precision training in one process: the weights autocast would cast at every use
        # are cast once per step (training/low_precision.py; the same numbers, ~1,100 fewer operators
        # per step for the reference net). Compiled regions fuse the casts themselves; under DDP the
        # gradients must reach the parameters DDP registered, so both keep autocast's casts.
        # The selection bias multiplies the distances under balance 'bias' only; the other methods
        # select the plain nearest node (DDN.md §3), which the product with a zero bias equals exactly.
        method = self.balance_kwargs.get('method', 'tv')
        for m in find_node_sets(net):
            m.node_stats.bias_active = method == 'bias'
        self.weights = None
        if self.dtype is not None and not compile and self.ddp is None:
            from training.networks import low_precision_params
            self.weights = StepWeights(low_precision_params(net), self.dtype)
        self._weights_fresh = False     # Whether the copies hold the current weights.

    # Forward and backward of one round; gradients add up in .grad. Returns the (B,) loss.
    # Several processes: pass sync=False for every round of a step but the last, so that gradients
    # are reduced once per step (DDP's no_sync); a single process ignores it.
    def accumulate(self, images, labels=None, sync=True):
        no_sync = self.ddp.no_sync() if self.ddp is not None and not sync else contextlib.nullcontext()
        with no_sync:
            loss = self.round_forward(images, labels)
            self.round_backward(loss)
        self._synced = sync
        return loss

    # The forward half of a round (network + loss under autocast), (B,) loss.
    def round_forward(self, images, labels=None):
        dtype = self.dtype
        if self.weights is not None and not self._weights_fresh:
            self.weights.refresh()          # First round of a step (or the weights changed outside update()).
            self._weights_fresh = True
        weights = self.weights if self.weights is not None else contextlib.nullcontext()
        with torch.autocast(self.device.type, dtype=dtype or torch.float32, enabled=dtype is not None), weights:
            return self.forward(images, labels)

    # The backward half: gradients of the loss, scaled by the GLOBAL batch (the sum over ranks then is
    # the gradient of the mean), added into .grad.
    def round_backward(self, loss):
        self.scaler.scale(loss.sum() / self.batch_size).backward()
        if self.weights is not None:
            self.weights.accumulate_grads()

    # Update weights, balance the nodes (Split-and-Prune by default), update the EMA; start the next
    # step's accumulation from zero. Returns the number of splits as a device tensor (no host sync).
    @torch.no_grad()
    def update(self, lr, ema_beta):
        if self.ddp is not None and not self._synced:
            raise RuntimeError('TrainingStep.update(): the last accumulate() of the step must have sync=True')
        grads = []
        for p in self.params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            grads.append(p.grad)
        if not self.scaler.is_enabled():    # fp16 leaves inf/nan to the GradScaler, which skips the step.
            nan_to_num_(grads, nan=0, posinf=1e5, neginf=-1e5)
        for group in self.optimizer.param_groups:
            group['lr'] = lr
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        mirrors = [] if self.ema is self.net else [self.ema]
        splits = balance(self.net, self.optimizer, mirrors=mirrors, **self.balance_kwargs)
        if self.ema is not self.net:
            torch._foreach_lerp_(self.ema_params, self.net_params, 1 - ema_beta)
        self._weights_fresh = False
        return splits

# ----------------------------------------------------------------------------
# Learning rate and EMA decay as functions of the training progress (EDM's schedules).

def learning_rate(base_lr, cur_nimg, lr_rampup_kimg):
    if lr_rampup_kimg <= 0:
        return base_lr
    return base_lr * min(cur_nimg / (lr_rampup_kimg * 1000), 1)

def ema_beta(cur_nimg, batch_size, ema_halflife_kimg, ema_rampup_ratio):
    halflife_nimg = ema_halflife_kimg * 1000
    if ema_rampup_ratio is not None:
        halflife_nimg = min(halflife_nimg, cur_nimg * ema_rampup_ratio)
    return 0.5 ** (batch_size / max(halflife_nimg, 1e-8))
