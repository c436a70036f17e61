"""The main training loop of a Discrete Distribution Network, shaped like EDM's.

`training_loop(**c)` is what `train.py` calls with the options of `training_options.json`: setup,
resume, then steps until the duration or a stop signal, with a report per tick. One step (seeded
here, run by training_step.TrainingStep):
1. per-step seeding from (seed, rank, step), so a resumed run repeats an uninterrupted one exactly;
2. gradient accumulation over `batch_size / (world_size * batch_gpu)` rounds of `batch_gpu` images,
   under `torch.autocast` for bf16/fp16; gradients summed across ranks by DDP after the last round;
3. Adam step, then node balancing (Split-and-Prune, paper §3.3), then the EMA update (half-life in
   kimg; 0 = no EMA, the snapshot holds the network itself).
The hot loop never waits for the device: losses and counters stay on it and reach the host once per
tick through `training_stats` (tick_report.py).

Once per tick: a progress line and a `stats.jsonl` line; per `snapshot_ticks`: the network pickle, a
sample grid and a node-usage plot; per `state_dump_ticks`: the training state for exact resume
(run_files.py). Only rank 0 writes.

Optimizer: Adam, lr 1e-3, betas (0.9, 0.999), eps 1e-8 (torch's defaults, as in EDM and the
reference DDN code), lr ramped up linearly over `lr_rampup_kimg` (EDM's 10 Mimg by default).
"""

import copy
import functools
import signal
import time

import torch

import dnnlib
from torch_utils import distributed, misc, training_stats
from training import code_usage, prior_training, run_files, stopping
from training import snapshot as snapshot_io
from training.images import to_float
from training.pictures import SAMPLE_GRID_SEEDS
from training.tick_report import TickProgress, TickReport
from training.training_step import TrainingStep, autocast_dtype, ema_beta, learning_rate

# Signals that stop a run cleanly: finish the step, write a training state, exit 0 (training/stopping.py).
STOP_SIGNALS = stopping.STOP_SIGNALS

# ----------------------------------------------------------------------------
# The loss or the weights became NaN or infinite: the run stops before writing the files of that tick,
# so the last snapshot and training state on disk are the last good ones.

class TrainingDiverged(RuntimeError):
    pass

# Checked once per tick, where the statistics reach the host anyway: one device reduction over the
# parameters and one value read; the same decision on every rank (all-reduced loss, DDP-equal weights).
def _check_finite(stats, net, cur_nimg, run_dir):
    loss = stats['Loss/loss'].mean if 'Loss/loss' in stats else 0.0
    with torch.no_grad():
        weights_ok = bool(torch.stack([p.isfinite().all() for p in net.parameters()]).all())
    if weights_ok and loss == loss and abs(loss) != float('inf'):
        return
    what = f'the loss is {loss}' if weights_ok else 'the weights hold NaN or infinity'
    training_stats.reset()          # The NaN must not reach a later run of this process.
    raise TrainingDiverged(f'Training diverged at kimg {cur_nimg / 1e3:.3f}: {what}. Stopped without writing this tick\'s files; '
                           f'the last good snapshot and training state in {run_dir} are kept (try a lower learning rate, then resume)')

# ----------------------------------------------------------------------------
# Setup, in the order training_loop runs it: device, batch split, dataset, network, optimizer,
# transfer, data stream.

