"""Train a Discrete Distribution Network (DDN): EDM's command line, plus a "DDN options" group.

Runs as one process, or one process per GPU under `torchrun --standalone --nproc_per_node=N train.py
...` (gloo on CPU, NCCL on CUDA). Every run gets a folder `<outdir>/NNNNN-<dataset>-<desc>/` with
`training_options.json`, `log.txt`, `stats.jsonl`, network snapshots (`network-snapshot-<kimg>.pkl`,
load with `pickle.load(f)['ema']`), training states (`training-state-<kimg>.pt`, for --resume),
sample grids and node-usage plots. Every snapshot is also written in the safe format
(`network-snapshot-<kimg>.safetensors`); --transfer and --resume load without running code from the
file (training/snapshot.py). SIGTERM, SIGUSR1 or a first Ctrl+C stops a run after the current step with a
training state (a second Ctrl+C aborts); a run folder in use by a live process is refused (its run.lock).
"""

import contextlib
import errno
import json
import os
import re
import shutil

try:
    import fcntl
except ImportError:     # Windows: no advisory locks; run ids are then only unique up to a race.
    fcntl = None

import click
import torch

import cli
import dnnlib
from training.conditions import parse_condition
from torch_utils import checkpoint, distributed, misc
from training import dataset as dataset_module
from evaluation import detectors
from evaluation.snapshot_metrics import parse_training_metrics
from training import run_files, training_loop
from training import snapshot as snapshot_io
from training.training_step import ADAM_IMPLEMENTATIONS
from training.split_prune import BALANCE_METHODS

# ----------------------------------------------------------------------------
# click: options carry a help-section name, and --help prints them section by section.

class GroupedOption(click.Option):
    def __init__(self, *args, group='Options', **kwargs):
        super().__init__(*args, **kwargs)
        self.group = group

class GroupedCommand(click.Command):
    def format_options(self, ctx, formatter):
        sections = {}
        for param in self.get_params(ctx):
            record = param.get_help_record(ctx)
            if record is not None:
                sections.setdefault(getattr(param, 'group', 'Other options'), []).append(record)
        for name, records in sections.items():
            with formatter.section(name):
                formatter.write_dl(records)

# An option of a given help section, shown with its default.
def option(group, *decls, **kwargs):
    kwargs.setdefault('show_default', 'default' in kwargs and not kwargs.get('is_flag', False))
    return click.option(*decls, cls=GroupedOption, group=group, **kwargs)

MAIN, HYPER, DDN, PERF, IO = 'Main options', 'Hyperparameters', 'DDN options', 'Performance', 'I/O'

# ----------------------------------------------------------------------------
# Run folder: <outdir>/<next id:05d>-<desc>, EDM's numbering; --nosubdir uses outdir itself.

def next_run_dir(outdir, desc):
    prev_ids = []
    if os.path.isdir(outdir):
        for name in os.listdir(outdir):
            match = re.match(r'^\d+', name)
            if match and os.path.isdir(os.path.join(outdir, name)):
                prev_ids.append(int(match.group()))
    return os.path.join(outdir, f'{max(prev_ids, default=-1) + 1:05d}-{desc}')

# Create the next run folder atomically: two runs started together never get the same id. The id
# is chosen and its folder created under an exclusive lock on <outdir>/.run-id.lock, and mkdir
# (which fails if the folder exists) is the final arbiter.
def make_run_dir(outdir, desc):
    os.makedirs(outdir, exist_ok=True)
    with open(os.path.join(outdir, '.run-id.lock'), 'a') as lock:
        if fcntl is not None:
            fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            while True:
                run_dir = next_run_dir(outdir, desc)
                try:
                    os.mkdir(run_dir)
                    return run_dir
                except FileExistsError:
                    continue
        finally:
            if fcntl is not None:
                fcntl.flock(lock, fcntl.LOCK_UN)

# True if `path` already holds the files of a training run.
def holds_run(path):
    return os.path.isfile(os.path.join(path, 'training_options.json')) or \
        holds_saved_work(path)

