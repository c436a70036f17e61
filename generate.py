"""Generate images with a trained DDN: samples from seeds (optionally guided toward a condition),
decoded latents, or reconstructions of a dataset; optionally FID (and IS) of the result on the fly.
EDM's `generate.py`, for DDN; the work itself is `sampling.generation.generate_batches`.

Three modes, one output layout (`--outdir`): sample (default; `--seeds 0-49999` -> `{seed:06d}.png`,
seed s always gives the same image, whatever `--batch` and the number of processes); decode (`--codes
latents.npz`: the images of latents written here); reconstruct (`--reconstruct DATA`: L2-guided
encoding of dataset images, their reconstructions `{index:06d}.png`, MSE / PSNR on the uint8 images).
Every mode also writes `latents.npz` (training/latent.py; decoding it reproduces the images exactly),
`grid.png` (the first 100 images; reconstruct: originals | reconstructions) and
`generation_options.json`. `--fid-ref` streams the uint8 batches straight into the detector (no PNG
is read back) and writes `metrics.json`; the last printed line is `fid=...`.

Guided sampling (zero-shot conditional generation, DDN.md §5, sampling/guidance.py): `--guide
TYPE[:WEIGHT],...` makes every layer keep its candidate nearest a condition (argmin, ties broken by
the seed), or sample (`--guide-temp`, `--guide-topk`) from the seed's own uniforms, so a guided image is
as deterministic as a plain sample. The guide inputs (`--guide-image`, ...) are shared by every seed.
A prior over the codes (`--prior`, training/prior.py, fitted by train_prior.py or train.py `--prior`)
draws each layer's code from p(k_l | k_<l) instead of uniformly, from the same per-seed uniforms
(inverse CDF; `--prior-temp`, `--prior-topk`, `--prior-topp`); `auto` (the default) uses the network
file's own `X.prior.safetensors` when there is one, `off` gives uniform codes. With `--guide` the scorer
ranks the candidates and the prior weighs them (the rule: sampling/prior_sampling.py). With
`--reconstruct`, metrics.json and the last lines give the bits per image of the images' codes under the
prior (`prior_bits`, against `uniform_bits` = sum log2 K): its likelihood on those images.
Conditional networks (DDN.md §6) take `--class` (else a class drawn from each seed) or
`--condition-image` (the condition computed from it as in training, training/conditions.py);
reconstruction derives each image's condition from the image (and its label).

Under `torchrun --standalone --nproc_per_node=N` the work is split across ranks (strided); rank 0
gathers latents, grid images and statistics and writes the shared files.

SECURITY: `--network` reads the safe format (.safetensors) or our snapshot pickles through a restricted
unpickler that runs nothing from the file; guide classifiers and feature networks are TorchScript.
Other pickles, and TorchScript guide networks, load only with `--trust-code` (alias `--trust-pickle`): they run code. See training/snapshot.py.
"""

import os
from typing import NamedTuple

import click
import tqdm

import dnnlib
from dnnlib.util import format_int_list
from torch_utils import checkpoint
from torch_utils import distributed as dist
from evaluation import metrics as metric_lib
from training import prior as prior_lib
from training import snapshot
from training.conditions import condition_kind, load_condition_image, make_condition_fn, stored_condition_fn
from evaluation.detectors import DETECTOR_URL, load_detector
from evaluation.feature_metrics import IS_SPLITS
from sampling.generation import GRID_IMAGES, Recorder, clear_outdir, generate_batches, num_batches, rank_share, save_run
import cli
from cli import GUIDE_OPTIONS, build_guide, check_guide_options
from sampling.guide_spec import GUIDE_TYPES, parse_spec
from training.latent import latents_network, read_latents

# Most seeds one --seeds list may hold (a typo such as 0-99999999999 would otherwise fill the memory).
MAX_SEEDS = 10_000_000

# The usage error of an image-conditional network run without a condition image.
NEED_IMAGE = ('This network is conditioned on {!r}: give --condition-image PATH '
              '(the condition is computed from that image as in training)')

# The options of a run, written into --outdir before any image: they list the files the run writes.
OPTIONS_FILE = 'generation_options.json'

