"""Small PyTorch helpers for the training loop: a resumable infinite sampler, deterministic per-step
seeding, parameter copying, cross-rank consistency checks and a module summary.

Randomness here never touches Python's `random` or NumPy's global state: the sampler draws from a
`torch.Generator` seeded from (seed, epoch), and `set_seed_for_step` derives the global torch seed
and a private generator from (seed, rank, step). A run resumed at step N therefore sees exactly the
data order and random numbers of an uninterrupted run.
"""

import re
import signal

import numpy as np
import torch

from . import distributed

# Domain tags mixed into derived seeds, so the sampler's and the training step's streams differ
# even when they are derived from the same user seed.
_SAMPLER_SEED_TAG = 0x5A4D504C
_STEP_SEED_TAG = 0x53544550

# ----------------------------------------------------------------------------
# Mix integers into well-spread 64-bit seeds (NumPy's SeedSequence hash; no global RNG involved).

def _mix_seeds(*values, num_seeds=1):
    for value in values:
        if int(value) < 0:
            raise ValueError(f'Seeds, ranks and steps must be non-negative integers, got {value!r}')
    state = np.random.SeedSequence([int(value) for value in values]).generate_state(num_seeds, np.uint64)
    return [int(seed) for seed in state]

# ----------------------------------------------------------------------------
# Endless, rank-strided, per-epoch reshuffled stream of dataset indices that can resume mid-epoch.

class InfiniteSampler(torch.utils.data.Sampler):
    """Infinite sampler over `range(dataset_size)`.

    All ranks share one *global* stream of indices: epoch e is a permutation of the dataset drawn
    from a `torch.Generator` seeded by (seed, e) (or the identity order with `shuffle=False`), and
    epochs follow each other without end. Rank r takes global positions r, r + num_replicas,
    r + 2 * num_replicas, ... so one step of all ranks together consumes consecutive positions.

    `start_idx` is measured in *global samples already drawn* by all ranks together (the training
    loop's `cur_nimg`): a run resumed with `start_idx=cur_nimg` continues the global stream exactly
    where the interrupted run left it, whatever the number of ranks, as long as each step draws a
    multiple of `num_replicas` samples.
    """

    def __init__(self,
        dataset_size_or_dataset,    # Number of items, or an object with len() (e.g. a Dataset).
        rank            = 0,        # Rank of this process.
        num_replicas    = 1,        # Number of processes sharing the stream.
        shuffle         = True,     # Reshuffle every epoch; False cycles through 0, 1, 2, ... in order.
        seed            = 0,        # Seed of the per-epoch permutations.
        start_idx       = 0,        # Global samples already drawn (resume point), see the docstring.
    ):
        super().__init__()
        size = dataset_size_or_dataset if isinstance(dataset_size_or_dataset, int) else len(dataset_size_or_dataset)
        if size <= 0:
            raise ValueError(f'InfiniteSampler needs a non-empty dataset, got size {size}')
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(f'Invalid rank {rank} for num_replicas {num_replicas}')
        if start_idx < 0:
            raise ValueError(f'start_idx must be non-negative, got {start_idx}')
        self.dataset_size = size
        self.rank = rank
        self.num_replicas = num_replicas
        self.shuffle = shuffle
        self.seed = seed
        self.start_idx = start_idx

    # Global order of the dataset indices in epoch `epoch` (a permutation of range(dataset_size)).
    def epoch_order(self, epoch):
        if not self.shuffle:
            return list(range(self.dataset_size))
        generator = torch.Generator()
        generator.manual_seed(_mix_seeds(_SAMPLER_SEED_TAG, self.seed, epoch)[0])
        return torch.randperm(self.dataset_size, generator=generator).tolist()

    # Yield this rank's indices forever, starting at global position start_idx + rank.
    def __iter__(self):
        position = self.start_idx + self.rank
        epoch, order = None, None
        while True:
            position_epoch, offset = divmod(position, self.dataset_size)
            if position_epoch != epoch:
                epoch, order = position_epoch, self.epoch_order(position_epoch)
            yield order[offset]
            position += self.num_replicas