# True if a run folder holds a snapshot or a training state.
def holds_saved_work(path):
    patterns = (snapshot_io.STATE_PATTERN, snapshot_io.SNAPSHOT_PATTERN, snapshot_io.SAFE_SNAPSHOT_PATTERN)
    return checkpoint.latest(path, patterns) is not None

# Rank 0 locks a run folder (checkpoint.RunLock: held while the process lives) -> [lock], [] on other
# ranks, for a dry run (only checked), for no folder (None) and for a folder that `held` already holds.
# A folder in use by a live process is an error on every rank.
def lock_folder(folder, option, dry_run, held=(), create=True):
    locks, error = [], None
    if distributed.get_rank() == 0 and folder is not None:
        created = not os.path.exists(folder)
        try:
            if option == '--outdir' and create and not dry_run:
                os.makedirs(folder, exist_ok=True)      # --nosubdir: the folder may not exist yet.
            if os.path.isdir(folder) and not any(os.path.samefile(lock.folder, folder) for lock in held):
                locks.append(checkpoint.RunLock(folder).acquire())
        except checkpoint.FolderInUseError as err:
            error = f'{option}: {err}'
        except OSError as err:
            if option != '--resume':    # A read-only folder to resume from cannot be in use by a run.
                error = f'{option}: cannot lock {folder}: {err}'
                if created:             # A folder made here (a full disk): not left behind, nor its lock file.
                    shutil.rmtree(folder, ignore_errors=True)
                else:                   # An existing folder keeps nothing of ours: an empty lock file goes.
                    lock_file = os.path.join(folder, checkpoint.RUN_LOCK_NAME)
                    with contextlib.suppress(OSError):
                        if os.path.getsize(lock_file) == 0:
                            os.remove(lock_file)
    error = distributed.broadcast_object(error)
    if error is not None:
        raise click.ClickException(error)
    if dry_run:
        for lock in locks:
            lock.release()
        return []
    return locks

# The folders of a run that exist already, locked for the run's life: the folder resumed from (a second
# resume of it while this run lives would run twice) and --nosubdir's folder.
# Every rank makes the same calls (each one a collective); only rank 0 looks at the file system.
def lock_existing_folders(opts):
    resumed = None
    if opts.resume is not None:
        resumed = opts.resume if os.path.isdir(opts.resume) else os.path.dirname(os.path.abspath(opts.resume))
    locks = lock_folder(resumed, '--resume', opts.dry_run)
    try:
        locks += lock_folder(opts.outdir if opts.nosubdir else None, '--outdir', opts.dry_run, held=locks, create=False)
    except click.ClickException:
        for lock in locks:
            lock.release()
        raise
    return locks

# --resume FILE or RUNDIR -> the training state file (a folder gives its newest state).
def resolve_resume(path):
    if os.path.isdir(path):
        latest = checkpoint.latest(path, snapshot_io.STATE_PATTERN)
        if latest is None:
            raise click.ClickException(f'--resume: no {snapshot_io.STATE_PATTERN} in folder {path}')
        return latest
    if not os.path.isfile(path):
        raise click.ClickException(f'--resume: no such file or folder: {path}')
    return path

# ----------------------------------------------------------------------------

@click.command(cls=GroupedCommand, context_settings=dict(max_content_width=120))

# Main options.
@option(MAIN, '--outdir',        help='Where to save the results', metavar='DIR', type=str, required=True)
@option(MAIN, '--data',          help='Dataset folder or zip  [default: built-in digits, 16x16]', metavar='ZIP|DIR', type=str)
@option(MAIN, '--cond',          help='Train a class-conditional model (labels from dataset.json; = --condition=class)', metavar='BOOL', type=bool, default=False)