# An existing file (click checks it and names the option in its error).
_FILE = click.Path(exists=True, dir_okay=False)

# ----------------------------------------------------------------------------
# Options and the output folder.

# Which mode the options ask for; conflicting options are errors rather than silently ignored.
def _check_mode(opts):
    if opts.codes_path is not None and opts.data is not None:
        raise click.UsageError('--codes and --reconstruct are different modes; give one of them')
    mode = 'decode' if opts.codes_path is not None else 'reconstruct' if opts.data is not None else 'sample'
    other = '--codes' if mode == 'decode' else '--reconstruct'
    if mode != 'sample' and opts.seeds is not None:
        raise click.UsageError(f'--seeds chooses samples; it does not apply with {other}')
    if mode == 'sample' and opts.max_images is not None:
        raise click.UsageError('--max-images applies to --reconstruct and --codes; use --seeds to choose samples')
    if opts.detector_url is not None and opts.fid_ref is None:
        raise click.UsageError('--detector is only used with --fid-ref')
    if mode != 'sample' and opts.guide is not None:
        why = 'the codes fix every choice' if mode == 'decode' else 'each image is encoded by L2 to itself'
        raise click.UsageError(f'--guide steers sampling (--seeds); it does not apply with {other} ({why})')
    return mode

# An --outdir must be new or empty, or with --force the folder of an earlier generate.py run (its
# generation_options.json lists the files it wrote: only those are removed, so no image is left that the
# new latents.npz does not describe, and no file of anyone else is touched). Returns the files to remove.
def check_outdir(outdir, force):
    return cli.check_outdir(outdir, force, OPTIONS_FILE, 'generate.py')

# Usage errors of --class / --condition-image for this network; the shared condition of --condition-image or None.
def _shared_condition(opts, net, mode, guide_types, device):
    kind, label_dim = condition_kind(net), int(getattr(net, 'label_dim', 0) or 0)
    if opts.class_idx is not None:
        if label_dim == 0 and 'classifier' not in guide_types:
            raise click.UsageError('--class: this network is unconditional (it has no label input); '
                                   'without a label input --class is only the target of --guide classifier')
        if label_dim and opts.class_idx >= label_dim:
            raise click.UsageError(f'--class {opts.class_idx}: the network has {label_dim} classes (0..{label_dim - 1})')
    if opts.condition_image is None:
        return None
    if kind is None:
        raise click.UsageError('--condition-image: this network is unconditional (it takes no condition image); '
                               'to steer it toward an image, use --guide (e.g. --guide=l2 --guide-image=PATH)')
    if kind == 'class':
        raise click.UsageError('--condition-image: this network is class-conditional; give --class instead')
    if mode == 'reconstruct':
        raise click.UsageError('--condition-image does not apply with --reconstruct: each image\'s condition '
                               'is computed from the image itself')
    return load_condition_image(net, opts.condition_image, device)

# ----------------------------------------------------------------------------
# The work of each mode: the names of all images (in grid order) and this rank's stream of batches.

class Work(NamedTuple):
    names:      list                # Seed or index of every image, in grid order.
    name_key:   str                 # 'seeds' or 'indices' (latents.npz).
    batches:    object              # This rank's stream (sampling.generation.generate_batches).
    stored:     object = None       # The one condition latents.npz keeps for all images, else None (each image's).
    scorer:     object = None       # Guide scorer of guided sampling, or None.

# The prior of --prior (training/prior.py) as a PriorRule, or None: 'off' (uniform codes), 'auto' (the
# network file's own X.prior.safetensors when it has one) or a prior file. Only sampling uses it.
# With --reconstruct the prior only scores the codes: metrics.json gets their bits per image under it.
def _load_prior(opts, mode, net, net_path, device):
    if mode == 'decode':
        if opts.prior not in ('auto', 'off'):
            raise click.UsageError('--prior draws the codes of samples (and scores those of --reconstruct); it does not apply with --codes')
        return None, None
    if mode == 'reconstruct' and (opts.prior_temp, opts.prior_topk, opts.prior_topp) != (1.0, 0, 1.0):
        raise click.UsageError('--prior-temp/--prior-topk/--prior-topp shape sampling; they do not apply with --reconstruct')
    return cli.load_prior(opts.prior, net, net_path, device, opts.prior_temp, opts.prior_topk, opts.prior_topp)