# ----------------------------------------------------------------------------
# DataLoader workers leave stopping to the main process. A scheduler (SLURM, Kubernetes) and a
# terminal's Ctrl+C signal every process of the job or process group, workers included; a worker
# killed by the signal makes the DataLoader raise in the main process (from its SIGCHLD handler, at
# any point, even inside a dump) before the main process could save. Workers started with this
# `worker_init_fn` ignore the stop signals; they still end when the main process closes the loader
# or dies (torch's workers watch their parent).

WORKER_IGNORED_SIGNALS = tuple(getattr(signal, name) for name in ('SIGTERM', 'SIGUSR1', 'SIGINT') if hasattr(signal, name))

def ignore_stop_signals_in_worker(_worker_id=None):
    for sig in WORKER_IGNORED_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)

# ----------------------------------------------------------------------------
# Seed everything for one training step from (seed, rank, step); returns a private generator too.

def set_seed_for_step(seed, rank, step, device=None):
    """Make step `step` of rank `rank` deterministic, whatever happened before it.

    Seeds torch's global RNG (CPU and all CUDA devices: dropout, default `torch.randn`) and returns
    a fresh `torch.Generator` on `device` (default CPU) with an independent seed, for draws that
    should not depend on how many global-RNG calls the model makes. Both are pure functions of
    (seed, rank, step), so a resumed run repeats an uninterrupted one exactly.
    """
    global_seed, generator_seed = _mix_seeds(_STEP_SEED_TAG, seed, rank, step, num_seeds=2)
    torch.manual_seed(global_seed)
    generator = torch.Generator(device=device if device is not None else 'cpu')
    generator.manual_seed(generator_seed)
    return generator

# ----------------------------------------------------------------------------
# All parameters followed by all buffers of a module.

def params_and_buffers(module):
    return list(module.parameters()) + list(module.buffers())

# ----------------------------------------------------------------------------
# (name, tensor) pairs of all parameters followed by all buffers of a module.

def named_params_and_buffers(module):
    return list(module.named_parameters()) + list(module.named_buffers())

# ----------------------------------------------------------------------------
# Copy parameters and buffers by name from src_module into dst_module (e.g. resume, or EMA init).

@torch.no_grad()
def copy_params_and_buffers(src_module, dst_module, require_all=False):
    src_tensors = dict(named_params_and_buffers(src_module))
    for name, tensor in named_params_and_buffers(dst_module):
        if name not in src_tensors:
            if require_all:
                raise KeyError(f'copy_params_and_buffers: {name!r} is missing in the source module')
            continue
        src = src_tensors[name]
        if src.shape != tensor.shape:
            raise ValueError(f'copy_params_and_buffers: {name!r} has shape {tuple(src.shape)} in the source '
                             f'but {tuple(tensor.shape)} in the destination')
        # copy_ converts device and dtype and keeps the destination's requires_grad.
        tensor.copy_(src.detach())

# ----------------------------------------------------------------------------
# Assert that every parameter and buffer is identical on all ranks (no-op for one process).

@torch.no_grad()
def check_ddp_consistency(module, ignore_regex=None):
    """Raise AssertionError, on every rank, naming the tensors that differ between ranks.

    Names are `<ClassName>.<param/buffer name>`; those fully matching `ignore_regex` are skipped.
    Rank 0's tensors are broadcast in one buffer per dtype (memory stays 1x the model, unlike an
    all-gather) and the per-tensor verdicts are then max-reduced, so all ranks agree and raise together.
    """
    if distributed.get_world_size() == 1:
        return
    names, local = [], []
    for name, tensor in named_params_and_buffers(module):
        full_name = f'{type(module).__name__}.{name}'
        if ignore_regex is not None and re.fullmatch(ignore_regex, full_name):
            continue
        tensor = tensor.detach()
        # NaN != NaN; compare NaN-free copies so equal NaNs count as equal.
        names.append(full_name)
        local.append(torch.nan_to_num(tensor) if tensor.is_floating_point() else tensor.clone())
    if not names:
        return
    reference = [tensor.clone() for tensor in local]
    distributed.broadcast_(reference, src=0)
    dev = distributed.device()
    differs = torch.stack([(a != b).any().to(dev) for a, b in zip(local, reference, strict=True)]).to(torch.int32)
    distributed.all_reduce_([differs], op='max')
    bad = [name for name, flag in zip(names, differs.cpu().tolist(), strict=True) if flag]
    if bad:
        raise AssertionError(f'Tensors differ across ranks: {", ".join(bad)}')

