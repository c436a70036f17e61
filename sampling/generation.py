"""Generation with a trained DDN as a stream of batches (EDM2's `generate_images`, for DDN).

`generate_batches` yields the images of a list of names in batches, in one of three modes chosen by
its arguments: nothing -> sampling (names are seeds: per-seed codes, so a seed gives the same image
whatever the batch or the number of processes; with a `prior`, the codes are drawn from it, see
sampling/prior_sampling.py); `codes` -> decoding those latents; `dataset` ->
reconstruction (L2-guided encoding of dataset images, names are their indices). A `scorer` (and
`chooser`) guides sampling (zero-shot conditional generation, sampling/guidance.py); a
`condition_fn` gives the condition of a conditional network (training/conditions.py). Every network
call runs under `batch_invariant()`, the kernels that make an image independent of its batch, unless
`exact=False` asks unguided sampling or decoding for the fastest kernels (the same codes per seed,
images within one grey level whatever the batch).

`Recorder` consumes such a stream: it writes each image's PNG, keeps the latents, the grid images,
the reconstruction error and the guide distance, and gathers them on rank 0 (generate.py writes
latents.npz, grid.png and metrics.json from them). Callers split the work across processes with
`rank_share`; the uint8 images can stream on into evaluation/metrics.py (FID) unchanged.
"""

import contextlib
import json
import math
import os
import re
from typing import Iterator, NamedTuple, Optional

import numpy as np
import torch

import dnnlib
from torch_utils import checkpoint
from torch_utils import distributed as dist
from training.conditions import condition_kind
from sampling.guidance import final_distance
from sampling.prior_sampling import sample_with_prior
from training.images import image_path, make_grid, mean_psnr, psnr, save_png, side_by_side, to_float, to_pil, to_uint8
from training.latent import save_latents
from training.determinism import batch_invariant

# Images in the preview grid (the first names of a run).
GRID_IMAGES = 100

# Files of a generate.py run in its output folder besides the {name:06d}.png images (see recorded_outputs).
OUTPUT_FILES = ('latents.npz', 'grid.png', 'generation_options.json', 'metrics.json')

# ----------------------------------------------------------------------------
# The stream.

class Batch(NamedTuple):
    names:      list                    # Seed or index of each image (its file name).
    images:     torch.Tensor            # (B, C, H, W) uint8, on the network's device.
    codes:      torch.Tensor            # (B, L) int64 latent.
    originals:  Optional[torch.Tensor]  # (B, C, H, W) uint8 originals (reconstruction), or None.
    conditions: Optional[torch.Tensor]  # Condition of each image (conditional nets), or None.

# This process's strided share of a list (or the rows of an array): items r, r + W, r + 2W, ... for rank r of W.
def rank_share(items):
    items = items if isinstance(items, np.ndarray) else list(items)
    return items[dist.get_rank()::dist.get_world_size()]

# Number of batches generate_batches makes of `num` names.
def num_batches(num, batch):
    return math.ceil(num / batch)

# This process's images of `names`, in batches of at most `batch`, as uint8 on the network's device.
@torch.no_grad()
def generate_batches(
    net,                        # DDNGenerator / DDNRecurrent in eval mode.
    names,                      # Seeds (sampling), or names of the rows of `codes` / images of `dataset`.
    batch           = 64,       # Most images per batch.
    codes           = None,     # Decoding: (len(names), L) int array of latents, one row per name.
    dataset         = None,     # Reconstruction: a dataset of uint8 CHW images; names are indices.
    condition_fn    = None,     # (names, images or None) -> condition of a conditional net (conditions.make_condition_fn).
    scorer          = None,     # Sampling: guide scorer (guided layers keep the best candidate).
    chooser         = None,     # Sampling: choice rule of guided layers (default: the seed-aware argmin).
    prior           = None,     # Sampling: a training.prior_rule.PriorRule drawing the codes (sampling/prior_sampling.py).
    exact           = True,     # Unguided sampling and decoding: False = the fastest kernels instead of
                                # batch_invariant(): the same codes per seed, images within a grey level.
) -> Iterator[Batch]:
    if codes is not None and dataset is not None:
        raise ValueError('generate_batches: give codes (decoding) or a dataset (reconstruction), not both')
    if (codes is not None or dataset is not None) and (scorer is not None or prior is not None):
        raise ValueError('generate_batches: a scorer or a prior guides sampling only')
    names = list(names)
    device = net.init_feature.device
    for start in range(0, len(names), batch):
        chunk = names[start:start + batch]
        originals = x = None
        if dataset is not None:
            originals = torch.from_numpy(np.stack([dataset[i][0] for i in chunk])).to(device)
            x = to_float(originals)
        condition = None if condition_fn is None else condition_fn(chunk, x)
        # Encoding and guided choices compare distances, which the kernels' last bits could tip:
        # they always run exactly. Unguided codes come from the seeds (or the file) alone.
        fast = not exact and x is None and scorer is None and prior is None      # A prior's draws compare probabilities too.
        with contextlib.nullcontext() if fast else batch_invariant():
            if x is not None:
                chosen, images = net.encode(x, condition=condition)
            elif codes is not None:
                out = net(codes=torch.as_tensor(codes[start:start + batch], device=device), condition=condition)
                chosen, images = out.codes, out.images
            elif prior is not None:
                out = sample_with_prior(net, chunk, prior, scorer=scorer, chooser=chooser, condition=condition)
                chosen, images = out.codes, out.images
            else:
                out = net(seeds=chunk, condition=condition, scorer=scorer, chooser=chooser)
                chosen, images = out.codes, out.images
        yield Batch(chunk, to_uint8(images), chosen, originals, condition)

