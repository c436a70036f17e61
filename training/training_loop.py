"""The main training loop of a Discrete Distribution Network, shaped like EDM's.

`training_loop(**c)` is what `train.py` calls with the options of `training_options.json`. One step:
1. per-step seeding from (seed, rank, step), so a resumed run repeats an uninterrupted one exactly;
2. gradient accumulation over `batch_size / (world_size * batch_gpu)` rounds of `batch_gpu` images,
   under `torch.autocast` for bf16/fp16;
3. gradients summed across ranks by torch's DistributedDataParallel, bucket by bucket while the
   backward pass still runs (communication overlaps compute), and only after the last round
   (`no_sync` before); no buffer sync in forward, since the DDL statistics are buffers that
   Split-and-Prune reduces itself;
4. Adam step, then node balancing (`balance(net, optimizer, mirrors=[ema])`: Split-and-Prune, paper §3.3);
5. EMA update (half-life in kimg; 0 = no EMA, the snapshot holds the network itself).
The hot loop never waits for the device: losses and counters stay on it and reach the host once per
tick through `training_stats`.

Once per tick: a progress line and a `stats.jsonl` line; per `snapshot_ticks`: the network pickle, a
sample grid and a node-usage plot; per `state_dump_ticks`: the training state for exact resume. Only
rank 0 writes, always through a temporary file and a rename (a killed job leaves no truncated file).

Optimizer: Adam, lr 1e-3, betas (0.9, 0.999), eps 1e-8 (torch's defaults, as in EDM and the
reference DDN code), lr ramped up linearly over `lr_rampup_kimg` (EDM's 10 Mimg by default).
"""

import contextlib
import copy
import functools
import inspect
import io
import json
import math
import os
import signal
import sys
import time

import PIL.Image
import PIL.ImageDraw
import psutil
import torch

import dnnlib
from torch_utils import checkpoint, distributed, misc, training_stats
from training import snapshot as snapshot_io
from training.images import make_grid, to_pil, to_uint8
from training.split_prune import balance, find_node_sets
from training.networks import batch_invariant

# File names inside a run folder, '*' standing for the kimg tag (see file_tag).
STATE_PATTERN = 'training-state-*.pt'
SNAPSHOT_PATTERN = 'network-snapshot-*.pkl'
SAFE_SNAPSHOT_PATTERN = 'network-snapshot-*.safetensors'

# Signals that stop a run cleanly: finish the step, write a training state, exit 0 (SLURM sends
# SIGUSR1 ahead of the end of a job with --signal=USR1@SECONDS; schedulers send SIGTERM).
STOP_SIGNALS = tuple(getattr(signal, name) for name in ('SIGTERM', 'SIGUSR1') if hasattr(signal, name))

# Precisions: autocast dtype of each (None = plain fp32).
PRECISIONS = {'fp32': None, 'bf16': torch.bfloat16, 'fp16': torch.float16}

# torch.optim.Adam's implementations, as keyword arguments ('auto' = torch's choice: for-loop on
# the CPU, foreach on CUDA; both give identical results, 'fused' differs in the last bits).
ADAM_IMPLEMENTATIONS = {'auto': {}, 'for-loop': dict(foreach=False), 'foreach': dict(foreach=True), 'fused': dict(fused=True)}

# Seeds of the images in every sample grid (a fixed 8x8 grid, so grids of a run are comparable).
SAMPLE_GRID_SEEDS = range(64)

# ----------------------------------------------------------------------------
# What a training state must agree on to be resumed: the network and the dataset.

def dataset_meta(dataset_obj):
    return dict(name=dataset_obj.name, image_shape=list(dataset_obj.image_shape),
                label_dim=int(dataset_obj.label_dim), num_images=len(dataset_obj))

# Canonical JSON of a config (tuples become lists, keys sorted), for comparison.
def _canonical(obj):
    return json.loads(json.dumps(obj, sort_keys=True))

# The arguments of a training_loop() call as plain JSON-able values (what training_options.json holds).
def _canonical_options(args):
    return json.loads(json.dumps(args, default=str))

# Load a training state and check that it belongs to this configuration. Raises ValueError with
# a message naming every difference (and FileNotFoundError / RuntimeError for unreadable files).
def load_training_state(path, network_kwargs, dataset_info):
    state = snapshot_io.load_state(path)    # torch.load(weights_only=True): a state runs no code.
    if not isinstance(state, dict) or 'net' not in state or 'config' not in state:
        raise ValueError(f'{path} is not a ddn training state (training-state-*.pt); '
                         'to start from a network snapshot (.pkl) use --transfer')
    saved = _canonical(state['config'])
    current = _canonical(dict(network_kwargs=network_kwargs, dataset=dataset_info))
    diffs = []
    for section in ('network_kwargs', 'dataset'):
        old, new = saved.get(section, {}), current[section]
        for key in sorted(set(old) | set(new)):
            if old.get(key) != new.get(key):
                diffs.append(f'  {section}.{key}: {old.get(key)!r} in the state, {new.get(key)!r} now')
    if diffs:
        raise ValueError(f'Training state {path} comes from another configuration:\n' + '\n'.join(diffs))
    return state