# Hyperparameters.
@option(HYPER, '--duration',     help='Training duration', metavar='MIMG', type=cli.FiniteFloatRange(min=0, min_open=True), default=200)
@option(HYPER, '--batch',        help='Total batch size', metavar='INT', type=click.IntRange(min=1), default=2048)
@option(HYPER, '--batch-gpu',    help='Limit batch size per process and round  [default: batch / processes]', metavar='INT', type=click.IntRange(min=1))
@option(HYPER, '--lr',           help='Learning rate (Adam)', metavar='FLOAT', type=cli.FiniteFloatRange(min=0, min_open=True), default=1e-3)
@option(HYPER, '--lr-rampup',    help='Learning-rate warm-up', metavar='KIMG', type=cli.FiniteFloatRange(min=0), default=10000)
@option(HYPER, '--ema',          help='EMA half-life, 0 = no EMA', metavar='MIMG', type=cli.FiniteFloatRange(min=0), default=0)
@option(HYPER, '--dropout',      help='Dropout probability in the blocks', metavar='FLOAT', type=cli.FiniteFloatRange(min=0, max=1), default=0)
@option(HYPER, '--xflip',        help='Enable dataset x-flips', metavar='BOOL', type=bool, default=False)

# DDN options.
@option(DDN, '--arch',           help='single-shot: a coarse-to-fine stack (the paper\'s default); recurrence: one UNet + DDL shared by all layers', type=click.Choice(['single-shot', 'recurrence']), default='single-shot')
@option(DDN, '--iters',          help='Latent length L of --arch=recurrence (times the shared layer runs)', metavar='INT', type=click.IntRange(min=1), default=32)
@option(DDN, '--levels',         help='Downsamplings in the UNet of --arch=recurrence', metavar='INT', type=click.IntRange(min=0), default=3)
@option(DDN, '--iter-embed',     help='--arch=recurrence: add a learned embedding of the layer index', metavar='BOOL', type=bool, default=False)
@option(DDN, '--max-blockn',     help='Max blocks (and DDLs) per resolution', metavar='INT', type=click.IntRange(min=1), default=32)
@option(DDN, '--max-outputk',    help='Max K (candidates) per DDL (--arch=recurrence: its K)', metavar='INT', type=click.IntRange(min=2), default=64)
@option(DDN, '--max-channels',   help='Max feature channels per block (--arch=recurrence: the UNet\'s width)', metavar='INT', type=click.IntRange(min=4), default=256)
@option(DDN, '--start-size',     help='Resolution of the first block (power of two)', metavar='INT', type=click.IntRange(min=1), default=1)
@option(DDN, '--chain-dropout',  help='Probability that a layer takes random choices in a step', metavar='FLOAT', type=cli.FiniteFloatRange(min=0, max=1), default=0.05)
@option(DDN, '--learn-res',      help='Learning residual: candidates correct the previous choice', metavar='BOOL', type=bool, default=True)
@option(DDN, '--leak',           help='Leak feature of the chosen head into the next block', metavar='BOOL', type=bool, default=True)
@option(DDN, '--loss',           help='Loss and selection distance', type=click.Choice(['l2', 'l1']), default='l2')
@option(DDN, '--balance',        help='Node balancing after every step: Split-and-Prune with the total-variation test (tv) or the paper\'s thresholds (paper), a per-node selection bias (bias, nothing split), or none (the ablation)', type=click.Choice(list(BALANCE_METHODS)), default='tv')
@option(DDN, '--balance-halflife', help='Node statistics forget with this half-life, in targets per node (beyond the paper: a node that stops being chosen is pruned in a short run too); omit to sum the whole run (the paper\'s)', metavar='FLOAT', type=cli.FiniteFloatRange(min=0, min_open=True))
@option(DDN, '--bias-rate',      help='--balance=bias: step of the log-distance bias per training step', metavar='FLOAT', type=cli.FiniteFloatRange(min=0, min_open=True), default=1e-2)
@option(DDN, '--prior',          help='Prior over the codes, refreshed on the EMA network\'s codes of a fixed subset of training images before each snapshot and saved beside it (network-snapshot-*.prior.safetensors)', type=click.Choice(['none', 'frequency', 'transformer', 'mixture']), default='none')
@option(DDN, '--prior-images',   help='--prior: size of the fixed subset (the first images; the last 10% held out)', metavar='INT', type=click.IntRange(min=2), default=2000)
@option(DDN, '--prior-steps',    help='--prior=transformer: training steps per refresh (warm start)', metavar='INT', type=click.IntRange(min=0), default=300)
@option(DDN, '--condition',      help='Conditional training: the condition is fed into the network', metavar='class|color|edge|resizeN', type=str)