# ----------------------------------------------------------------------------
# Writing the images of a stream and keeping what rank 0 needs afterwards.

# Saves a stream's PNGs as they come and keeps what the shared files need (see consume / gather).
class Recorder:
    def __init__(self,
        outdir,                         # Output folder.
        subdirs,                        # One subfolder per 1000 names.
        grid_names,                     # Names whose images go to grid.png.
        record_conditions = None,       # Batch conditions -> what latents.npz keeps per image; None = nothing.
        scorer          = None,         # Guide scorer: measure the guide distance of the saved images.
    ):
        self.outdir = outdir
        self.subdirs = subdirs
        self.grid_names = set(grid_names)
        self.record_conditions = record_conditions
        self.scorer = scorer
        self.names, self.codes, self.conditions = [], [], []
        self.grid = {}                                              # name -> (image, original or None)
        self.sq_err = torch.zeros([2], dtype=torch.float64)         # Sum of squared errors, number of values.
        self.psnrs = []                                             # Reconstruction PSNR of each image (images.psnr).
        self.guide_dist = torch.zeros([2], dtype=torch.float64)     # Sum of guide distances, number of images.

    # Save each batch's PNGs and record it; yields its uint8 images (for the FID detector). The PNGs
    # are written in place, not atomically (an fsync per image would dominate a 50k-image run): an
    # interrupted run has no latents.npz, and `--force` clears its images.
    def consume(self, batches) -> Iterator[torch.Tensor]:
        for b in batches:
            images = b.images.cpu()
            originals = None if b.originals is None else b.originals.cpu()
            for i, name in enumerate(b.names):
                path = image_path(self.outdir, name, self.subdirs)
                os.makedirs(os.path.dirname(path), exist_ok=True)
                to_pil(images[i].numpy()).save(path)
                if name in self.grid_names:
                    self.grid[name] = (images[i].numpy(), None if originals is None else originals[i].numpy())
            self.names += list(b.names)
            self.codes.append(b.codes.cpu())
            if self.record_conditions is not None and b.conditions is not None:
                self.conditions.append(self.record_conditions(b.conditions).cpu())
            if originals is not None:
                diff = images.to(torch.float64) - originals.to(torch.float64)
                self.sq_err += torch.tensor([diff.square().sum().item(), diff.numel()], dtype=torch.float64)
                self.psnrs.append(psnr(images, originals))
            if self.scorer is not None:
                # Measured on the images as saved (uint8), like every other metric here.
                d = final_distance(self.scorer, to_float(b.images))
                self.guide_dist += torch.tensor([d.double().sum().item(), d.numel()], dtype=torch.float64)
            yield b.images

    # Everything recorded on all ranks, on rank 0 (None elsewhere): names, codes and conditions sorted
    # by name, grid, and the reconstruction / guide metrics (mse, psnr, guide_distance) that apply.
    def gather(self, L):
        codes = torch.cat(self.codes).numpy() if self.codes else np.zeros((0, L), np.int64)
        conditions = torch.cat(self.conditions).numpy() if self.conditions else None
        psnrs = torch.cat(self.psnrs).numpy() if self.psnrs else np.zeros(0, np.float64)
        mine = dict(names=np.asarray(self.names, np.int64), codes=codes, conditions=conditions, grid=self.grid, psnrs=psnrs)
        dist.all_reduce_([self.sq_err, self.guide_dist])
        parts = dist.gather_object(mine)
        if parts is None:
            return None
        names = np.concatenate([p['names'] for p in parts])
        codes = np.concatenate([p['codes'] for p in parts])
        order = np.argsort(names, kind='stable')
        conds = [p['conditions'] for p in parts if p['conditions'] is not None]
        conditions = np.concatenate(conds)[order] if conds else None
        grid = {k: v for p in parts for k, v in p['grid'].items()}
        psnrs = np.concatenate([p['psnrs'] for p in parts])
        return dnnlib.EasyDict(names=names[order], codes=codes[order], conditions=conditions, grid=grid, metrics=self._metrics(psnrs))

    # Reconstruction MSE (pooled over all values) and PSNR (the mean of the per-image PSNRs, images.mean_psnr)
    # on the uint8 images (range [0, 255]), and the mean guide distance, where they apply.
    def _metrics(self, psnrs):
        results = {}
        sse, count = self.sq_err.tolist()
        if count:
            results['mse'] = sse / count
            results['psnr'], results['psnr_exact_images'] = mean_psnr(psnrs)
        total, count = self.guide_dist.tolist()
        if self.scorer is not None and count:
            results['guide_distance'] = total / count
        return results

