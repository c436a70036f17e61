"""Multi-process helpers: the same script runs under `torchrun --nproc_per_node=N` or as one process.

`init()` reads torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) and
joins the process group: NCCL when CUDA is available, gloo otherwise (so multi-process runs and their
tests also work on CPU). Without torchrun, or with one process, nothing is initialised and every
collective below is a no-op, so callers never branch on "am I distributed?".

Collectives take a *list* of tensors and pack each dtype group into one flat buffer: statistics of
many layers cost one communication (and at most one host round trip), not one per tensor.
"""

import contextlib
import os
import sys

import torch

# Reduction names accepted by all_reduce_.
_REDUCE_OPS = ('sum', 'max', 'min')

# ----------------------------------------------------------------------------
# Join the process group described by torchrun's environment; does nothing for a single process.

def init():
    if is_initialized():
        return
    world_size = int(os.environ.get('WORLD_SIZE', '1'))
    if world_size <= 1:
        return
    missing = [name for name in ('RANK', 'LOCAL_RANK', 'MASTER_ADDR', 'MASTER_PORT') if name not in os.environ]
    if missing:
        raise RuntimeError(f'WORLD_SIZE={world_size} but {", ".join(missing)} not set: launch with '
                           'torchrun (which sets them), or unset WORLD_SIZE for one process')
    if not torch.distributed.is_available():
        raise RuntimeError('WORLD_SIZE > 1 but this PyTorch build has no torch.distributed support')
    kwargs = {}
    if torch.cuda.is_available() and torch.distributed.is_nccl_available():
        # Each process owns the GPU of its local rank; binding it here makes NCCL use it too.
        torch.cuda.set_device(get_local_rank())
        kwargs.update(backend='nccl', device_id=torch.device('cuda', get_local_rank()))
    else:
        kwargs.update(backend='gloo')
    torch.distributed.init_process_group(init_method='env://', **kwargs)

# ----------------------------------------------------------------------------
# Leave the process group at the end of a run; no-op if alone. After a successful run (`clean=True`)
# all ranks meet at a barrier first: a rank that tears down gloo while a peer still uses the
# connection can make that peer abort at interpreter exit ("terminate called without an active
# exception"). After a failure the barrier is skipped, since the other ranks may never reach it.

def shutdown(clean=True):
    if not is_initialized():
        return
    if clean:
        barrier()
    torch.distributed.destroy_process_group()

# ----------------------------------------------------------------------------
# `with distributed.session(): ...` wraps the whole of a command-line program: it joins the process
# group for the body. If the body raises, the group is torn down at once (no barrier: the other
# ranks may never reach it) and the exception propagates. If the body returns in a multi-process
# run, all ranks meet at a barrier and the process ENDS there, with os._exit(0) after flushing
# stdout and stderr, without running C++ destructors. Tearing gloo down in a finished process
# intermittently aborted one rank ("terminate called without an active exception", SIGABRT; a few
# two-process train runs in a hundred on a busy CPU machine, even after a barrier), which turns a finished
# run into a failed torchrun job. Every file our programs write is closed before this point, and
# after the barrier no collective is pending, so nothing is lost. A single process returns normally.

@contextlib.contextmanager
def session():
    init()
    try:
        yield
    except BaseException:
        shutdown(clean=False)
        raise
    if is_initialized():
        barrier()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)

# ----------------------------------------------------------------------------
# True once init() has joined a process group of more than one process.

def is_initialized():
    return torch.distributed.is_available() and torch.distributed.is_initialized()

# ----------------------------------------------------------------------------
# Global rank of this process (0 when single-process).

def get_rank():
    return torch.distributed.get_rank() if is_initialized() else 0

# ----------------------------------------------------------------------------
# Number of processes (1 when single-process).

def get_world_size():
    return torch.distributed.get_world_size() if is_initialized() else 1

# ----------------------------------------------------------------------------
# Rank of this process on its machine, i.e. which GPU it owns (torchrun's LOCAL_RANK, else 0).

def get_local_rank():
    return int(os.environ.get('LOCAL_RANK', '0'))

# ----------------------------------------------------------------------------
# The device this process computes on: its own GPU if CUDA is available, else the CPU.

def device():
    if torch.cuda.is_available():
        return torch.device('cuda', get_local_rank() % torch.cuda.device_count())
    return torch.device('cpu')

# ----------------------------------------------------------------------------
# The one `--device` convention of every script: None or 'auto' = `device()`; 'cpu'; 'cuda' = this
# process's own GPU (its local rank); 'cuda:N', 'mps' as torch spells them. Raises ValueError with
# the reason (not a device name, or CUDA / MPS missing on this machine).

def pick_device(name=None):
    if name is None or name == 'auto':
        return device()
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError):
        raise ValueError(f'{name!r} is not a device (expected auto, cpu, cuda, cuda:N or mps)') from None
    if dev.type == 'cuda':
        if not torch.cuda.is_available():
            raise ValueError(f'{name!r}: CUDA is not available on this machine')
        if dev.index is None:
            dev = torch.device('cuda', get_local_rank() % torch.cuda.device_count())
        elif dev.index >= torch.cuda.device_count():
            raise ValueError(f'{name!r}: this machine has {torch.cuda.device_count()} CUDA device(s)')
    elif dev.type == 'mps' and not (getattr(torch.backends, 'mps', None) and torch.backends.mps.is_available()):
        raise ValueError(f'{name!r}: MPS is not available on this machine')
    return dev

# ----------------------------------------------------------------------------
# print() on rank 0 only, so N processes do not print N copies of every line.

def print0(*args, **kwargs):
    if get_rank() == 0:
        print(*args, **kwargs)