# Sampling (optionally guided): --seeds, default 0-63.
def _sample_work(opts, net, device, shared, chooser, prior=None):
    kind = condition_kind(net)
    if kind not in (None, 'class') and shared is None:
        raise click.UsageError(NEED_IMAGE.format(net.condition))
    names = opts.seeds if opts.seeds is not None else list(range(64))
    scorer = build_guide(opts, net, device)
    condition_fn = make_condition_fn(net, device, class_idx=opts.class_idx, shared=shared)
    batches = generate_batches(net, rank_share(names), opts.batch, condition_fn=condition_fn, scorer=scorer, chooser=chooser,
                               prior=prior, exact=opts.exact)
    return Work(names, 'seeds', batches, None if shared is None else shared.cpu().numpy(), scorer)

# Decoding the rows of --codes, with their stored conditions unless --class / --condition-image replace them.
def _decode_work(opts, net, device, shared, net_id):
    kind = condition_kind(net)
    latents = read_latents(opts.codes_path, net, opts.max_images)
    made_by = latents_network(opts.codes_path)
    if made_by is not None and made_by != net_id:
        dist.print0(f'WARNING: {opts.codes_path} was made by another network (fingerprint {made_by}, this one is {net_id}); '
                    'the same codes decode to different images')
    if kind == 'class' and opts.class_idx is None and latents.classes is None and latents.name_key != 'seeds':
        raise click.UsageError(f'{opts.codes_path} holds no classes for this class-conditional network: give --class')
    stored = None if shared is None else shared.cpu().numpy()
    if kind not in (None, 'class') and shared is None:
        if latents.conditions is None:
            raise click.UsageError(f'{NEED_IMAGE.format(net.condition)}; {opts.codes_path} holds no conditions')
        if len(latents.conditions) == 1:
            stored = latents.conditions
    rows_of = {n: i for i, n in enumerate(latents.names)}   # name -> row of the stored conditions
    condition_fn = make_condition_fn(net, device, opts.class_idx, shared, latents.classes, latents.conditions, rows_of)
    batches = generate_batches(net, rank_share(latents.names), opts.batch, codes=rank_share(latents.codes), condition_fn=condition_fn,
                               exact=opts.exact)
    return Work(latents.names, latents.name_key, batches, stored)

# Reconstruction of the first --max-images images of the --reconstruct dataset.
def _reconstruct_work(opts, net, device):
    kind = condition_kind(net)
    use_labels = kind == 'class' and opts.class_idx is None
    hint = ' (or give --class for every image)' if use_labels else ''
    dataset = cli.open_dataset_for(opts.data, net, option='--reconstruct', hint=hint, use_labels=use_labels)
    names = list(range(len(dataset) if opts.max_images is None else min(opts.max_images, len(dataset))))
    # Each image's own condition, as in training: its label (or --class), or computed from it.
    condition_fn = make_condition_fn(net, device, class_idx=opts.class_idx, dataset=dataset)
    batches = generate_batches(net, rank_share(names), opts.batch, dataset=dataset, condition_fn=condition_fn)
    return Work(names, 'indices', batches)

# ----------------------------------------------------------------------------
# What the run records: its options, then latents.npz, grid.png and metrics.json.

# The guide of guided sampling as generation_options.json and metrics.json describe it; then the options of the run.
def _guide_info(opts, guide_types, chooser_info):
    info = dict(spec=opts.guide, guides=[dict(type=t, weight=w) for t, w in parse_spec(opts.guide)],
                chooser=chooser_info, shared_by_all_seeds=True,
                **{key[len('guide_'):]: opts[key] for key in GUIDE_OPTIONS if key not in ('guide_temp', 'guide_topk')})
    if 'classifier' in guide_types:
        info['class'] = opts.class_idx
    return info