# Performance.
@option(PERF, '--precision',     help='Training precision (autocast; fp16 with loss scaling, CUDA only)', type=click.Choice(['fp32', 'bf16', 'fp16']), default='fp32')
@option(PERF, '--compile',       help='torch.compile the residual blocks (one graph per block shape; the DDLs stay eager)', metavar='BOOL', type=bool, default=False)
@option(PERF, '--channels-last', help='Channels-last layout for the convolutions', metavar='BOOL', type=bool, default=False)
@option(PERF, '--adam',          help='Adam implementation: auto = torch\'s choice (for-loop on CPU, foreach on CUDA; same results), fused = one kernel (faster, last-bit differences)', type=click.Choice(['auto', 'for-loop', 'foreach', 'fused']), default='auto')
@option(PERF, '--bench',         help='Enable cuDNN benchmarking', metavar='BOOL', type=bool, default=True)
@option(PERF, '--cache',         help='Cache dataset in CPU memory', metavar='BOOL', type=bool, default=True)
@option(PERF, '--workers',       help='DataLoader worker processes', metavar='INT', type=click.IntRange(min=0), default=1)
@cli.device_option(cls=GroupedOption, group=PERF)

# I/O.
@option(IO, '--desc',            help='String to include in result dir name', metavar='STR', type=str)
@option(IO, '--nosubdir',        help='Do not create a subdirectory for results', is_flag=True)
@option(IO, '--tick',            help='How often to print progress', metavar='KIMG', type=cli.FiniteFloatRange(min=0, min_open=True), default=50)
@option(IO, '--snap',            help='How often to save snapshots', metavar='TICKS', type=click.IntRange(min=1), default=50)
@option(IO, '--dump',            help='How often to dump state', metavar='TICKS', type=click.IntRange(min=1), default=500)
@option(IO, '--seed',            help='Random seed  [default: random, or the resumed state\'s]', metavar='INT', type=cli.seed_range())
@option(IO, '--transfer',        help='Initialise the weights from a network snapshot (.safetensors, .pkl or a run folder\'s newest)', metavar='FILE|DIR', type=str)
@option(IO, '--resume',          help='Resume from a training state, or a run folder\'s latest', metavar='PT|DIR', type=str)
@option(IO, '--metrics',         help='Metrics of every snapshot, e.g. fid50k,fid10k,kid10k,pr10k', metavar='LIST', type=str)
@option(IO, '--detector',        help='Detector of --metrics: inception, dinov2, clip, or a file or URL  [default: inception]', metavar='NAME|PATH', type=str)
@option(IO, '--trust-code', '--trust-pickle', 'trust_pickle', help='Let --transfer and --detector load a file that runs code (a pickle, a TorchScript detector other than the Inception); trusted files only', is_flag=True)
@option(IO, '-n', '--dry-run',   help='Print training options and exit', is_flag=True)

def main(**kwargs):
    """Train a Discrete Distribution Network (Yang, ICLR 2025) on a dataset, or on the built-in digits.

    Examples:

    \b
    # Built-in 16x16 digits on a 2-core CPU in about 4 minutes
    OMP_NUM_THREADS=1 python train.py --outdir=training-runs --duration=0.048 --batch=32 \\
        --lr=3e-3 --lr-rampup=2 --ema=0.002 --max-channels=32 --max-blockn=3 --max-outputk=64 --chain-dropout=0 \\
        --tick=4 --snap=4 --dump=4

    \b
    # CIFAR-10 as the reference run (FID 51.86): 8 GPUs, batch 2048
    torchrun --standalone --nproc_per_node=8 train.py --outdir=training-runs \\
        --data=datasets/cifar10-32x32.zip --batch-gpu=256 --batch=2048
    """
    opts = dnnlib.EasyDict(kwargs)
    with distributed.session():
        launch(opts)