# ----------------------------------------------------------------------------
# Run one forward pass and print a table of submodules: parameters, buffers, output shapes, dtypes.

def print_module_summary(module, inputs, max_nesting=3, skip_redundant=True, kwargs=None):
    """Print the module tree as exercised by `module(*inputs)` and return the forward's outputs.

    Each parameter and buffer is counted once, by the innermost module that owns it. Modules
    deeper than `max_nesting` are folded into their parents; with `skip_redundant`, rows that add
    no parameters, buffers or new output tensors are left out, and a module called several times
    (weights shared across layers) gets a row for its first call only, marked with the call count.
    """
    if not isinstance(inputs, (tuple, list)):
        raise TypeError('inputs must be a tuple or list of positional arguments')
    entries = []
    depth = [0]

    # Track the call depth, so only modules up to max_nesting get a row.
    def pre_hook(_mod, _args):
        depth[0] += 1

    # Record the module and the tensors it returned (tuples, named tuples and dicts are searched).
    def post_hook(mod, _args, outputs):
        depth[0] -= 1
        if depth[0] <= max_nesting:
            values = outputs.values() if isinstance(outputs, dict) else outputs if isinstance(outputs, (tuple, list)) else [outputs]
            entries.append((mod, [t for t in values if isinstance(t, torch.Tensor)]))

    hooks = [m.register_forward_pre_hook(pre_hook) for m in module.modules()]
    hooks += [m.register_forward_hook(post_hook) for m in module.modules()]
    try:
        with torch.no_grad():
            outputs = module(*inputs, **(kwargs or {}))
    finally:
        for hook in hooks:
            hook.remove()

    # Hooks fire children first, so the innermost module claims each tensor.
    names = {id(mod): name or '<top-level>' for name, mod in module.named_modules()}
    calls = {}
    for mod, _outs in entries:
        calls[id(mod)] = calls.get(id(mod), 0) + 1
    listed = set()
    seen = set()
    rows = [['Module', 'Parameters', 'Buffers', 'Output shape', 'Datatype'], ['---'] * 5]
    total_params = total_buffers = 0
    for mod, outs in entries:
        params = [t for t in mod.parameters() if id(t) not in seen]
        buffers = [t for t in mod.buffers() if id(t) not in seen]
        new_outs = [t for t in outs if id(t) not in seen]
        seen.update(id(t) for t in params + buffers + new_outs)
        if skip_redundant and (id(mod) in listed or not (params or buffers or new_outs)):
            continue
        listed.add(id(mod))
        name = names.get(id(mod), type(mod).__name__)
        if calls[id(mod)] > 1:
            name += f' (x{calls[id(mod)]})'
        num_params = sum(t.numel() for t in params)
        num_buffers = sum(t.numel() for t in buffers)
        total_params += num_params
        total_buffers += num_buffers
        out_rows = new_outs or [None]
        for i, out in enumerate(out_rows):
            rows.append([
                name + ('' if i == 0 else f':{i}'),
                (str(num_params) if num_params else '-') if i == 0 else '',
                (str(num_buffers) if num_buffers else '-') if i == 0 else '',
                str(list(out.shape)) if out is not None else '-',
                str(out.dtype).split('.')[-1] if out is not None else '-',
            ])
    rows += [['---'] * 5, ['Total', str(total_params), str(total_buffers), '', '']]
    widths = [max(len(row[col]) for row in rows) for col in range(5)]
    print()
    for row in rows:
        print('  '.join(cell + ' ' * (width - len(cell)) for cell, width in zip(row, widths, strict=True)).rstrip())
    print()
    return outputs