def _run_options(opts, mode, net, net_path, names, guide_info, prior_info=None):
    return dict(mode=mode, network=net_path, prior=prior_info, outdir=opts.outdir, num=len(names), images=format_int_list(names),
                seeds=format_int_list(names) if mode == 'sample' else None, codes=opts.codes_path,
                reconstruct=opts.data, max_images=opts.max_images, batch=opts.batch, exact=opts.exact, subdirs=opts.subdirs,
                world_size=dist.get_world_size(), condition=getattr(net, 'condition', None),
                **{'class': opts.class_idx}, condition_image=opts.condition_image, guide=guide_info,
                fid_ref=opts.fid_ref, detector=opts.detector_url or (DETECTOR_URL if opts.fid_ref is not None else None))

# Rank 0: latents.npz, grid.png and (when there are results) metrics.json.
def _write_outputs(opts, mode, net, net_id, net_path, work, rec, results, guide_info):
    save_run(opts.outdir, rec, net, work.name_key, work.names[:GRID_IMAGES], stored=work.stored, network=net_id)
    if results:
        info = dict(results, mode=mode, network=net_path, num=len(work.names))
        if mode == 'reconstruct':
            info.update(data=opts.data, pixel_range='uint8 [0, 255]')
        if guide_info is not None:
            info.update(guide=guide_info)
        if opts.fid_ref is not None:
            info.update(fid_ref=opts.fid_ref, detector=opts.detector_url or DETECTOR_URL)
        checkpoint.write_json(os.path.join(opts.outdir, 'metrics.json'), info)
    print(f'Saved {len(rec.names)} images, latents.npz and grid.png to "{opts.outdir}"')

# The reference and detector of --fid-ref, loaded before generating so a bad path fails in seconds,
# not hours; None without --fid-ref.
def _load_metrics(opts, num, device):
    if opts.fid_ref is None:
        return None
    if num < 2:
        raise ValueError('--fid-ref: FID needs at least 2 images')
    try:
        ref = metric_lib.load_ref(opts.fid_ref)
        detector = load_detector(opts.detector_url, device, trust_pickle=opts.trust_pickle)
    except (OSError, ValueError, TypeError) as e:
        raise cli.click_error(e, '--fid-ref') from e
    return dnnlib.EasyDict(ref=ref, detector=detector, names=['fid'] + (['is'] if num >= IS_SPLITS else []))

# ----------------------------------------------------------------------------
# Command line.