# Validate the options, build the config `c`, create the run folder and train.
def launch(opts):
    world_size = distributed.get_world_size()
    condition = check_condition(opts)
    locks = lock_existing_folders(opts)     # One live run per folder: refused here, before any work.
    try:
        train_in_locked_folders(opts, condition, world_size, locks)
    finally:
        for lock in locks:
            lock.release()

# The rest of launch(), the run's folders locked (`locks` gets the lock of a new run folder too).
def train_in_locked_folders(opts, condition, world_size, locks):
    c = dnnlib.EasyDict()
    c.dataset_kwargs, dataset_info, dataset_name = dataset_config(opts, condition)
    c.data_loader_kwargs = dnnlib.EasyDict(pin_memory=True, num_workers=opts.workers, prefetch_factor=2)
    c.network_kwargs = network_config(opts, condition, dataset_info)
    c.update(optimizer_config(opts))
    c.update(training_config(opts, world_size))
    c.update(metrics_config(opts, condition))
    c.update(prior_config(opts, condition))
    start_kwargs, resumed_seed = transfer_resume_config(opts, c.network_kwargs, dataset_info, world_size)
    c.update(start_kwargs)
    c.seed = choose_seed(opts.seed, resumed_seed)
    c.run_dir = choose_run_dir(opts, c.get('resume_state'), dataset_name, world_size)
    locks += lock_folder(c.run_dir, '--outdir', opts.dry_run, held=locks)     # A new run folder.
    print_summary(c, dataset_info, world_size)
    if opts.dry_run:
        distributed.print0('Dry run; exiting.')
        return
    try:
        logger = open_run_dir(c)
    except OSError as err:      # A full or read-only disk: say so, and leave no empty run folder.
        if not opts.nosubdir and os.path.isdir(c.run_dir) and not holds_saved_work(c.run_dir):
            shutil.rmtree(c.run_dir, ignore_errors=True)
        raise cli.write_error(err, '--outdir', opts.outdir) from None
    run_training(c, opts.nosubdir, logger)

# The option clashes checked first: --cond=True (= --condition=class), --transfer with --resume -> the condition.
def check_condition(opts):
    if opts.cond and opts.condition not in (None, 'class'):
        raise click.UsageError(f'--cond=True (class labels) conflicts with --condition={opts.condition}')
    condition = 'class' if opts.cond else opts.condition
    if condition is not None:
        try:
            parse_condition(condition)
        except ValueError as err:
            raise click.UsageError(f'--condition: {err}') from None
    if opts.transfer is not None and opts.resume is not None:
        raise click.UsageError('--transfer and --resume cannot be used together')
    return condition

# Dataset config, opened now so that a bad --data fails before anything is written -> (kwargs, info, name).
def dataset_config(opts, condition):
    try:
        dataset_kwargs = dataset_module.dataset_kwargs_for(opts.data, use_labels=False, xflip=opts.xflip, cache=opts.cache)
        dataset_obj = dnnlib.util.construct_class_by_name(**dataset_kwargs)
    except (OSError, ValueError) as err:
        raise click.ClickException(f'--data: cannot use {opts.data or "the built-in digits"}: {err}') from None
    if condition == 'class':    # The images are fine (opened above); now the labels.
        dataset_kwargs.use_labels = True
        try:
            dataset_obj = dnnlib.util.construct_class_by_name(**dataset_kwargs)
        except ValueError as err:
            raise click.ClickException(f'--cond/--condition=class needs labels: {err}') from None
    dataset_kwargs.resolution = dataset_obj.resolution         # Be explicit about what the run used.
    return dataset_kwargs, run_files.dataset_meta(dataset_obj), dataset_obj.name