# ----------------------------------------------------------------------------
# Wait until every process reaches this point.

def barrier():
    if not is_initialized():
        return
    if torch.distributed.get_backend() == 'nccl':
        torch.distributed.barrier(device_ids=[torch.cuda.current_device()])
    else:
        torch.distributed.barrier()

# ----------------------------------------------------------------------------
# Device on which collective buffers must live: NCCL only moves CUDA tensors, gloo works on the CPU.

def _comm_device():
    if torch.distributed.get_backend() == 'nccl':
        return torch.device('cuda', torch.cuda.current_device())
    return torch.device('cpu')

# ----------------------------------------------------------------------------
# Group tensors by dtype, keeping their order, so each group can share one flat buffer.

def _group_by_dtype(tensors):
    if isinstance(tensors, torch.Tensor):
        tensors = [tensors]
    groups = {}
    for tensor in tensors:
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f'Expected a list of tensors, got an element of type {type(tensor).__name__}')
        groups.setdefault(tensor.dtype, []).append(tensor)
    return groups

# ----------------------------------------------------------------------------
# Pack a dtype group into one contiguous buffer on the communication device.

def _pack(group):
    comm = _comm_device()
    flat = torch.cat([t.detach().reshape(-1).to(comm) for t in group])
    # Not every backend moves bool tensors; uint8 carries the same values (copied back as bool).
    return flat.to(torch.uint8) if flat.dtype == torch.bool else flat

# ----------------------------------------------------------------------------
# Copy a packed buffer back into the tensors it came from (each keeps its device and shape), with
# one multi-tensor copy rather than one copy per tensor.

@torch.no_grad()
def _unpack_(flat, group):
    parts = flat.split([tensor.numel() for tensor in group])
    torch._foreach_copy_(list(group), [part.view(tensor.shape) for part, tensor in zip(parts, group)])

# ----------------------------------------------------------------------------
# In-place all-reduce of a list of tensors: one collective per dtype, results copied back.

def all_reduce_(tensors, op='sum'):
    """Reduce every tensor in `tensors` across processes, in place; returns the list.

    `op` is 'sum', 'max' or 'min'. Tensors of the same dtype are flattened into ONE buffer and
    reduced with ONE collective. Single process: no-op.
    """
    if op not in _REDUCE_OPS:
        raise ValueError(f'op must be one of {_REDUCE_OPS}, got {op!r}')
    groups = _group_by_dtype(tensors)
    if get_world_size() > 1:
        for group in groups.values():
            flat = _pack(group)
            torch.distributed.all_reduce(flat, op=getattr(torch.distributed.ReduceOp, op.upper()))
            _unpack_(flat, group)
    return tensors

# ----------------------------------------------------------------------------
# In-place broadcast of a list of tensors from rank `src`: one collective per dtype.

def broadcast_(tensors, src=0):
    if get_world_size() > 1:
        for group in _group_by_dtype(tensors).values():
            flat = _pack(group)
            torch.distributed.broadcast(flat, src=src)
            _unpack_(flat, group)
    return tensors

# ----------------------------------------------------------------------------
# Gathering results of different sizes, once per evaluation or generation run (not per step):
# feature rows of a strided share, and small Python objects (names, grids, results dicts).

# Every rank's rows of `x` (N_r, ...), interleaved: row i of rank r lands at i * W + r, so a strided
# split (rank r took items r, r + W, ...) comes back in its original order. Shares may differ in
# length by any amount (they are padded to the longest for the collective). Returned on x's device.
def all_gather_rows(x):
    world = get_world_size()
    if world == 1:
        return x
    comm = _comm_device()
    counts = [torch.zeros([1], dtype=torch.int64, device=comm) for _ in range(world)]
    torch.distributed.all_gather(counts, torch.tensor([x.shape[0]], dtype=torch.int64, device=comm))
    counts = torch.cat(counts).cpu()
    padded = x.new_zeros((int(counts.max()),) + tuple(x.shape[1:]), device=comm)
    padded[:x.shape[0]] = x.to(comm)
    parts = [torch.empty_like(padded) for _ in range(world)]
    torch.distributed.all_gather(parts, padded)
    valid = (torch.arange(padded.shape[0])[:, None] < counts[None, :]).flatten()
    return torch.stack(parts, dim=1).flatten(0, 1)[valid.to(comm)].to(x.device)

# The picklable `obj` of every rank, as a list on rank `dst` (None on the other ranks).
def gather_object(obj, dst=0):
    if get_world_size() == 1:
        return [obj]
    parts = [None] * get_world_size() if get_rank() == dst else None
    torch.distributed.gather_object(obj, parts, dst=dst)
    return parts

# Rank `src`'s picklable `obj` on every rank.
def broadcast_object(obj, src=0):
    if get_world_size() == 1:
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=src)
    return box[0]

# ----------------------------------------------------------------------------
# Host-side collectives for small values read on the host every step (a stop request): a gloo
# group beside the main one, so with NCCL they still move no device memory and sync no stream.

def new_host_group():
    return torch.distributed.new_group(backend='gloo') if get_world_size() > 1 else None

# The maximum of an integer over all ranks, through a group from new_host_group() (None: this value).
def host_max(value, group):
    if group is None:
        return int(value)
    t = torch.tensor([int(value)], dtype=torch.int64)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX, group=group)
    return int(t)

# DDP communication hook: SUM a bucket of gradients over ranks (DDP's default averages), async.
def allreduce_sum_hook(process_group, bucket):
    work = torch.distributed.all_reduce(bucket.buffer(), group=process_group, async_op=True)
    return work.get_future().then(lambda fut: fut.value()[0])