@click.command(context_settings=dict(show_default=True))
@click.option('--network', 'network', help='Network snapshot (.safetensors or .pkl), URL, or run folder (its latest snapshot)', metavar='FILE|URL|DIR', required=True)
@click.option('--outdir', help='Where to save the images, latents and metrics', metavar='DIR', type=str, required=True)
@click.option('--seeds', help='Random seeds, e.g. 0-49999 or 1,5,9-12  [default: 0-63]', metavar='LIST', callback=cli.int_list(MAX_SEEDS), default=None)
@click.option('--subdirs', help='Create a subfolder for every 1000 seeds', is_flag=True)
@click.option('--force', help='Write into the --outdir of an earlier generate.py run, replacing the files it wrote (listed in its generation_options.json)', is_flag=True)
@click.option('--class', 'class_idx', help='Class label of class-conditional networks (and target of --guide classifier)  [default: random per seed]', metavar='INT', type=click.IntRange(min=0), default=None)
@click.option('--batch', 'batch', help='Maximum batch size per process', metavar='INT', type=click.IntRange(min=1), default=64)
@click.option('--exact', help='Bit-identical images whatever --batch / processes (batch-invariant kernels); False: the fastest kernels, the same codes, images within one grey level (sampling, decoding)', metavar='BOOL', type=bool, default=True)
@cli.device_option()
# DDN options.
@click.option('--codes', 'codes_path', help='Decode the latents of this file (a latents.npz written here)', metavar='NPZ', type=str, default=None)
@click.option('--reconstruct', 'data', help='Encode and reconstruct images of a dataset (folder, zip, or "digits")', metavar='PATH|digits', type=str, default=None)
@click.option('--max-images', help='Use only the first N images of --reconstruct / rows of --codes', metavar='INT', type=click.IntRange(min=1), default=None)
@click.option('--condition-image', help='Condition image of a color/edge/resizeN-conditional network (square, any size)', metavar='PNG', type=_FILE, default=None)
# The prior over the codes (sampling only).
@cli.prior_options
# Guided sampling (zero-shot conditional generation).
@click.option('--guide', help='Guide the sampling: TYPE[:WEIGHT],... with TYPE in ' + ', '.join(GUIDE_TYPES), metavar='SPEC', type=str, default=None)
@click.option('--guide-image', help='Guide image, shared by all seeds: target of l2/inpaint/lowbit, low-res image of superres, grayscale of color, edge map of edge (white = edge)', metavar='PNG', type=_FILE, default=None)
@click.option('--guide-mask', help='inpaint: mask image, white = known pixel, black = to generate', metavar='PNG', type=_FILE, default=None)
@click.option('--guide-bits', help='lowbit: bits per channel of --guide-image', metavar='INT', type=click.IntRange(min=1, max=8), default=None)
@click.option('--guide-classifier', help='classifier: TorchScript or pickled classifier ([-1, 1] images -> logits); target class --class', metavar='PT|PKL', type=_FILE, default=None)
@click.option('--guide-text', help='clip: text prompt (needs `pip install open_clip_torch`)', metavar='STR', type=str, default=None)
@click.option('--guide-style', help='style: style image  [default: --guide-image]', metavar='PNG', type=_FILE, default=None)
@click.option('--guide-features', help='style: feature network, TorchScript or pickle  [default: fixed random convs]', metavar='PT|PKL', type=_FILE, default=None)
@click.option('--guide-temp', help='Guided choice: sample from softmax(-z/T) of z-scored distances  [default: argmin]', metavar='T', type=cli.FiniteFloatRange(min=0), default=None)
@click.option('--guide-topk', help='Guided choice: uniform among the N best candidates  [default: argmin]', metavar='N', type=click.IntRange(min=1), default=None)
# Metrics.
@click.option('--fid-ref', 'fid_ref', help='Reference statistics: compute FID (and IS) of the generated images', metavar='NPZ|URL', type=str, default=None)
@click.option('--detector', 'detector_url', help='Detector pickle/TorchScript path or URL  [default: Inception-v3]', metavar='PATH|URL', type=str, default=None)
@click.option('--trust-code', '--trust-pickle', 'trust_pickle', help='Run code from files: --network pickles that are not plain ddn snapshots, --guide-classifier / --guide-features (TorchScript or pickles), a --detector other than the known ones', is_flag=True)
def main(**kwargs):
    """Generate images with a trained DDN, reconstruct a dataset, or decode latents; optionally compute FID.

    Examples:

    \b
    # 64 samples of the latest snapshot of a run; 50k samples on 8 GPUs with FID against EDM's CIFAR-10 reference
    python generate.py --network=training-runs/00000-cifar10-32x32 --outdir=out --seeds=0-63
    torchrun --standalone --nproc_per_node=8 generate.py --network=net.pkl --outdir=out \\
        --seeds=0-49999 --subdirs --fid-ref=https://nvlabs-fi-cdn.nvidia.com/edm/fid-refs/cifar10-32x32.npz

    \b
    # Reconstruct (encode + decode) 100 dataset images; decode their latents again
    python generate.py --network=net.pkl --outdir=rec --reconstruct=datasets/cifar10-32x32.zip --max-images=100
    python generate.py --network=net.pkl --outdir=dec --codes=rec/latents.npz

    \b
    # Guided sampling (zero-shot conditional generation); a color-conditional net colourising a grayscale image
    python generate.py --network=net.pkl --outdir=sr --seeds=0-15 --guide=superres --guide-image=low8x8.png --guide-temp=0.3
    python generate.py --network=net.pkl --outdir=fill --guide=inpaint:1,color:0.5 --guide-image=photo.png --guide-mask=mask.png
    python generate.py --network=net.pkl --outdir=cls --guide=classifier --guide-classifier=clf.pt --class=3 --guide-topk=4
    python generate.py --network=color-net.pkl --outdir=col --seeds=0-15 --condition-image=gray.png
    """
    with dist.session():
        try:
            _main(dnnlib.EasyDict(kwargs))
        except (OSError, ValueError) as e:
            raise cli.click_error(e) from e