# The network of a snapshot (.safetensors or .pkl, or a run folder's newest) for --transfer, loaded
# without running code from the file unless `trust_pickle`. Raises OSError / ValueError.
def load_transfer_network(path, trust_pickle=False):
    return snapshot_io.load_network(path, 'cpu', trust_pickle=trust_pickle)[1]

# Name tag of the files written at `cur_nimg`: kimg as 6 digits (EDM's names), or kimg with three
# decimals when the run's previous files had the same kimg (`last_kimg`; ticks shorter than 1 kimg,
# a short last tick), so that no file replaces one of another point in training. The rule depends
# only on the schedule (a resumed run names its files as the uninterrupted one does).
def file_tag(cur_nimg, last_kimg):
    if cur_nimg // 1000 != last_kimg:
        return f'{cur_nimg // 1000:06d}'
    return f'{cur_nimg // 1000:06d}.{cur_nimg % 1000:03d}'

# SIGTERM / SIGUSR1 -> a flag read after every step; all ranks stop after the same step.
class _StopRequest:
    def __init__(self):
        self.signum = None
        self.group = distributed.new_host_group()   # A CPU collective: no device sync per step, even with NCCL.
        for sig in STOP_SIGNALS:
            try:
                signal.signal(sig, self._handle)
            except ValueError:                  # Not the main thread: no handlers, never stops early.
                pass

    def _handle(self, signum, _frame):
        self.signum = signum

    # True on every rank once any rank got a stop signal (the signal number in self.signum).
    def requested(self):
        flag = distributed.host_max(self.signum or 0, self.group)
        self.signum = flag or None
        return bool(flag)

