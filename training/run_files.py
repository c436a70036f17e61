"""The files of a training run, and reading them back for resume and transfer.

Rank 0 writes, always through a temporary file and a rename (a killed job leaves no truncated file):
- per snapshot: `network-snapshot-<tag>.pkl` (EDM's pickle: the EMA network, the loss, the options),
  the same network as `.safetensors` (loads without running code), `samples-<tag>.png` and
  `node-usage-<tag>.png` (training/pictures.py);
- per state dump (and on a stop signal): `training-state-<tag>.pt`, state dicts and counters for
  an exact resume;
- per tick: a `stats.jsonl` line.
File names come from `training.snapshot` (STATE_PATTERN, SNAPSHOT_PATTERN, ...) and `file_tag`.
`RunProgress` is where a run stands; a training state records it and `resume` restores it.
"""

import dataclasses
import json
import os
import time

import torch

from torch_utils import checkpoint, distributed, misc
from training import snapshot as snapshot_io
from training.images import save_png
from training.pictures import node_usage_plot, sample_grid
from training.split_prune import find_node_sets

# ----------------------------------------------------------------------------
# What a training state must agree on to be resumed: the network and the dataset.

def dataset_meta(dataset_obj):
    return dict(name=dataset_obj.name, image_shape=list(dataset_obj.image_shape),
                label_dim=int(dataset_obj.label_dim), num_images=len(dataset_obj))

# Canonical JSON of a config (tuples become lists, keys sorted), for comparison.
def _canonical(obj):
    return json.loads(json.dumps(obj, sort_keys=True))

# The arguments of a training_loop() call as plain JSON-able values (what training_options.json holds).
def canonical_options(args):
    return json.loads(json.dumps(args, default=str))

# Load a training state and check that it belongs to this configuration. Raises ValueError with
# a message naming every difference (and FileNotFoundError / RuntimeError for unreadable files).
def load_training_state(path, network_kwargs, dataset_info):
    state = snapshot_io.load_state(path)    # torch.load(weights_only=True): a state runs no code.
    if not isinstance(state, dict) or 'net' not in state or 'config' not in state:
        raise ValueError(f'{path} is not a ddn training state (training-state-*.pt); '
                         'a network snapshot (.pkl) starts a run as its transfer network instead (transfer_pkl)')
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

# Copy the weights of a snapshot network into `net` (same architecture required) and forget
# its node statistics: they describe another run's data.
@torch.no_grad()
def transfer_weights(src, net):
    try:
        misc.copy_params_and_buffers(src, net, require_all=True)
    except (KeyError, ValueError) as err:
        raise ValueError(f'the transfer network does not match this network: {err}') from None
    for ns in find_node_sets(net):
        ns.node_stats.reset()

# A state written by another number of processes cannot be resumed exactly: every rank draws its own
# random numbers (seeded from seed, rank, step), so the same step of N and of M processes differs.
# States older than this check record no world size and are accepted with a warning.
def check_world_size(state, path, world_size):
    saved = state.get('world_size')
    if saved is None:
        distributed.print0(f'WARNING: {path} does not record how many processes wrote it; the resumed run repeats '
                           'the interrupted one only with the same number of processes')
    elif int(saved) != world_size:
        raise ValueError(f'Training state {path} was written by {saved} process(es), this run has {world_size}: '
                         'each process draws its own random numbers, so the resumed run would not repeat the interrupted one; '
                         f'resume it with {saved} process(es)')

# The training state to resume from (None: a new run), checked against this configuration, batch
# size and number of processes.
def read_resume_state(resume_state, network_kwargs, dataset_info, batch_size, world_size=1):
    if resume_state is None:
        return None
    state = load_training_state(resume_state, network_kwargs, dataset_info)
    if int(state.get('batch_size', batch_size)) != batch_size:
        raise ValueError(f'Training state {resume_state} was trained with batch_size {state["batch_size"]}, not {batch_size}: '
                         'the resumed run would not repeat the interrupted one')
    check_world_size(state, resume_state, world_size)
    return state

# ----------------------------------------------------------------------------
# Where a run stands. Every rank keeps the same counters and takes the same decisions.

@dataclasses.dataclass
class RunProgress:
    cur_nimg:           int = 0     # Images seen, all ranks together.
    cur_tick:           int = 0     # The tick in progress.
    tick_start_nimg:    int = 0     # cur_nimg where the tick in progress started.
    last_tag_kimg:      int = -1    # kimg of the newest file name of this run (see file_tag).

    # Name tag of the files written now (see file_tag); this kimg is then taken.
    def take_tag(self):
        tag = file_tag(self.cur_nimg, self.last_tag_kimg)
        self.last_tag_kimg = self.cur_nimg // 1000
        return tag

