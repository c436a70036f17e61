"""A prior over the codes, trained by the training loop beside the DDN (train.py `--prior`).

Codes move as the network trains, so the prior is refreshed before each snapshot on the codes of the
snapshot's own (EMA) network: `PriorRefresh.refresh(snapshot)` encodes a fixed subset of the training
images (the first `num_images`; its last `held_out` share is held out), trains the prior `steps`
more steps with cross-entropy (the first refresh starts from the per-layer frequencies, later ones
from the previous refresh; early-stopped on the last 10% of the subset's training part), and returns the figures that go to stats.jsonl and the log: held-out bits per image of the
prior, of the per-layer frequency baseline and of uniform codes, the share of sampled code sequences
equal to a training code, and the seconds it took. `save(path)` writes it beside the snapshot
(`network-snapshot-<tag>.prior.safetensors`, training/prior.py), where generate.py `--prior=auto`
finds it. A resumed run warm-starts from the newest such file of its run folder.

Only rank 0 refreshes and writes (the prior never touches the network or its gradients). Each refresh
draws its batches from a generator seeded by (seed, images seen), so a resumed run repeats it.
"""

import os
import time

import torch

from training import prior as prior_lib
from training import snapshot as snapshot_io

class PriorRefresh:
    def __init__(self,
        dataset,                    # The training set (uint8 CHW images).
        ks,                         # K of each layer of the network.
        device,                     # Where the prior trains.
        kind        = 'transformer',# 'transformer' or 'frequency' (training/prior.py PRIOR_KINDS).
        num_images  = 2000,         # Size of the fixed subset of training images (the first ones).
        held_out    = 0.1,          # Share of the subset held out (its last images).
        steps       = 300,          # Training steps per refresh (transformer).
        batch       = 128,          # Codes per step.
        lr          = 1e-3,         # AdamW learning rate.
        weight_decay= 0.1,          # AdamW weight decay.
        seed        = 0,            # Seed of the initial weights and of each refresh's batches.
        replay_samples = 1000,      # Code sequences sampled (seeds 0..N-1) for the replayed share.
        **prior_kwargs,             # Options of the prior class (dim, depth, heads, dropout).
    ):
        if kind not in prior_lib.PRIOR_KINDS:
            raise ValueError(f'prior kind must be one of {", ".join(prior_lib.PRIOR_KINDS)}, got {kind!r}')
        if kind == 'frequency' and prior_kwargs:
            raise ValueError(f'the frequency prior takes no options, got {sorted(prior_kwargs)}')
        self.dataset, self.ks, self.device, self.kind = dataset, list(ks), torch.device(device), kind
        num = min(int(num_images), len(dataset))
        self.train_idx, self.held_idx = prior_lib.split_indices(num, held_out)
        self.steps, self.batch, self.lr, self.weight_decay, self.seed = steps, batch, lr, weight_decay, seed
        self.replay_samples = replay_samples
        self.started = False        # Trained (or loaded) at least once.
        with torch.random.fork_rng(devices=[]):    # The training's own random numbers stay untouched.
            torch.manual_seed(seed)
            self.prior = prior_lib.PRIOR_KINDS[kind](self.ks, **prior_kwargs).to(self.device).eval()

    # Warm start from the newest prior file of a run folder (on resume), if there is one that fits.
    def load_latest(self, run_dir):
        names = [n for n in os.listdir(run_dir) if n.startswith('network-snapshot-') and n.endswith(prior_lib.PRIOR_SUFFIX)] \
            if os.path.isdir(run_dir) else []
        if not names:
            return None
        path = os.path.join(run_dir, max(names))
        loaded = prior_lib.load_prior(path)
        if type(loaded) is type(self.prior) and loaded.ks == self.ks and dict(loaded.init_kwargs) == dict(self.prior.init_kwargs):
            self.prior.load_state_dict(loaded.state_dict())
            self.started = True
            return path
        return None

    # Encode the subset with `net` (the snapshot), train, and return the figures (a dict of floats).
    def refresh(self, net, cur_nimg=0):
        with torch.random.fork_rng(devices=[self.device] if self.device.type == 'cuda' else []):
            return self._refresh(net, cur_nimg)

    def _refresh(self, net, cur_nimg):
        start = time.time()
        codes = prior_lib.dataset_codes(net, self.dataset, self.train_idx + self.held_idx, batch=self.batch)
        train, held = codes[:len(self.train_idx)], codes[len(self.train_idx):]
        if self.kind == 'frequency':
            self.prior = prior_lib.fit_frequency_prior(train, self.ks).to(self.device)
        else:
            fit, val = prior_lib.split_validation(train)     # Early stopping on `val`; figures on `held`.
            if not self.started:                            # The first refresh starts from the frequencies.
                self.prior.init_from_frequencies(fit)
                self.started = True
            prior_lib.train_prior(self.prior, fit, self.steps, batch=self.batch, lr=self.lr, weight_decay=self.weight_decay,
                                  held_out=val, eval_every=max(1, min(25, self.steps // 4)), seed=self.seed * 1_000_003 + cur_nimg)
        self.prior.eval()
        report = prior_lib.prior_report(self.prior, train, held, prior_lib.seed_uniforms(range(self.replay_samples), len(self.ks)))
        report['sec'] = time.time() - start
        return report

    # Write the prior to `path` (atomically) with the figures of its last refresh.
    def save(self, path, report=None):
        prior_lib.save_prior(self.prior, path, extra_metadata=dict(report=report or {}))

# The prior file beside the snapshot of `tag` in `run_dir`.
def prior_file(run_dir, tag):
    return prior_lib.prior_path(os.path.join(run_dir, snapshot_io.run_file(snapshot_io.SAFE_SNAPSHOT_PATTERN, tag)))

# The stats.jsonl entries of a refresh report (training_stats' {num, mean, std} layout).
def report_stats(report):
    names = dict(prior_bits='Prior/held_out_bits', frequency_bits='Prior/frequency_bits', uniform_bits='Prior/uniform_bits',
                 prior_replay='Prior/replay', frequency_replay='Prior/frequency_replay', sec='Timing/prior_sec')
    return {name: dict(num=1, mean=float(report[key]), std=0.0) for key, name in names.items() if key in report}

# The console line of a refresh.
def report_line(report):
    fields = [f'prior {report["sec"]:.1f}s']
    if 'prior_bits' in report:
        fields.append(f'held-out bits/image {report["prior_bits"]:.2f} (frequency {report["frequency_bits"]:.2f}, '
                      f'uniform {report["uniform_bits"]:.2f})')
    if 'prior_replay' in report:
        fields.append(f'replayed training codes {report["prior_replay"]:.1%}')
    return '  '.join(fields)