def _main(opts):
    mode = _check_mode(opts)
    guide_types = [name for name, _ in parse_spec(opts.guide)] if opts.guide is not None else []
    check_guide_options(opts, guide_types)
    chooser, chooser_info = cli.chooser(opts.guide_temp, opts.guide_topk)
    device = dist.pick_device(opts.device)
    earlier_files = check_outdir(opts.outdir, opts.force)
    dist.barrier()      # Every rank has checked the folder before rank 0 writes into it.

    dist.print0(f'Loading network from "{opts.network}"...')
    net_path, net = cli.load_network(opts.network, device, trust_pickle=opts.trust_pickle)
    net_id = snapshot.fingerprint(net)
    dist.print0(f'Network: {net_path} ({net.img_channels}x{net.img_resolution}x{net.img_resolution}, '
                f'L={net.num_layers}, {net.bits_per_image:.0f} bits per image, fingerprint {net_id})')
    shared = _shared_condition(opts, net, mode, guide_types, device)
    prior, prior_info = _load_prior(opts, mode, net, net_path, device)
    if prior is not None:
        prior_info = dict(path=prior_info, kind=type(prior.prior).__name__, temperature=prior.temperature,
                          top_k=prior.top_k, top_p=prior.top_p)
        dist.print0(f'Prior: {prior_info["path"]} ({prior_info["kind"]}, temperature {prior.temperature}, '
                    f'top-k {prior.top_k or "all"}, top-p {prior.top_p})')
    if mode == 'sample':
        work = _sample_work(opts, net, device, shared, chooser, prior)
    elif mode == 'decode':
        work = _decode_work(opts, net, device, shared, net_id)
    else:
        work = _reconstruct_work(opts, net, device)
    if not work.names:
        raise ValueError('Nothing to generate: no seeds, codes or images selected')
    fid = _load_metrics(opts, len(work.names), device)

    # The options of this run, written before the work starts (EDM's training_options.json).
    guide_info = None
    if work.scorer is not None:
        guide_info = _guide_info(opts, guide_types, chooser_info)
        dist.print0(f'Guide: {opts.guide} ({", ".join(f"{k}={v}" for k, v in chooser_info.items())})')
    if dist.get_rank() == 0:
        clear_outdir(opts.outdir, earlier_files)
        checkpoint.write_json(os.path.join(opts.outdir, OPTIONS_FILE), _run_options(opts, mode, net, net_path, work.names, guide_info, prior_info))
    dist.barrier()

    # Generate, writing PNGs as batches come; the detector reads the same uint8 batches.
    what = {'sample': 'guided images' if work.scorer is not None else 'images', 'decode': 'images from latents',
            'reconstruct': 'reconstructions'}[mode]
    dist.print0(f'Generating {len(work.names)} {what} to "{opts.outdir}"...')
    record = None if work.stored is not None else stored_condition_fn(condition_kind(net))
    recorder = Recorder(opts.outdir, opts.subdirs, work.names[:GRID_IMAGES], record_conditions=record, scorer=work.scorer)
    total = num_batches(len(rank_share(work.names)), opts.batch)
    stream = recorder.consume(tqdm.tqdm(work.batches, total=total, unit='batch', disable=dist.get_rank() != 0))
    results = {} if fid is None else metric_lib.calc_metrics(stream, fid.ref, fid.names, detector=fid.detector, device=device)
    for _ in stream:    # Without metrics nothing has read the stream yet.
        pass
    rec = recorder.gather(net.num_layers)
    if rec is not None:
        results.update(rec.metrics)
        if mode == 'reconstruct' and prior is not None:   # The likelihood of the data's codes under the prior.
            results.update(prior_bits=prior_lib.bits_per_image(prior.prior, rec.codes), uniform_bits=net.bits_per_image)
        _write_outputs(opts, mode, net, net_id, net_path, work, rec, results, guide_info)
    dist.barrier()
    metric_lib.print_metrics(results, ('guide_distance', 'mse', 'psnr', 'uniform_bits', 'prior_bits', 'is', 'is_std', 'precision', 'recall', 'fid'))  # fid last.

# ----------------------------------------------------------------------------

if __name__ == '__main__':
    main()