# Network config of --arch, validated on the meta device (nothing allocated).
def network_config(opts, condition, dataset_info):
    network_kwargs = dnnlib.EasyDict(
        img_resolution  = dataset_info['image_shape'][1],
        img_channels    = dataset_info['image_shape'][0],
        dropout         = opts.dropout,
        chain_dropout   = opts.chain_dropout,
        learn_residual  = opts.learn_res,
        leak            = opts.leak,
        loss_type       = opts.loss,
        condition       = condition,
        label_dim       = dataset_info['label_dim'] if condition == 'class' else 0,
    )
    if opts.arch == 'single-shot':
        network_kwargs.update(class_name='training.networks.DDNGenerator', start_size=opts.start_size,
            max_blockn=opts.max_blockn, max_outputk=opts.max_outputk, max_channels=opts.max_channels)
    else:
        network_kwargs.update(class_name='training.networks.DDNRecurrent', num_iters=opts.iters,
            outputk=opts.max_outputk, channels=opts.max_channels, levels=opts.levels, iter_embed=opts.iter_embed)
    try:
        with torch.device('meta'):
            dnnlib.util.construct_class_by_name(**network_kwargs)
    except ValueError as err:
        raise click.UsageError(f'Invalid network options: {err}') from None
    return network_kwargs

# Loss, optimizer (Adam of --adam) and node-balancing config.
def optimizer_config(opts):
    c = dnnlib.EasyDict()
    c.loss_kwargs = dnnlib.EasyDict(class_name='training.loss.DDNLoss')
    c.optimizer_kwargs = dnnlib.EasyDict(class_name='torch.optim.Adam', lr=opts.lr, betas=[0.9, 0.999], eps=1e-8)
    c.optimizer_kwargs.update(ADAM_IMPLEMENTATIONS[opts.adam])
    c.balance_kwargs = dnnlib.EasyDict(method=opts.balance)
    if opts.balance == 'bias':
        c.balance_kwargs.bias_rate = opts.bias_rate
    if opts.balance_halflife is not None:
        c.balance_kwargs.halflife = opts.balance_halflife
    return c

# Training and performance options: batch sizes, duration, EMA, precision, ticks, device, compile, layout.
def training_config(opts, world_size):
    if opts.batch_gpu is not None and opts.batch % (world_size * opts.batch_gpu) != 0:
        raise click.UsageError(f'--batch={opts.batch} must be divisible by processes x --batch-gpu = {world_size} x {opts.batch_gpu}')
    if opts.batch % world_size != 0:
        raise click.UsageError(f'--batch={opts.batch} must be divisible by the number of processes ({world_size})')
    c = dnnlib.EasyDict(batch_size=opts.batch, batch_gpu=opts.batch_gpu, total_kimg=opts.duration * 1000,
                        ema_halflife_kimg=opts.ema * 1000, lr_rampup_kimg=opts.lr_rampup, precision=opts.precision,
                        kimg_per_tick=opts.tick, snapshot_ticks=opts.snap, state_dump_ticks=opts.dump,
                        cudnn_benchmark=opts.bench, device=opts.device)
    c.update(compile=opts.compile, channels_last=opts.channels_last)
    if opts.precision == 'fp16' and distributed.pick_device(opts.device).type != 'cuda':
        raise click.UsageError('--precision=fp16 needs CUDA (loss scaling); use --precision=bf16 on the CPU')
    return c

# Metrics of the snapshots: check the names, and a local detector file, before a run folder exists.
def metrics_config(opts, condition):
    c = dnnlib.EasyDict()
    if opts.metrics:
        try:
            parse_training_metrics(opts.metrics)
        except ValueError as err:
            raise click.UsageError(f'--metrics: {err}') from None
        if condition not in (None, 'class'):
            raise click.UsageError(f'--metrics measures unconditional samples; a --condition={condition} network needs a condition image per sample')
        if opts.detector is not None and not (os.path.isfile(opts.detector) or dnnlib.util.is_url(opts.detector)
                                              or opts.detector in detectors.NAMED):
            raise click.UsageError(f'--detector: no such file: {opts.detector} (or name one of {", ".join(detectors.NAMED)}, or a URL)')
        if opts.detector is not None and os.path.isfile(opts.detector):
            try:
                detectors.load_detector(opts.detector, 'cpu', trust_pickle=opts.trust_pickle)
            except (OSError, ValueError, TypeError) as err:
                raise cli.click_error(err, '--detector') from None
        c.metrics = opts.metrics
        c.metric_kwargs = dnnlib.EasyDict(class_name='evaluation.snapshot_metrics.SnapshotMetrics', detector_url=opts.detector, trust_pickle=opts.trust_pickle)
    elif opts.detector is not None:
        raise click.UsageError('--detector is only used with --metrics')
    if opts.trust_pickle and opts.metrics is None and opts.transfer is None:
        raise click.UsageError('--trust-code is only used with --transfer or --metrics')
    return c