# This rank's device; cuDNN autotuning as asked, TF32 off.
def _set_up_device(device, cudnn_benchmark, precision):
    device = distributed.pick_device(device)
    torch.backends.cudnn.benchmark = cudnn_benchmark
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    autocast_dtype(precision)       # Checked before the dataset and the network are built.
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
    dataset_info = run_files.dataset_meta(dataset_obj)
    grid_cond = dict(cond_images=None, cond_labels=None)
    if network_kwargs.get('condition'):  # Conditions for the sample grids: the first dataset images.
        items = [dataset_obj[i % len(dataset_obj)] for i in range(len(SAMPLE_GRID_SEEDS))]
        grid_cond = dict(cond_images=to_float(torch.stack([torch.as_tensor(x) for x, _ in items])),
                         cond_labels=torch.stack([torch.as_tensor(y) for _, y in items]).float())
    network_kwargs = dnnlib.EasyDict(network_kwargs)
    network_kwargs.setdefault('img_resolution', dataset_obj.resolution)
    network_kwargs.setdefault('img_channels', dataset_obj.num_channels)
    if [network_kwargs.img_channels, network_kwargs.img_resolution, network_kwargs.img_resolution] != dataset_obj.image_shape:
        raise ValueError(f'network_kwargs describe {network_kwargs.img_channels}x{network_kwargs.img_resolution}^2 images '
                         f'but the dataset has shape {dataset_obj.image_shape}')
    return dataset_obj, dataset_info, network_kwargs, grid_cond

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
    run_files.transfer_weights(run_files.load_transfer_network(transfer_pkl, trust_pickle), net)
    if ema is not net:
        misc.copy_params_and_buffers(net, ema, require_all=True)

# DataLoader iterators of the training_loop calls in progress. Their workers ignore SIGTERM (stopping.py),
# so a worker ends only by the loader's orderly shutdown (or when this process dies): training_loop shuts
# its loaders down when it ends, however it ends. Otherwise an error whose traceback keeps the iterator
# alive would leave the workers running, and the interpreter's exit would wait for them forever.
_open_loaders = []