# Continue from a training state: weights, EMA, optimizer and loss scaler of `step_fn` (a
# TrainingStep); returns the RunProgress the state records.
def resume(state, path, step_fn):
    distributed.print0(f'Resuming from "{path}" at kimg {state["cur_nimg"] / 1e3:.3f}...')
    step_fn.net.load_state_dict(state['net'])
    if step_fn.ema is not step_fn.net:
        step_fn.ema.load_state_dict(state['ema'] if state.get('ema') is not None else state['net'])
    step_fn.optimizer.load_state_dict(state['optimizer'])
    if state.get('scaler') and step_fn.scaler.is_enabled():
        step_fn.scaler.load_state_dict(state['scaler'])
    # The state records the last finished tick; the next one starts where it left off (a state
    # written on a stop signal, mid-tick, also records where that tick started).
    cur_nimg = int(state['cur_nimg'])
    return RunProgress(cur_nimg=cur_nimg, cur_tick=int(state.get('next_tick', int(state['cur_tick']) + 1)),
                       tick_start_nimg=int(state.get('tick_start_nimg', cur_nimg)),
                       last_tag_kimg=int(state.get('last_tag_kimg', cur_nimg // 1000)))

# ----------------------------------------------------------------------------
# Writing (rank 0).

# Snapshot `tag`: the sample grid (conditions `grid_cond`) and node-usage plot of `snapshot` (the
# EMA network, a copy; with its usage on data `data_usage`, a code_usage dict, if given), then the
# network as a pickle with `contents` (loss_fn, dataset_kwargs, network_kwargs, training_options)
# and, beside it, in the safe format. The network goes to the CPU
# for the files and comes back to its device.
def save_snapshot(run_dir, tag, snapshot, grid_cond, training_options, data_usage=None, **contents):
    device = next(snapshot.parameters()).device
    save_png(sample_grid(snapshot, **grid_cond), os.path.join(run_dir, f'samples-{tag}.png'))
    save_png(node_usage_plot(snapshot, data_usage), os.path.join(run_dir, f'node-usage-{tag}.png'))
    data = dict(ema=snapshot.cpu(), **contents, training_options=training_options)
    checkpoint.save_atomic(data, os.path.join(run_dir, snapshot_io.run_file(snapshot_io.SNAPSHOT_PATTERN, tag)), mode='pickle')
    snapshot_io.save_network_safe(data['ema'], os.path.join(run_dir, snapshot_io.run_file(snapshot_io.SAFE_SNAPSHOT_PATTERN, tag)),
                                  extra_metadata=dict(training_options=training_options))
    del data
    snapshot.to(device)

# The sample grid of `snapshot` with its codes drawn through `prior` (the seeds of samples-{tag}.png),
# written beside the snapshot's prior file.
def save_prior_samples(run_dir, tag, snapshot, prior):
    save_png(sample_grid(snapshot, prior=prior), os.path.join(run_dir, f'prior-samples-{tag}.png'))

# A training state for exact resume: the state dicts of `step_fn` (net, EMA, optimizer, loss scaler),
# the next tick and where it starts. No RNG state: every step seeds itself from (seed, rank, step).
# Resume reads `seed` (train.py's default --seed) and checks `batch_size`, `world_size` (the number of
# processes) and `config` (network_kwargs and dataset_meta). Returns the path.
def save_state(run_dir, tag, step_fn, progress, next_tick, tick_start_nimg, seed, batch_size, config, world_size=1):
    net, ema = step_fn.net, step_fn.ema
    state = dict(
        net=net.state_dict(),
        ema=None if ema is net else ema.state_dict(),
        optimizer=step_fn.optimizer.state_dict(),
        scaler=step_fn.scaler.state_dict() if step_fn.scaler.is_enabled() else None,
        cur_nimg=progress.cur_nimg, cur_tick=next_tick - 1, next_tick=next_tick, tick_start_nimg=tick_start_nimg,
        last_tag_kimg=progress.last_tag_kimg,
        seed=seed, batch_size=batch_size, world_size=world_size,
        config=config,
    )
    path = os.path.join(run_dir, snapshot_io.run_file(snapshot_io.STATE_PATTERN, tag))
    checkpoint.save_atomic(state, path, mode='torch')
    return path

# One line of stats.jsonl: the statistics of a tick and the time.
def append_stats(run_dir, stats):
    checkpoint.append_line(os.path.join(run_dir, 'stats.jsonl'), json.dumps(dict(stats, timestamp=time.time())))