# The prior over the codes (training/prior_training.py), refreshed before each snapshot; none by default.
def prior_config(opts, condition):
    c = dnnlib.EasyDict()
    if opts.prior == 'none':
        for name in ('prior_images', 'prior_steps'):
            if opts[name] != PRIOR_DEFAULTS[name]:
                raise click.UsageError(f'--{name.replace("_", "-")} is only used with --prior')
        return c
    if condition is not None:
        raise click.UsageError(f'--prior: a prior over the codes applies to unconditional networks, not --condition={condition}')
    c.prior_kwargs = dnnlib.EasyDict(class_name='training.prior_training.PriorRefresh', kind=opts.prior, num_images=opts.prior_images)
    if opts.prior in ('transformer', 'mixture'):
        c.prior_kwargs.steps = opts.prior_steps
    elif opts.prior_steps != PRIOR_DEFAULTS['prior_steps']:
        raise click.UsageError('--prior-steps is only used with --prior=transformer or mixture')
    return c

# Defaults of the --prior options (a changed one without --prior is an error).
PRIOR_DEFAULTS = dict(prior_images=2000, prior_steps=300)

# Transfer learning and resume: check the files now, before a run folder exists -> (config, resumed seed).
# A state of another number of processes is refused: every process draws its own random numbers, so
# the run would not repeat.
def transfer_resume_config(opts, network_kwargs, dataset_info, world_size):
    c = dnnlib.EasyDict()
    resumed_seed = None
    if opts.transfer is not None:
        try:
            src = run_files.load_transfer_network(opts.transfer, opts.trust_pickle)
            with torch.device('meta'):      # The architecture of these options, compared without memory.
                target = dnnlib.util.construct_class_by_name(**network_kwargs)
            misc.copy_params_and_buffers(src.to('meta'), target, require_all=True)
        except KeyError as err:
            raise click.ClickException(f'--transfer {opts.transfer}: another architecture than these options build '
                                       f'({str(err).strip(chr(34) + chr(39))}); give the network options it was trained with') from None
        except (OSError, ValueError, RuntimeError) as err:
            raise cli.click_error(err, '--transfer') from None
        c.transfer_pkl = opts.transfer
        if opts.trust_pickle:
            c.trust_pickle = True
    if opts.resume is not None:
        c.resume_state = resolve_resume(opts.resume)
        try:
            state = run_files.load_training_state(c.resume_state, network_kwargs, dataset_info)
        except (OSError, ValueError, RuntimeError) as err:
            raise cli.click_error(err, '--resume') from None
        resumed_seed = int(state.get('seed', 0))
        if int(state.get('batch_size', opts.batch)) != opts.batch:
            raise click.UsageError(f'--batch={opts.batch}, but the training state {c.resume_state} was trained with '
                                   f'--batch={state["batch_size"]}; resume with that batch so the run repeats exactly')
        try:
            run_files.check_world_size(state, c.resume_state, world_size)
        except ValueError as err:
            raise click.ClickException(f'--resume: {err}') from None
    return c, resumed_seed

# Seed: given, else the resumed run's (so the continuation is exact), else random (same on all ranks).
def choose_seed(seed, resumed_seed):
    if seed is not None:
        return seed
    if resumed_seed is not None:
        return resumed_seed
    random_seed = torch.randint(1 << 31, size=[], dtype=torch.int64)
    distributed.broadcast_([random_seed])
    return int(random_seed)

