"""Fitting a prior over the codes (training/prior.py) to a network, and the prior the training loop keeps.

Fitting (train_prior.py, bench/quality.py): `dataset_codes` encodes dataset images, `split_indices` /
`split_validation` hold codes out, `fit_prior` makes and trains a prior of a kind, `prior_report` gives
its figures (held-out bits per image against the baselines, replayed training codes).

The prior trained beside the DDN (train.py `--prior`):
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

import math
import os
import time

import torch

from training import prior as prior_lib
from training import prior_files
from training import prior_rule
from training import snapshot as snapshot_io

# ----------------------------------------------------------------------------
# Fitting a prior to a network: its codes of a dataset, a held-out split, the figures to report.

# The codes (N, L) int64 on the CPU of dataset images `indices` (uint8 CHW), encoded by `net` (L2-guided,
# `net.encode`, in eval mode under batch_invariant()). Unconditional networks only.
@torch.no_grad()
def dataset_codes(net, dataset, indices, batch=256):
    import numpy as np
    from training.images import to_float
    if getattr(net, 'condition', None) is not None:
        raise ValueError(f'a prior over the codes of a conditional network ({net.condition!r}) is not supported')
    device = net.init_feature.device
    indices, out = list(indices), []
    for start in range(0, len(indices), batch):
        x = torch.from_numpy(np.stack([dataset[int(i)][0] for i in indices[start:start + batch]])).to(device)
        codes, _ = net.encode(to_float(x))
        out.append(codes.cpu())
    return torch.cat(out) if out else torch.zeros(0, net.num_layers, dtype=torch.long)

# (train, held-out) index lists of n images: the last max(1, round(n * fraction)) are held out (0: none).
def split_indices(n, held_out=0.1):
    if not 0 <= held_out < 1:
        raise ValueError(f'held_out must be a fraction in [0, 1), got {held_out}')
    num_held = 0 if held_out == 0 else max(1, round(n * held_out))
    if n - num_held < 1:
        raise ValueError(f'{n} images leave nothing to train the prior on after holding out {num_held}')
    return list(range(n - num_held)), list(range(n - num_held, n))

# Codes (N, L) -> (fit, validation): the last max(1, round(N * fraction)) rows validate (early stopping),
# so that the held-out codes a prior is reported on are never used to choose its state. (codes, None)
# when there are too few rows to split.
def split_validation(codes, fraction=0.1):
    num_val = max(1, round(codes.shape[0] * fraction))
    if codes.shape[0] - num_val < 1:
        return codes, None
    return codes[:-num_val], codes[-num_val:]

# The share of rows of `sampled` (N, L) equal to some row of `reference` (M, L): a prior that replays the
# training codes is not a generator.
def replay_share(sampled, reference):
    known = {bytes(row) for row in torch.as_tensor(reference).long().cpu().numpy()}
    rows = torch.as_tensor(sampled).long().cpu().numpy()
    return sum(bytes(row) in known for row in rows) / max(len(rows), 1)

# Make and train a prior of `kind` ('frequency', 'transformer' or 'mixture') on `train` codes (N, L),
# early-stopped on `held` (None: no early stopping); the transformer starts from the frequencies of `train`
# (`from_frequencies`). The mixture chooses its parts and weights on `held` (required); `refit` codes
# (e.g. train + held), when given, replace the counts afterwards (the frequency prior's too).
# Returns (prior in eval mode, training history).
def fit_prior(kind, ks, train, held=None, steps=300, batch=128, lr=1e-3, weight_decay=0.1, eval_every=25, seed=0,
              device='cpu', log=None, from_frequencies=True, refit=None, **prior_kwargs):
    if kind not in prior_lib.PRIOR_KINDS:
        raise ValueError(f'prior kind must be one of {", ".join(prior_lib.PRIOR_KINDS)}, got {kind!r}')
    if kind == 'frequency':
        if prior_kwargs:
            raise ValueError(f'the frequency prior takes no options, got {sorted(prior_kwargs)}')
        return prior_lib.fit_frequency_prior(train if refit is None else refit, ks).to(device).eval(), []
    if kind == 'mixture' and (held is None or held.shape[0] == 0):
        raise ValueError('the mixture prior chooses its parts on validation codes; it needs some (too few codes to split?)')
    torch.manual_seed(seed)
    prior = prior_lib.PRIOR_KINDS[kind](ks, **prior_kwargs).to(device)
    transformer = prior.transformer if kind == 'mixture' else prior
    if from_frequencies:
        transformer.init_from_frequencies(train)
    history = prior_lib.train_prior(transformer, train, steps, batch=batch, lr=lr, weight_decay=weight_decay, held_out=held,
                          eval_every=eval_every, seed=seed, log=log)
    if kind == 'mixture':
        parents, alphas = prior_lib.choose_pairs(train, held, ks)
        prior.set_counts(train, parents, alphas)
        prior_lib.fit_mixture_weights(prior, held)
        if refit is not None:       # The counts of all codes, with the parents and weights chosen above.
            prior.set_counts(refit, parents, alphas)
    return prior.eval(), history

# The figures of a prior: held-out bits per image of uniform codes (sum log2 K), of the frequency baseline
# fitted to `train`, and of the prior; the share of sampled code sequences (from `uniforms`, (N, L)) equal
# to a training image's codes, for the prior, the frequency baseline and uniform codes.
@torch.no_grad()
def prior_report(prior, train, held, uniforms):
    freq = prior_lib.fit_frequency_prior(train, prior.ks).to(prior.valid.device)
    uniform = prior_lib.FrequencyPrior(prior.ks).to(prior.valid.device)
    report = dict(num_train=int(train.shape[0]), num_held_out=int(held.shape[0]),
                  uniform_bits=sum(math.log2(k) for k in prior.ks))
    if held.shape[0]:
        report.update(frequency_bits=prior_lib.bits_per_image(freq, held), prior_bits=prior_lib.bits_per_image(prior, held))
    if uniforms.shape[0]:
        uniforms = uniforms.to(prior.valid.device)
        report.update(num_samples=int(uniforms.shape[0]), prior_replay=replay_share(prior_rule.sample(prior, uniforms), train),
                      frequency_replay=replay_share(prior_rule.sample(freq, uniforms), train),
                      uniform_replay=replay_share(prior_rule.sample(uniform, uniforms), train))
    return report

# ----------------------------------------------------------------------------
# The prior refreshed by the training loop.

class PriorRefresh:
    def __init__(self,
        dataset,                    # The training set (uint8 CHW images).
        ks,                         # K of each layer of the network.
        device,                     # Where the prior trains.
        kind        = 'transformer',# 'transformer', 'mixture' or 'frequency' (training/prior.py PRIOR_KINDS).
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
        self.train_idx, self.held_idx = split_indices(num, held_out)
        self.steps, self.batch, self.lr, self.weight_decay, self.seed = steps, batch, lr, weight_decay, seed
        self.replay_samples = replay_samples
        self.started = False        # Trained (or loaded) at least once.
        with torch.random.fork_rng(devices=[]):    # The training's own random numbers stay untouched.
            torch.manual_seed(seed)
            self.prior = prior_lib.PRIOR_KINDS[kind](self.ks, **prior_kwargs).to(self.device).eval()

    # Warm start from the newest prior file of a run folder (on resume), if there is one that fits.
    def load_latest(self, run_dir):
        names = [n for n in os.listdir(run_dir) if n.startswith('network-snapshot-') and n.endswith(prior_files.PRIOR_SUFFIX)] \
            if os.path.isdir(run_dir) else []
        if not names:
            return None
        path = os.path.join(run_dir, max(names))
        loaded = prior_files.load_prior(path)
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
        codes = dataset_codes(net, self.dataset, self.train_idx + self.held_idx, batch=self.batch)
        train, held = codes[:len(self.train_idx)], codes[len(self.train_idx):]
        if self.kind == 'frequency':
            self.prior = prior_lib.fit_frequency_prior(train, self.ks).to(self.device)
        else:
            fit, val = split_validation(train)     # Early stopping on `val`; figures on `held`.
            transformer = self.prior.transformer if self.kind == 'mixture' else self.prior
            if not self.started:                            # The first refresh starts from the frequencies.
                transformer.init_from_frequencies(fit)
                self.started = True
            prior_lib.train_prior(transformer, fit, self.steps, batch=self.batch, lr=self.lr, weight_decay=self.weight_decay,
                                  held_out=val, eval_every=max(1, min(25, self.steps // 4)), seed=self.seed * 1_000_003 + cur_nimg)
            if self.kind == 'mixture':      # Parts and weights chosen on `val`, then the counts of all of `train`.
                if val is None:
                    raise ValueError('the mixture prior needs validation codes: encode more images for the prior (none were left for validation)')
                parents, alphas = prior_lib.choose_pairs(fit, val, self.ks)
                self.prior.set_counts(fit, parents, alphas)
                prior_lib.fit_mixture_weights(self.prior, val)
                self.prior.set_counts(train, parents, alphas)
        self.prior.eval()
        report = prior_report(self.prior, train, held, prior_rule.seed_uniforms(range(self.replay_samples), len(self.ks)))
        report['sec'] = time.time() - start
        return report

    # Write the prior to `path` (atomically) with the figures of its last refresh.
    def save(self, path, report=None):
        prior_files.save_prior(self.prior, path, extra_metadata=dict(report=report or {}))

# The prior file beside the snapshot of `tag` in `run_dir`.
def prior_file(run_dir, tag):
    return prior_files.prior_path(os.path.join(run_dir, snapshot_io.run_file(snapshot_io.SAFE_SNAPSHOT_PATTERN, tag)))

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