def _shuts_down_loaders(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        first = len(_open_loaders)
        try:
            return fn(*args, **kwargs)
        finally:
            while len(_open_loaders) > first:
                shutdown = getattr(_open_loaders.pop(), '_shutdown_workers', None)     # What the iterator's __del__ calls.
                if shutdown is not None:
                    shutdown()
    return wrapper

# Data: this rank's share of the global stream of images, from image `start_idx` on (where the
# training state left it), in batches of batch_gpu.
def _data_stream(dataset_obj, data_loader_kwargs, device, seed, start_idx, batch_gpu):
    loader_kwargs = dict(data_loader_kwargs)
    loader_kwargs['pin_memory'] = bool(loader_kwargs.get('pin_memory', False)) and device.type == 'cuda'
    if not loader_kwargs.get('num_workers'):
        loader_kwargs.pop('prefetch_factor', None)
    else:       # Workers ignore stop signals sent to the whole job: the main process stops them (stopping.py).
        loader_kwargs.setdefault('worker_init_fn', misc.ignore_stop_signals_in_worker)
    sampler = misc.InfiniteSampler(dataset_obj, rank=distributed.get_rank(), num_replicas=distributed.get_world_size(),
                                   seed=seed, start_idx=start_idx)
    batches = iter(torch.utils.data.DataLoader(dataset_obj, sampler=sampler, batch_size=batch_gpu, **loader_kwargs))
    _open_loaders.append(batches)
    return batches

# ----------------------------------------------------------------------------
# The training loop: setup, resume, then steps with a report per tick; only rank 0 writes.

@stopping.restores_stop_handlers
@_shuts_down_loaders
def training_loop(
    run_dir             = '.',      # Output directory (used by rank 0 only).
    dataset_kwargs      = {},       # Options of the training set (class_name, ...).
    data_loader_kwargs  = {},       # Options of torch.utils.data.DataLoader.
    network_kwargs      = {},       # Options of the network (class_name, ...).
    loss_kwargs         = {},       # Options of the loss function (class_name, ...).
    optimizer_kwargs    = {},       # Options of the optimizer (class_name, lr, ...); lr is the base learning rate.
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
    metrics             = None,     # Metrics of every snapshot, e.g. 'fid50k,kid10k' (evaluation/snapshot_metrics.py); None = none.
    metric_kwargs       = {},       # class_name (default evaluation.snapshot_metrics.SnapshotMetrics), detector_url, trust_pickle, batch.
    prior_kwargs        = None,     # A prior over the codes refreshed before each snapshot (training.prior_training.PriorRefresh); None = none.
):
    training_options = run_files.canonical_options(locals())     # The arguments of this call, for the snapshots.
    start_time = time.time()
    training_stats.reset()          # This run's statistics only (another run may have reported in this process).
    rank, world_size = distributed.get_rank(), distributed.get_world_size()
    if 'lr' not in optimizer_kwargs:
        raise ValueError('optimizer_kwargs must give lr, the base learning rate of the schedule')
    base_lr = optimizer_kwargs['lr']
    device = _set_up_device(device, cudnn_benchmark, precision)
    batch_gpu, num_rounds = _split_batch(batch_size, batch_gpu, world_size)
    dataset_obj, dataset_info, network_kwargs, grid_cond = _load_dataset(dataset_kwargs, network_kwargs)
    state = run_files.read_resume_state(resume_state, network_kwargs, dataset_info, batch_size, world_size)
    net = _construct_network(network_kwargs, dataset_obj.image_shape, seed, device)
    step_fn = _set_up_step(net, loss_kwargs, optimizer_kwargs, ema_halflife_kimg, batch_size, precision, balance_kwargs,
                           compile=compile, channels_last=channels_last)
    ema = step_fn.ema
    if transfer_pkl is not None:
        _transfer(transfer_pkl, trust_pickle, net, ema)
    progress = run_files.RunProgress() if state is None else run_files.resume(state, resume_state, step_fn)
    del state
    batches = _data_stream(dataset_obj, data_loader_kwargs, device, seed, progress.cur_nimg, batch_gpu)
    prior_refresh = None
    if prior_kwargs and rank == 0:  # Rank 0 refreshes and saves the prior; a resumed run warm-starts from its newest file.
        prior_refresh = dnnlib.util.construct_class_by_name(dataset=dataset_obj, ks=net.ks, device=device, seed=seed, **prior_kwargs)
        if resume_state is not None:
            prior_refresh.load_latest(run_dir)
    config = dict(network_kwargs=dict(network_kwargs), dataset=dataset_info)    # What a resumed state must match.
    save_state = functools.partial(run_files.save_state, run_dir, step_fn=step_fn, progress=progress, seed=seed,
                                   batch_size=batch_size, world_size=world_size, config=config)

    # Metrics of the snapshots: detector and reference statistics are ready before the first step.
    snapshot_metrics = None
    if metrics:
        metric_kwargs = {'class_name': 'evaluation.snapshot_metrics.SnapshotMetrics', **metric_kwargs}   # A name: no import upward.
        snapshot_metrics = dnnlib.util.construct_class_by_name(metrics, run_dir, dataset_kwargs, device=device, **metric_kwargs)

    # The duration in whole images: `--duration` is in Mimg, and 0.00205 * 1e6 is 2050.0000000000005
    # in floating point, which would make a run stop one step late.
    total_nimg = round(total_kimg * 1000)
    distributed.print0(f'Training for {total_kimg} kimg: {batch_size} images per step = {world_size} process(es) '
                       f'x {num_rounds} round(s) x {batch_gpu} images, {precision}')
    distributed.print0()
    if progress.cur_nimg >= total_nimg:
        distributed.print0('The training state is already at the requested duration; nothing to do.')
        return

    # Steps until `total_nimg` images or a stop signal; once per tick a report and the files due.
    # At snapshot ticks the report also encodes a fixed batch of training images with the EMA (rank 0).
    report = TickReport(net, device, start_time, ema=ema, usage_images=code_usage.usage_batch(dataset_obj) if rank == 0 else None,
                        measure_usage=True)
    bar = TickProgress(enabled=(rank == 0))
    bar.start(round(kimg_per_tick * 1000) if progress.cur_tick else batch_size)
    stop = stopping.StopRequest()
    while True:
        # One step: the same random numbers whenever step `cur_nimg // batch_size` is run. No host sync.
        misc.set_seed_for_step(seed, rank, progress.cur_nimg // batch_size)
        rank_images = 0
        for round_idx in range(num_rounds):
            images, labels = next(batches)
            images = to_float(images.to(device, non_blocking=True))
            labels = labels.to(device, non_blocking=True)
            step_fn.accumulate(images, labels, sync=(round_idx == num_rounds - 1))
            rank_images += images.shape[0]
        training_stats.report('Progress/rank_batch', rank_images)
        step_fn.update(learning_rate(base_lr, progress.cur_nimg, lr_rampup_kimg),
                       ema_beta(progress.cur_nimg, batch_size, ema_halflife_kimg, ema_rampup_ratio))
        progress.cur_nimg += batch_size
        bar.update(batch_size)
        done = progress.cur_nimg >= total_nimg

        # A stop signal: save where we are (the tick in progress continues on resume) and leave.
        if not done and stop.requested():
            bar.close()
            tag = progress.take_tag()
            path = save_state(tag, next_tick=progress.cur_tick, tick_start_nimg=progress.tick_start_nimg) if rank == 0 else None
            distributed.print0(f'Stopped by {signal.Signals(stop.signum).name} at kimg {progress.cur_nimg / 1e3:.3f}: '
                               f'training state saved to {path}')
            return dnnlib.EasyDict(stopped=True, run_dir=run_dir)

        # Maintenance once per tick (the first tick is a single step, for quick feedback).
        if not done and progress.cur_tick != 0 and progress.cur_nimg < progress.tick_start_nimg + kimg_per_tick * 1000:
            continue
        bar.close()
        tick_end_time = time.time()
        if ema is not net:          # Buffers (node statistics) are not averaged: copy them.
            for b_ema, b_net in zip(ema.buffers(), net.buffers(), strict=True):
                b_ema.copy_(b_net)
        write_snapshot = snapshot_ticks is not None and (done or progress.cur_tick % snapshot_ticks == 0)
        stats = report(progress.cur_tick, progress.cur_nimg, progress.cur_nimg - progress.tick_start_nimg, tick_end_time,
                       data_usage=write_snapshot)
        _check_finite(stats, net, progress.cur_nimg, run_dir)
        write_dump = state_dump_ticks is not None and (done or progress.cur_tick % state_dump_ticks == 0) and progress.cur_tick != 0
        tag = progress.take_tag() if write_snapshot or write_dump else None
        if write_snapshot:          # The EMA network; its metrics on all ranks, each generating its share.
            snapshot = copy.deepcopy(ema).eval().requires_grad_(False)
            misc.check_ddp_consistency(net)
            misc.check_ddp_consistency(snapshot)
            if rank == 0:
                run_files.save_snapshot(run_dir, tag, snapshot, grid_cond, training_options, data_usage=report.data_usage,
                                        loss_fn=step_fn.loss_fn,
                                        dataset_kwargs=dict(dataset_kwargs), network_kwargs=dict(network_kwargs))
            if prior_refresh is not None:   # On the snapshot's codes, saved beside it; its figures join this tick's stats.
                prior_report = prior_refresh.refresh(snapshot, progress.cur_nimg)
                prior_refresh.save(prior_training.prior_file(run_dir, tag), prior_report)
                run_files.save_prior_samples(run_dir, tag, snapshot, prior_refresh.prior)
                stats.update(prior_training.report_stats(prior_report))
                distributed.print0(prior_training.report_line(prior_report))
            if snapshot_metrics is not None:
                snapshot_metrics(snapshot, snapshot_io.run_file(snapshot_io.SNAPSHOT_PATTERN, tag), progress.cur_nimg / 1e3)
            del snapshot
        if write_dump and rank == 0:        # The next tick starts here.
            save_state(tag, next_tick=progress.cur_tick + 1, tick_start_nimg=progress.cur_nimg)
        if rank == 0:
            run_files.append_stats(run_dir, stats)
        progress.cur_tick += 1
        progress.tick_start_nimg = progress.cur_nimg
        report.next_tick(tick_end_time)
        if done:
            break
        bar.start(round(kimg_per_tick * 1000))

    misc.check_ddp_consistency(net)
    if world_size > 1:
        distributed.print0(f'Parameters and buffers identical on all {world_size} processes.')
    distributed.print0()
    distributed.print0('Exiting...')

# ----------------------------------------------------------------------------