# Run folder, chosen (not yet filled) by rank 0; every rank checks, so that all of them agree on an error.
def choose_run_dir(opts, resume_state, dataset_name, world_size):
    desc = opts.desc or f'gpus{world_size}-batch{opts.batch}-{opts.precision}'
    if os.path.exists(opts.outdir) and not os.path.isdir(opts.outdir):
        raise click.ClickException(f'--outdir: {opts.outdir} exists and is not a folder')
    if opts.nosubdir:
        run_dir = opts.outdir
        resuming_here = opts.resume is not None and \
            os.path.abspath(os.path.dirname(resume_state)) == os.path.abspath(run_dir)
        if holds_run(run_dir) and not resuming_here:
            raise click.ClickException(f'--nosubdir: {run_dir} already holds a training run; choose another --outdir, '
                                       f'or continue it in place with --resume={run_dir}')
        return run_dir
    if opts.dry_run:
        return next_run_dir(opts.outdir, f'{dataset_name}-{desc}')
    try:    # Reserved now by rank 0 (an atomic mkdir), then shared with the other ranks.
        run_dir = make_run_dir(opts.outdir, f'{dataset_name}-{desc}') if distributed.get_rank() == 0 else None
    except OSError as err:
        raise click.ClickException(f'--outdir: cannot create a run folder in {opts.outdir}: {err}') from None
    return distributed.broadcast_object(run_dir)

# Print the training options and a summary of the run (rank 0).
def print_summary(c, dataset_info, world_size):
    distributed.print0()
    distributed.print0('Training options:')
    distributed.print0(json.dumps(c, indent=2))
    distributed.print0()
    distributed.print0(f'Output directory:        {c.run_dir}')
    distributed.print0(f'Dataset:                 {c.dataset_kwargs.get("path", "built-in digits")} '
                       f'({dataset_info["num_images"]} images, {"x".join(map(str, dataset_info["image_shape"]))})')
    distributed.print0(f'Number of processes:     {world_size}')
    distributed.print0(f'Batch size:              {c.batch_size} ({c.batch_size // world_size} per process)')
    distributed.print0(f'Precision:               {c.precision}')
    distributed.print0()

# Create the run folder on rank 0 with training_options.json and log.txt -> the log (None on other ranks).
def open_run_dir(c):
    distributed.barrier()       # Every rank has chosen the same folder before rank 0 creates it.
    if distributed.get_rank() != 0:
        return None
    distributed.print0('Creating output directory...')
    os.makedirs(c.run_dir, exist_ok=True)
    checkpoint.remove_stale_temps(c.run_dir)    # Left by a killed run of this folder.
    options_path = os.path.join(c.run_dir, 'training_options.json')
    if not os.path.exists(options_path):    # Resuming in place keeps the original options.
        checkpoint.write_json(options_path, c)
    return dnnlib.util.Logger(file_name=os.path.join(c.run_dir, 'log.txt'), file_mode='a', should_flush=True)

# Train; a bad image met during training ends the run as a --data error (and drops a run folder left empty).
def run_training(c, nosubdir, logger):
    try:
        result = training_loop.training_loop(**c)
        if result is not None and result.stopped:     # A stop signal: the state is saved.
            distributed.print0(f'To continue, run the same command with --resume={c.run_dir}')
    except dataset_module.DatasetError as err:     # Name the image, no traceback.
        message = str(err).strip().splitlines()[-1]
        if logger is not None:
            logger.close()
            logger = None
            if not nosubdir and not holds_saved_work(c.run_dir):
                shutil.rmtree(c.run_dir, ignore_errors=True)    # Nothing worth keeping was written.
        raise click.ClickException(f'--data: {message.removeprefix("training.dataset.DatasetError: ")}') from None
    except training_loop.TrainingDiverged as err:
        raise click.ClickException(f'{err}\nResume from the last good state with --resume={c.run_dir} (and a lower --lr).') from None
    except OSError as err:
        if err.errno not in (errno.ENOSPC, errno.EROFS, errno.EDQUOT):
            raise
        raise cli.write_error(err, '--outdir', c.run_dir) from None     # The snapshots written so far stay.
    finally:
        if logger is not None:
            logger.close()

# ----------------------------------------------------------------------------

if __name__ == '__main__':
    main()

# ----------------------------------------------------------------------------