# ----------------------------------------------------------------------------
# The output folder: {name:06d}.png images (Recorder), latents.npz and grid.png (save_run).

# latents.npz and grid.png of a gathered recording `rec` of `net` (rank 0). `stored`: the one condition
# latents.npz keeps for all images (a shared condition image), else each image's recorded condition.
# The grid holds `grid_names`; with originals (reconstruction) it is originals | reconstructions.
def save_run(outdir, rec, net, name_key, grid_names, stored=None, network=None):
    kind = condition_kind(net)
    classes = rec.conditions if kind == 'class' else None
    conditions = None if kind in (None, 'class') else stored if stored is not None else rec.conditions
    save_latents(os.path.join(outdir, 'latents.npz'), name_key, rec.names, rec.codes, net.ks,
                 classes=classes, conditions=conditions, network=network)
    grid = make_grid([rec.grid[n][0] for n in grid_names])
    if rec.grid[grid_names[0]][1] is not None:
        grid = side_by_side(make_grid([rec.grid[n][1] for n in grid_names]), grid)
    save_png(grid, os.path.join(outdir, 'grid.png'))

# ----------------------------------------------------------------------------
# Output folders hold only what we wrote: a run records its options (and so its files) in a marker
# file before it writes anything, and a later run with --force deletes exactly those files.

# The relative paths of the files an earlier run wrote into `outdir`, from its marker file (generate.py's
# generation_options.json, compress.py's decode_options.json): the marker, its `files` (default: generate.py's
# OUTPUT_FILES) and the images of its `images` list (an int-list string; older generate.py files: `seeds`,
# else indices 0..num-1).
# Raises ValueError when the marker is missing or unreadable.
def recorded_outputs(outdir, marker='generation_options.json'):
    path = os.path.join(outdir, marker)
    try:
        with open(path, encoding='utf-8') as f:
            options = json.load(f)
        names = options.get('images', options.get('seeds'))
        if names is None and not 0 <= int(options['num']) <= MAX_RECORDED_IMAGES:
            raise ValueError(f'num {options["num"]} is not a number of images')
        names = dnnlib.util.parse_int_list(names, MAX_RECORDED_IMAGES) if names is not None else range(int(options['num']))
        subdirs = bool(options.get('subdirs', False))
        files = {marker, *(str(name) for name in options.get('files', OUTPUT_FILES))}
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError) as e:
        raise ValueError(f'{path}: cannot tell which files an earlier run wrote ({type(e).__name__}: {e})') from None
    files.update(os.path.relpath(image_path(outdir, name, subdirs), outdir).replace(os.sep, '/') for name in names)
    return files

# The relative paths of every file under `outdir` (none if it does not exist), temporary files
# of a killed run (`*.tmp-<pid>`) and another rank's write probe (checkpoint.check_writable) left out.
def existing_files(outdir):
    found = set()
    if not os.path.isdir(outdir):
        return found
    for root, _dirs, files in os.walk(outdir):
        for name in files:
            if not re.search(r'\.tmp-\d+', name) and not name.startswith(checkpoint.WRITE_TEST_PREFIX):
                found.add(os.path.relpath(os.path.join(root, name), outdir).replace(os.sep, '/'))
    return found

# Most images a marker file may list (generate.py's --seeds cap).
MAX_RECORDED_IMAGES = 10_000_000

# Make the folder and remove the files `remove` (relative paths: what an earlier run recorded), and
# the {thousands:06d} subfolders they leave empty; nothing else is touched.
def clear_outdir(outdir, remove=()):
    os.makedirs(outdir, exist_ok=True)
    checkpoint.remove_stale_temps(outdir)
    folders = set()
    for rel in sorted(remove):
        path = os.path.join(outdir, *rel.split('/'))
        if os.path.isfile(path):
            os.remove(path)
            if '/' in rel:
                folders.add(os.path.dirname(path))
    for folder in folders:
        if re.fullmatch(r'\d{6}', os.path.basename(folder)) and not os.listdir(folder):
            os.rmdir(folder)

# ----------------------------------------------------------------------------