# training_loop leaves the handlers of STOP_SIGNALS as it found them, also when it raises.
def _restores_stop_handlers(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        saved = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
        try:
            return fn(*args, **kwargs)
        finally:
            for sig, handler in saved.items():
                try:
                    signal.signal(sig, handler)
                except (ValueError, TypeError):     # Not the main thread, or a handler set from C.
                    pass
    return wrapper

# Copy the weights of a snapshot network into `net` (same architecture required) and forget
# its node statistics: they describe another run's data.
@torch.no_grad()
def transfer_weights(src, net):
    try:
        misc.copy_params_and_buffers(src, net, require_all=True)
    except (KeyError, ValueError) as err:
        raise ValueError(f'--transfer: the snapshot network does not match this network: {err}') from None
    for ns in find_node_sets(net):
        ns.node_stats.reset()

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

# ----------------------------------------------------------------------------
# Pictures of a snapshot: a grid of samples and the node usage of Split-and-Prune.

# Gap between the cells of a sample grid, in pixels, and its grey level.
GRID_GAP, GRID_GAP_VALUE = 2, 128

# Samples of fixed seeds as a square grid, upscaled (nearest) so that cells are at least 64 px, with
# grey gaps between cells (digits touch their borders); pixels as generate.py saves them.
@torch.no_grad()
def sample_grid(net, seeds=SAMPLE_GRID_SEEDS, batch=64, cond_images=None, cond_labels=None):
    seeds = list(seeds)
    condition = None
    if getattr(net, 'condition', None):  # Conditional nets: the conditions of the first dataset images.
        condition = net.make_condition(cond_images[:len(seeds)], cond_labels[:len(seeds)])
    with batch_invariant():
        images = torch.cat([net(seeds=seeds[i : i + batch],
                                condition=None if condition is None else condition[i : i + batch]).images.float().cpu()
                            for i in range(0, len(seeds), batch)])
    return to_pil(make_grid(to_uint8(images).numpy(), min_cell=64, gap=GRID_GAP, fill=GRID_GAP_VALUE))

# Size of one panel of the node-usage plot.
USAGE_PANEL_SIZE = (640, 160)

# Layers shown in the node-usage plot: first, middle, last (without repeats).
def usage_layers(num_layers):
    return sorted({0, num_layers // 2, num_layers - 1})

# Bars of K * frequency (1 = the uniform share 1/K) of the nodes of a few layers, with the 1/K line.
@torch.no_grad()
def node_usage_plot(net):
    ddls = find_node_sets(net)
    layers = usage_layers(len(ddls))
    pw, ph = USAGE_PANEL_SIZE
    image = PIL.Image.new('RGB', (pw, ph * len(layers)), 'white')
    draw = PIL.ImageDraw.Draw(image)
    for row, l in enumerate(layers):
        stats = ddls[l].node_stats
        K = stats.K
        usage = (stats.frequency() * K).double().cpu().numpy()
        dead = int((stats.count == 0).sum()) if float(stats.count.sum()) > 0 else 0
        top = row * ph
        left, right, y0, y1 = 40, pw - 10, top + 22, top + ph - 12    # Plot area; y1 = value 0.
        ymax = max(2.0, math.ceil(float(usage.max())))
        draw.text((left, top + 4), f'layer {l}  K={K}  splits {int(stats.num_splits)}  dead {dead}  '
                  f'max {usage.max():.2f}/K  min {usage.min():.2f}/K', fill='black')
        draw.line([(left, y0), (left, y1), (right, y1)], fill='black')
        for v in range(int(ymax) + 1):
            y = y1 - (y1 - y0) * v / ymax
            draw.text((left - 14, y - 5), str(v), fill='black')
        bar_w = (right - left) / K
        for k, u in enumerate(usage):
            h = (y1 - y0) * min(u, ymax) / ymax
            x0 = left + k * bar_w
            draw.rectangle([x0 + 0.15 * bar_w, y1 - h, x0 + max(0.85 * bar_w, 1), y1], fill=(70, 110, 200))
        y_uniform = y1 - (y1 - y0) / ymax
        draw.line([(left, y_uniform), (right, y_uniform)], fill=(220, 40, 40))
    return image

def _png_bytes(image):
    buf = io.BytesIO()
    image.save(buf, format='PNG')
    return buf.getvalue()

# Summary of Split-and-Prune over all layers, as host numbers (one device-to-host copy).
@torch.no_grad()
def node_usage_summary(net):
    ddls = find_node_sets(net)
    rows = []
    for ns in ddls:
        st = ns.node_stats
        freq = st.frequency()
        tv = 0.5 * (freq - 1 / st.K).abs().sum()                      # Distance to uniform usage.
        dead = torch.where(st.count.sum() > 0, (st.count == 0).sum().double(), torch.zeros_like(tv))
        rows.append(torch.stack([st.num_splits.double(), dead.double(), tv.double()]))
    if not rows:
        return dict(splits=0, dead_nodes=0, usage_tv=0.0)
    total = torch.stack(rows).cpu().numpy()
    return dict(splits=int(total[:, 0].sum()), dead_nodes=int(total[:, 1].sum()), usage_tv=float(total[:, 2].mean()))

# ----------------------------------------------------------------------------
# Setup, in the order training_loop runs it: device, batch split, dataset, network, optimizer,
# transfer, data stream.

# This rank's device; cuDNN autotuning as asked, TF32 off.
def _set_up_device(device, cudnn_benchmark, precision):
    device = distributed.pick_device(device)
    torch.backends.cudnn.benchmark = cudnn_benchmark
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    if precision not in PRECISIONS:
        raise ValueError(f'precision must be one of {list(PRECISIONS)}, got {precision!r}')
    return device

# Batch split: every rank takes batch_size / world_size images per step, in rounds of batch_gpu.
# Returns (batch_gpu, number of rounds).
def _split_batch(batch_size, batch_gpu, world_size):
    if batch_size % world_size:
        raise ValueError(f'batch_size {batch_size} is not divisible by the number of processes {world_size}')
    batch_gpu_total = batch_size // world_size
    if batch_gpu is None or batch_gpu > batch_gpu_total:
        batch_gpu = batch_gpu_total
    if batch_gpu_total % batch_gpu:
        raise ValueError(f'batch_size {batch_size} is not divisible by world_size x batch_gpu = {world_size} x {batch_gpu}')
    return batch_gpu, batch_gpu_total // batch_gpu

# The training set, its description (dataset_meta), the network options completed from it
# (resolution, channels) and the conditions of the sample grids.
def _load_dataset(dataset_kwargs, network_kwargs):
    distributed.print0('Loading dataset...')
    dataset_obj = dnnlib.util.construct_class_by_name(**dataset_kwargs)
    dataset_info = dataset_meta(dataset_obj)
    grid_cond = dict(cond_images=None, cond_labels=None)
    if network_kwargs.get('condition'):  # Conditions for the sample grids: the first dataset images.
        items = [dataset_obj[i % len(dataset_obj)] for i in range(len(SAMPLE_GRID_SEEDS))]
        grid_cond = dict(cond_images=torch.stack([torch.as_tensor(x) for x, _ in items]).float() / 127.5 - 1,
                         cond_labels=torch.stack([torch.as_tensor(y) for _, y in items]).float())
    network_kwargs = dnnlib.EasyDict(network_kwargs)
    network_kwargs.setdefault('img_resolution', dataset_obj.resolution)
    network_kwargs.setdefault('img_channels', dataset_obj.num_channels)
    if [network_kwargs.img_channels, network_kwargs.img_resolution, network_kwargs.img_resolution] != dataset_obj.image_shape:
        raise ValueError(f'network_kwargs describe {network_kwargs.img_channels}x{network_kwargs.img_resolution}^2 images '
                         f'but the dataset has shape {dataset_obj.image_shape}')
    return dataset_obj, dataset_info, network_kwargs, grid_cond

# The training state to resume from (None: a new run), checked against this configuration and
# batch size.
def _read_resume_state(resume_state, network_kwargs, dataset_info, batch_size):
    if resume_state is None:
        return None
    state = load_training_state(resume_state, network_kwargs, dataset_info)
    if int(state.get('batch_size', batch_size)) != batch_size:
        raise ValueError(f'Training state {resume_state} was trained with batch_size {state["batch_size"]}, not {batch_size}: '
                         'the resumed run would not repeat the interrupted one')
    return state

# Network: identical initial weights on every rank (same seed, then a broadcast to be sure).
def _construct_network(network_kwargs, image_shape, seed, device):
    distributed.print0('Constructing network...')
    torch.manual_seed(seed)
    net = dnnlib.util.construct_class_by_name(**network_kwargs).to(device)
    distributed.broadcast_(misc.params_and_buffers(net))
    if distributed.get_rank() == 0:
        with torch.no_grad():
            images = torch.zeros([2, *image_shape], device=device)
            labels = torch.zeros([2, net.label_dim], device=device)
            labels[:, :1] = 1  # Class 0 (conditional nets take a condition too).
            net.eval()
            misc.print_module_summary(net, [images], max_nesting=2, kwargs=dict(condition=net.make_condition(images, labels)))
    net.train().requires_grad_(True)
    distributed.print0(f'Latent: L={net.num_layers} layers, K={sorted(set(net.ks))}, {net.bits_per_image:.0f} bits per image')
    return net

# Loss, optimizer, EMA, and the TrainingStep that uses them (it holds all four).
def _set_up_step(net, loss_kwargs, optimizer_kwargs, ema_halflife_kimg, batch_size, precision, balance_kwargs,
                 compile, channels_last):
    distributed.print0('Setting up optimizer...')
    loss_fn = dnnlib.util.construct_class_by_name(**loss_kwargs)
    optimizer = dnnlib.util.construct_class_by_name(params=net.parameters(), **optimizer_kwargs)
    ema = copy.deepcopy(net).eval().requires_grad_(False) if ema_halflife_kimg > 0 else net
    return TrainingStep(net, ema, loss_fn, optimizer, batch_size, precision, balance_kwargs,
                        compile=compile, channels_last=channels_last)

# Transfer learning: the weights of a snapshot, in the network and its EMA.
def _transfer(transfer_pkl, trust_pickle, net, ema):
    distributed.print0(f'Transferring weights from "{transfer_pkl}"...')
    transfer_weights(load_transfer_network(transfer_pkl, trust_pickle), net)
    if ema is not net:
        misc.copy_params_and_buffers(net, ema, require_all=True)

# Data: this rank's share of the global stream of images, from image `start_idx` on (where the
# training state left it), in batches of batch_gpu.
def _data_stream(dataset_obj, data_loader_kwargs, device, seed, start_idx, batch_gpu):
    loader_kwargs = dict(data_loader_kwargs)
    loader_kwargs['pin_memory'] = bool(loader_kwargs.get('pin_memory', False)) and device.type == 'cuda'
    if not loader_kwargs.get('num_workers'):
        loader_kwargs.pop('prefetch_factor', None)
    sampler = misc.InfiniteSampler(dataset_obj, rank=distributed.get_rank(), num_replicas=distributed.get_world_size(),
                                   seed=seed, start_idx=start_idx)
    return iter(torch.utils.data.DataLoader(dataset_obj, sampler=sampler, batch_size=batch_gpu, **loader_kwargs))

# ----------------------------------------------------------------------------
# A run in progress: the steps, where the run stands (images seen, tick) and the files it writes.
# Every rank keeps the same counters and takes the same decisions; only rank 0 writes.

class _Run:
    def __init__(self,
        step_fn,                # TrainingStep: network, EMA, loss function, optimizer, global batch size.
        run_dir,                # Output directory (rank 0 writes).
        device,                 # This rank's device.
        seed,                   # Global random seed: per-step seeding; recorded in the training states.
        num_rounds,             # Accumulation rounds per step, of batch_gpu images each.
        lr_rampup_kimg,         # Learning-rate warm-up (see learning_rate).
        ema_halflife_kimg,      # EMA half-life (see ema_beta).
        ema_rampup_ratio,       # EMA ramp-up (see ema_beta).
        kimg_per_tick,          # Length of a tick.
        snapshot_ticks,         # Snapshot every this many ticks; None = never.
        state_dump_ticks,       # Training state every this many ticks; None = never.
        dataset_kwargs,         # Saved in the snapshots.
        network_kwargs,         # Saved in the snapshots and the training states.
        dataset_info,           # dataset_meta(): saved in the training states.
        training_options,       # The arguments of training_loop(): saved in the snapshots.
        grid_cond,              # cond_images, cond_labels of the sample grids.
        start_time,             # time.time() when training_loop started.
    ):
        self.step_fn, self.net, self.ema = step_fn, step_fn.net, step_fn.ema
        self.batch_size, self.base_lr = step_fn.batch_size, step_fn.optimizer.defaults['lr']
        self.run_dir, self.device, self.seed, self.num_rounds = run_dir, device, seed, num_rounds
        self.rank, self.world_size = distributed.get_rank(), distributed.get_world_size()
        self.lr_rampup_kimg, self.ema_halflife_kimg, self.ema_rampup_ratio = lr_rampup_kimg, ema_halflife_kimg, ema_rampup_ratio
        self.kimg_per_tick, self.snapshot_ticks, self.state_dump_ticks = kimg_per_tick, snapshot_ticks, state_dump_ticks
        self.dataset_kwargs, self.network_kwargs, self.dataset_info = dataset_kwargs, network_kwargs, dataset_info
        self.training_options, self.grid_cond, self.start_time = training_options, grid_cond, start_time
        self.cur_nimg = 0               # Images seen, all ranks together.
        self.cur_tick = 0               # The tick in progress.
        self.tick_start_nimg = 0        # cur_nimg where the tick in progress started.
        self.last_tag_kimg = -1         # kimg of the newest file name of this run (see file_tag).

    # Continue from a training state: weights, EMA, optimizer, loss scaler and counters.
    def resume(self, state, path):
        distributed.print0(f'Resuming from "{path}" at kimg {state["cur_nimg"] / 1e3:.3f}...')
        self.net.load_state_dict(state['net'])
        if self.ema is not self.net:
            self.ema.load_state_dict(state['ema'] if state.get('ema') is not None else state['net'])
        self.step_fn.optimizer.load_state_dict(state['optimizer'])
        if state.get('scaler') and self.step_fn.scaler.is_enabled():
            self.step_fn.scaler.load_state_dict(state['scaler'])
        # The state records the last finished tick; the next one starts where it left off (a state
        # written on a stop signal, mid-tick, also records where that tick started).
        self.cur_nimg = int(state['cur_nimg'])
        self.cur_tick = int(state.get('next_tick', int(state['cur_tick']) + 1))
        self.tick_start_nimg = int(state.get('tick_start_nimg', self.cur_nimg))
        self.last_tag_kimg = int(state.get('last_tag_kimg', self.cur_nimg // 1000))

    # Steps until `total_nimg` images or a stop signal; once per tick a report and the files due.
    def train(self, batches, total_nimg, snapshot_metrics):
        report = _TickReport(self.net, self.device, self.start_time)
        progress = _TickProgress(enabled=(self.rank == 0))
        progress.start(round(self.kimg_per_tick * 1000) if self.cur_tick else self.batch_size)
        stop = _StopRequest()
        while True:
            self.step(batches)
            progress.update(self.batch_size)
            done = self.cur_nimg >= total_nimg
            if not done and stop.requested():
                progress.close()
                self.stop(stop.signum)
                return
            # Maintenance once per tick (the first tick is a single step, for quick feedback).
            if not done and self.cur_tick != 0 and self.cur_nimg < self.tick_start_nimg + self.kimg_per_tick * 1000:
                continue
            progress.close()
            self.end_tick(report, done, snapshot_metrics)
            if done:
                break
            progress.start(round(self.kimg_per_tick * 1000))
        misc.check_ddp_consistency(self.net)
        if self.world_size > 1:
            distributed.print0(f'Parameters and buffers identical on all {self.world_size} processes.')
        distributed.print0()
        distributed.print0('Exiting...')

    # One step: the same random numbers whenever step `cur_nimg // batch_size` is run. No host sync.
    def step(self, batches):
        misc.set_seed_for_step(self.seed, self.rank, self.cur_nimg // self.batch_size)
        rank_images = 0
        for round_idx in range(self.num_rounds):
            images, labels = next(batches)
            images = images.to(self.device, non_blocking=True).to(torch.float32) / 127.5 - 1
            labels = labels.to(self.device, non_blocking=True)
            self.step_fn.accumulate(images, labels, sync=(round_idx == self.num_rounds - 1))
            rank_images += images.shape[0]
        training_stats.report('Progress/rank_batch', rank_images)
        self.step_fn.update(learning_rate(self.base_lr, self.cur_nimg, self.lr_rampup_kimg),
                            ema_beta(self.cur_nimg, self.batch_size, self.ema_halflife_kimg, self.ema_rampup_ratio))
        self.cur_nimg += self.batch_size

    # A stop signal: save where we are (the tick in progress continues on resume) and leave.
    def stop(self, signum):
        tag = self.take_tag()
        path = self.write_state(tag, self.cur_tick, self.tick_start_nimg) if self.rank == 0 else None
        distributed.print0(f'Stopped by {signal.Signals(signum).name} at kimg {self.cur_nimg / 1e3:.3f}: training state saved to {path}')
        distributed.print0(f'To continue, run the same command with --resume={self.run_dir}')

    # The end of a tick: report, snapshot and training state when due, the stats.jsonl line.
    def end_tick(self, report, done, snapshot_metrics):
        tick_end_time = time.time()
        if self.ema is not self.net:            # Buffers (node statistics) are not averaged: copy them.
            for b_ema, b_net in zip(self.ema.buffers(), self.net.buffers(), strict=True):
                b_ema.copy_(b_net)
        stats = report(self.cur_tick, self.cur_nimg, self.cur_nimg - self.tick_start_nimg, tick_end_time)
        write_snapshot = self.snapshot_ticks is not None and (done or self.cur_tick % self.snapshot_ticks == 0)
        write_dump = self.state_dump_ticks is not None and (done or self.cur_tick % self.state_dump_ticks == 0) and self.cur_tick != 0
        tag = self.take_tag() if write_snapshot or write_dump else None
        if write_snapshot:
            self.write_snapshot(tag, snapshot_metrics)
        if write_dump and self.rank == 0:       # The next tick starts here.
            self.write_state(tag, self.cur_tick + 1, self.cur_nimg)
        if self.rank == 0:
            checkpoint.append_line(os.path.join(self.run_dir, 'stats.jsonl'), json.dumps(dict(stats, timestamp=time.time())))
        self.cur_tick += 1
        self.tick_start_nimg = self.cur_nimg
        report.next_tick(tick_end_time)

    # Name tag of the files written now (see file_tag); this kimg is then taken.
    def take_tag(self):
        tag = file_tag(self.cur_nimg, self.last_tag_kimg)
        self.last_tag_kimg = self.cur_nimg // 1000
        return tag

    # Snapshot: the EMA network as a pickle and, beside it, in the safe format, with a sample grid
    # and a node-usage plot (rank 0); then its metrics, on all ranks.
    def write_snapshot(self, tag, snapshot_metrics):
        snapshot = copy.deepcopy(self.ema).eval().requires_grad_(False)
        misc.check_ddp_consistency(self.net)
        misc.check_ddp_consistency(snapshot)
        if self.rank == 0:
            checkpoint.save_atomic(_png_bytes(sample_grid(snapshot, **self.grid_cond)), os.path.join(self.run_dir, f'samples-{tag}.png'), mode='bytes')
            checkpoint.save_atomic(_png_bytes(node_usage_plot(snapshot)), os.path.join(self.run_dir, f'node-usage-{tag}.png'), mode='bytes')
            data = dict(ema=snapshot.cpu(), loss_fn=self.step_fn.loss_fn, dataset_kwargs=dict(self.dataset_kwargs),
                        network_kwargs=dict(self.network_kwargs), training_options=self.training_options)
            checkpoint.save_atomic(data, os.path.join(self.run_dir, f'network-snapshot-{tag}.pkl'), mode='pickle')
            # The same network in the safe format (loads without running code), beside the pickle.
            snapshot_io.save_network_safe(data['ema'], os.path.join(self.run_dir, f'network-snapshot-{tag}.safetensors'),
                                          extra_metadata=dict(training_options=self.training_options))
            del data
            snapshot.to(self.device)        # Back from the CPU copy written above, for the metrics.
        if snapshot_metrics is not None:    # On all ranks, each generating its share of the samples.
            snapshot_metrics(snapshot, f'network-snapshot-{tag}.pkl', self.cur_nimg / 1e3)
        del snapshot

    # A training state for exact resume (rank 0 writes it): the next tick and where it starts. No RNG
    # state: every step seeds itself from (seed, rank, step). Resume reads `seed` (train.py's default
    # --seed) and checks `batch_size`. Returns the path.
    def write_state(self, tag, next_tick, tick_start_nimg):
        state = dict(
            net=self.net.state_dict(),
            ema=None if self.ema is self.net else self.ema.state_dict(),
            optimizer=self.step_fn.optimizer.state_dict(),
            scaler=self.step_fn.scaler.state_dict() if self.step_fn.scaler.is_enabled() else None,
            cur_nimg=self.cur_nimg, cur_tick=next_tick - 1, next_tick=next_tick, tick_start_nimg=tick_start_nimg,
            last_tag_kimg=self.last_tag_kimg,
            seed=self.seed, batch_size=self.batch_size,
            config=dict(network_kwargs=dict(self.network_kwargs), dataset=self.dataset_info),
        )
        path = os.path.join(self.run_dir, f'training-state-{tag}.pt')
        checkpoint.save_atomic(state, path, mode='torch')
        return path

# ----------------------------------------------------------------------------
# The report of a tick: statistics through training_stats (-> stats.jsonl) and the progress line.
# The device's statistics reach the host here, once per tick.

class _TickReport:
    def __init__(self, net, device, start_time):
        self.net, self.device, self.start_time = net, device, start_time
        self.tick_start_time = time.time()
        self.maintenance_time = self.tick_start_time - start_time   # Time outside the last tick's steps.
        self.prev_splits = node_usage_summary(net)['splits']        # Splits before the tick.

    # Report the tick that ended at `tick_end_time` after `tick_img` images; returns the statistics.
    def __call__(self, cur_tick, cur_nimg, tick_img, tick_end_time):
        usage = node_usage_summary(self.net)
        tick_sec = tick_end_time - self.tick_start_time
        report0 = training_stats.report0
        report0('Progress/tick', cur_tick)
        report0('Progress/kimg', cur_nimg / 1e3)
        report0('Timing/total_sec', tick_end_time - self.start_time)
        report0('Timing/sec_per_tick', tick_sec)
        report0('Timing/sec_per_kimg', tick_sec / max(tick_img, 1) * 1e3)
        report0('Timing/img_per_sec', tick_img / max(tick_sec, 1e-8))
        report0('Timing/maintenance_sec', self.maintenance_time)
        report0('Resources/cpu_mem_gb', psutil.Process(os.getpid()).memory_info().rss / 2**30)
        if self.device.type == 'cuda':
            report0('Resources/peak_gpu_mem_gb', torch.cuda.max_memory_allocated(self.device) / 2**30)
            report0('Resources/peak_gpu_mem_reserved_gb', torch.cuda.max_memory_reserved(self.device) / 2**30)
            torch.cuda.reset_peak_memory_stats(self.device)
        report0('SplitPrune/splits', usage['splits'])
        report0('SplitPrune/splits_tick', usage['splits'] - self.prev_splits)
        report0('SplitPrune/dead_nodes', usage['dead_nodes'])
        report0('SplitPrune/usage_tv', usage['usage_tv'])
        training_stats.default_collector.update()
        stats = training_stats.default_collector.as_dict()
        distributed.print0(self.progress_line(cur_tick, cur_nimg, tick_img, tick_sec, tick_end_time, usage))
        self.prev_splits = usage['splits']
        return stats

    # The progress line of a tick (EDM's fields, and the node usage of Split-and-Prune).
    def progress_line(self, cur_tick, cur_nimg, tick_img, tick_sec, tick_end_time, usage):
        mean = training_stats.default_collector.mean
        fields = [
            f'tick {cur_tick:<5d}',
            f'kimg {cur_nimg / 1e3:<9.3f}',
            f'loss {mean("Loss/loss"):<8.5f}',
            f'time {dnnlib.util.format_time(tick_end_time - self.start_time):<10s}',
            f'sec/tick {tick_sec:<7.1f}',
            f'img/s {tick_img / max(tick_sec, 1e-8):<8.1f}',
            f'sec/kimg {tick_sec / max(tick_img, 1) * 1e3:<8.2f}',
            f'splits {usage["splits"]} (+{usage["splits"] - self.prev_splits})',
            f'tv {usage["usage_tv"]:<6.3f}',
            f'maintenance {self.maintenance_time:<5.1f}',
            f'cpumem {mean("Resources/cpu_mem_gb"):<5.2f}',
        ]
        if self.device.type == 'cuda':
            fields.append(f'gpumem {mean("Resources/peak_gpu_mem_gb"):<5.2f}')
        return '  '.join(fields)

    # The next tick starts now; the time since the end of the last one counts as maintenance.
    def next_tick(self, tick_end_time):
        self.tick_start_time = time.time()
        self.maintenance_time = self.tick_start_time - tick_end_time

# ----------------------------------------------------------------------------
# The training loop: the outline of a run. Setup, resume, then steps with a report per tick (see
# _Run); only rank 0 writes.

@_restores_stop_handlers
def training_loop(
    run_dir             = '.',      # Output directory (used by rank 0 only).
    dataset_kwargs      = {},       # Options of the training set (class_name, ...).
    data_loader_kwargs  = {},       # Options of torch.utils.data.DataLoader.
    network_kwargs      = {},       # Options of the network (class_name, ...).
    loss_kwargs         = {},       # Options of the loss function (class_name, ...).
    optimizer_kwargs    = {},       # Options of the optimizer (class_name, lr, ...).
    balance_kwargs      = {},       # Options of split_prune.balance(): method (tv, paper, bias, none), bias_rate.
    seed                = 0,        # Global random seed.
    batch_size          = 2048,     # Total batch size of one step, all ranks together.
    batch_gpu           = None,     # Images per rank per accumulation round, None = batch_size / world_size.
    total_kimg          = 200000,   # Training duration in thousands of images.
    ema_halflife_kimg   = 0,        # Half-life of the EMA of the weights; 0 = no EMA.
    ema_rampup_ratio    = 0.05,     # Half-life at most this fraction of the images seen; None = no ramp-up.
    lr_rampup_kimg      = 10000,    # Linear learning-rate warm-up; 0 = none.
    precision           = 'fp32',   # 'fp32', 'bf16' or 'fp16' (autocast; fp16 with loss scaling).
    compile             = False,    # torch.compile the training forward.
    channels_last       = False,    # Channels-last convolutions.
    kimg_per_tick       = 50,       # Interval of progress lines and stats.jsonl entries.
    snapshot_ticks      = 50,       # Snapshot + pictures every this many ticks; None = never.
    state_dump_ticks    = 500,      # Training state every this many ticks; None = never.
    resume_state        = None,     # training-state-*.pt to continue from.
    transfer_pkl        = None,     # network-snapshot-*.safetensors/.pkl whose weights initialise the network.
    trust_pickle        = False,    # Let transfer_pkl be a pickle that runs code (not one of our snapshots).
    cudnn_benchmark     = True,     # torch.backends.cudnn.benchmark.
    device              = None,     # 'cpu', 'cuda' or None = this rank's GPU if any, else the CPU.
    metrics             = None,     # Metrics of every snapshot, e.g. 'fid50k,kid10k' (evaluation.metrics); None = none.
    metric_kwargs       = {},       # class_name (default evaluation.metrics.SnapshotMetrics), detector_url, trust_pickle, batch.
):
    training_options = _canonical_options(locals())     # The arguments of this call, for the snapshots.
    start_time = time.time()
    world_size = distributed.get_world_size()
    device = _set_up_device(device, cudnn_benchmark, precision)
    batch_gpu, num_rounds = _split_batch(batch_size, batch_gpu, world_size)
    dataset_obj, dataset_info, network_kwargs, grid_cond = _load_dataset(dataset_kwargs, network_kwargs)
    state = _read_resume_state(resume_state, network_kwargs, dataset_info, batch_size)
    net = _construct_network(network_kwargs, dataset_obj.image_shape, seed, device)
    step_fn = _set_up_step(net, loss_kwargs, optimizer_kwargs, ema_halflife_kimg, batch_size, precision, balance_kwargs,
                           compile=compile, channels_last=channels_last)
    if transfer_pkl is not None:
        _transfer(transfer_pkl, trust_pickle, net, step_fn.ema)
    run = _Run(step_fn, run_dir, device, seed=seed, num_rounds=num_rounds, lr_rampup_kimg=lr_rampup_kimg,
               ema_halflife_kimg=ema_halflife_kimg, ema_rampup_ratio=ema_rampup_ratio, kimg_per_tick=kimg_per_tick,
               snapshot_ticks=snapshot_ticks, state_dump_ticks=state_dump_ticks, dataset_kwargs=dataset_kwargs,
               network_kwargs=network_kwargs, dataset_info=dataset_info, training_options=training_options,
               grid_cond=grid_cond, start_time=start_time)
    if state is not None:
        run.resume(state, resume_state)
    del state
    batches = _data_stream(dataset_obj, data_loader_kwargs, device, seed, run.cur_nimg, batch_gpu)

    # Metrics of the snapshots: detector and reference statistics are ready before the first step.
    snapshot_metrics = None
    if metrics:
        metric_kwargs = {'class_name': 'evaluation.metrics.SnapshotMetrics', **metric_kwargs}   # A name: no import upward.
        snapshot_metrics = dnnlib.util.construct_class_by_name(metrics, run_dir, dataset_kwargs, device=device, **metric_kwargs)

    # The duration in whole images: `--duration` is in Mimg, and 0.00205 * 1e6 is 2050.0000000000005
    # in floating point, which would make a run stop one step late.
    total_nimg = round(total_kimg * 1000)
    distributed.print0(f'Training for {total_kimg} kimg: {batch_size} images per step = {world_size} process(es) '
                       f'x {num_rounds} round(s) x {batch_gpu} images, {precision}')
    distributed.print0()
    if run.cur_nimg >= total_nimg:
        distributed.print0('The training state is already at the requested duration; nothing to do.')
        return
    run.train(batches, total_nimg, snapshot_metrics)

# ----------------------------------------------------------------------------
# A tqdm bar over the images of the current tick, shown only on an interactive terminal. It writes
# to the real stdout, not through the log tee, so log.txt keeps only the per-tick lines.

class _TickProgress:
    def __init__(self, enabled):
        stream = sys.__stdout__
        self.enabled = enabled and stream is not None and stream.isatty()
        self.bar = None

    def start(self, total):
        if self.enabled:
            import tqdm
            self.bar = tqdm.tqdm(total=total, unit='img', leave=False, file=sys.__stdout__, dynamic_ncols=True)

    def update(self, n):
        if self.bar is not None:
            self.bar.update(n)

    def close(self):
        if self.bar is not None:
            self.bar.close()
            self.bar = None

# ----------------------------------------------------------------------------
