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
from training.split_prune import balance

# Precisions: autocast dtype of each (None = plain fp32).
PRECISIONS = {'fp32': None, 'bf16': torch.bfloat16, 'fp16': torch.float16}

# torch.optim.Adam's implementations, as keyword arguments ('auto' = torch's choice: for-loop on
# the CPU, foreach on CUDA; both give identical results, 'fused' differs in the last bits).
ADAM_IMPLEMENTATIONS = {'auto': {}, 'for-loop': dict(foreach=False), 'foreach': dict(foreach=True), 'fused': dict(fused=True)}

# ----------------------------------------------------------------------------
# The training forward (network + loss) as one module, so that DistributedDataParallel sees every
# parameter it reduces and torch.compile can trace the whole of it. `loss_fn` gets the network
# itself, not a wrapper: it may read the network's attributes (e.g. its condition).

class _TrainingForward(torch.nn.Module):
    def __init__(self, net, loss_fn):
        super().__init__()
        self.net = net
        self.loss_fn = loss_fn

    def forward(self, images, labels):
        return self.loss_fn(net=self.net, images=images, labels=labels)

# ----------------------------------------------------------------------------
# One optimisation step of a DDN: gradient accumulation, all-reduce, Adam, node balancing, EMA.
# Shared by the training loop and bench/train_step.py, so the benchmark measures the real step.

class TrainingStep:
    def __init__(self,
        net,                            # DDNGenerator in training mode, on `device`.
        ema,                            # EMA copy of `net`, or `net` itself (no EMA).
        loss_fn,                        # Callable(net=, images=, labels=) -> (B,) loss, e.g. DDNLoss.
        optimizer,                      # Optimizer over net's parameters.
        batch_size,                     # Global batch of one step (all ranks, all rounds).
        precision       = 'fp32',       # 'fp32', 'bf16' or 'fp16' (fp16: autocast + GradScaler loss scaling).
        balance_kwargs  = {},           # method, bias_rate: options of split_prune.balance().
        compile         = False,        # torch.compile the training forward (network + loss); a string
                                        # names the backend (default inductor).
        channels_last   = False,        # Convolution weights and feature maps in channels-last layout.
        bucket_cap_mb   = 25,           # Size of DDP's gradient buckets (multi-process runs).
    ):
        if precision not in PRECISIONS:
            raise ValueError(f'precision must be one of {list(PRECISIONS)}, got {precision!r}')
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
        self.forward = _TrainingForward(net, loss_fn)
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
        if compile:
            self.forward = torch.compile(self.forward, backend=compile if isinstance(compile, str) else 'inductor')
        self._synced = True     # Whether the last accumulate() reduced the gradients.

    # Forward and backward of one round; gradients add up in .grad. Returns the (B,) loss.
    # Several processes: pass sync=False for every round of a step but the last, so that gradients
    # are reduced once per step (DDP's no_sync); a single process ignores it.
    def accumulate(self, images, labels=None, sync=True):
        dtype = PRECISIONS[self.precision]
        no_sync = self.ddp.no_sync() if self.ddp is not None and not sync else contextlib.nullcontext()
        with no_sync:
            with torch.autocast(self.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                loss = self.forward(images, labels)
            # Scaled by the GLOBAL batch: the sum over ranks then is the gradient of the mean.
            self.scaler.scale(loss.sum() / self.batch_size).backward()
        self._synced = sync
        return loss

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
            for g in grads:
                torch.nan_to_num(g, nan=0, posinf=1e5, neginf=-1e5, out=g)
        for group in self.optimizer.param_groups:
            group['lr'] = lr
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        mirrors = [] if self.ema is self.net else [self.ema]
        splits = balance(self.net, self.optimizer, mirrors=mirrors, **self.balance_kwargs)
        if self.ema is not self.net:
            torch._foreach_lerp_(self.ema_params, self.net_params, 1 - ema_beta)
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
