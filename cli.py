"""Command-line helpers shared by the scripts (generate.py, zscg.py, ...): the only library-side code
that knows option names. The packages below take keyword arguments and raise ValueError; these
helpers turn options into those arguments and errors into click usage errors.

- `click_error`: a library error as a click error, with the hints that name flags (--trust-pickle, ...).
- `load_network`, `open_dataset_for`, `check_writable`, `int_list`: --network, a dataset option checked
  against the network, an output path, a list of integers ('0-3,7').
- `device_option`: every script's --device.
- `GUIDE_INPUT_OPTIONS`, `GUIDE_OPTIONS`, `check_guide_options`, `build_guide`, `chooser`: generate.py's
  guide options (zscg.py uses `chooser` for its own two), mapped onto `sampling.guide_spec.parse_guides`.
"""

import math
import os
import pickle

import click

import dnnlib
from evaluation.detectors import DetectorDownloadError, UntrustedDetectorError
from sampling.guide_spec import GUIDE_TYPES, MissingGuideInput, make_chooser, parse_guides
from torch_utils import checkpoint
from sampling.generation import existing_files, recorded_outputs
from torch_utils import distributed as dist
from training import dataset as dataset_lib
from training import prior_files
from training import prior_rule
from training import snapshot

# ----------------------------------------------------------------------------
# Library errors as click errors.

# Said after a refusal to run code from a file (the library says trust_pickle=True).
TRUST_PICKLE_HINT = ('If you trust the file, pass --trust-code (alias --trust-pickle; the file then runs as code), or convert a network '
                     'once: python convert.py --network FILE --out net.safetensors --trust-pickle')

# Said after a training state was given where a network belongs.
NOT_A_NETWORK_HINT = 'A training state is resumed with train.py --resume; generate.py and the other scripts take a run folder or a network snapshot'

def click_error(err, option=None):
    """A ClickException with the message of a library error (ValueError, OSError, ImportError, ...),
    after the `option` it concerns if given, plus the hint that names the flag to use: --trust-pickle
    for a file refused because loading it would run code, --detector for a failed download, train.py
    --resume for a training state given as a network."""
    message = str(err) if option is None else f'{option}: {err}'
    if isinstance(err, (snapshot.UnsafeFileError, UntrustedDetectorError)):
        message = f'{message}\n{TRUST_PICKLE_HINT}'
    if isinstance(err, DetectorDownloadError):
        message = f'{message}\nOr pass --detector PATH naming a local copy of the detector.'
    if isinstance(err, snapshot.NotANetworkError):
        message = f'{message}\n{NOT_A_NETWORK_HINT}'
    return click.ClickException(message)

# ----------------------------------------------------------------------------
# What most scripts do first: load --network, open --data, check where the output goes.

def load_network(source, device='cpu', trust_pickle=False):
    """(path, network) of a --network value (file, URL or run folder), or a click error saying why not."""
    try:
        return snapshot.load_network(source, device, trust_pickle=trust_pickle)
    except (OSError, ValueError, RuntimeError, pickle.UnpicklingError) as e:
        raise click_error(e) from None

def open_dataset_for(data, net, option='--data', hint='', **kwargs):
    """The dataset of an `option` value (a folder, zip or 'digits', opened at the network's resolution)
    whose images have the network's shape, or a click error naming the option (and `hint`)."""
    try:
        dataset = dataset_lib.open_dataset(data, resolution=net.img_resolution, **kwargs)
    except (OSError, ValueError, ImportError) as e:
        raise click.ClickException(f'{option} {data}: cannot open the dataset: {e}{hint}') from None
    shape = [net.img_channels, net.img_resolution, net.img_resolution]
    if list(dataset.image_shape) != shape:
        raise click.ClickException(f'{option} {data}: the dataset has images of shape {list(dataset.image_shape)}, '
                                   f'but the network makes {shape}')
    return dataset

def check_writable(path, option):
    """A usage error naming `option` unless `path` (a file or folder, new or existing) may be written."""
    try:
        checkpoint.check_writable(path)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint=option) from None

def int_list(max_values=10_000_000):
    """click callback: '1,5,9-12' -> [1, 5, 9, 10, 11, 12] (dnnlib.util.parse_int_list), a usage error naming the option."""
    def parse(ctx, param, value):
        if value is None:
            return None
        try:
            return dnnlib.util.parse_int_list(value, max_values=max_values)
        except ValueError as e:
            raise click.BadParameter(str(e)) from None
    return parse

# ----------------------------------------------------------------------------
# generate.py's guide options: which guide reads which option, the scorer of the options, the choice rule.

# parse_guides argument -> the option that gives it.
GUIDE_INPUT_OPTIONS = {
    'image':        '--guide-image',
    'mask':         '--guide-mask',
    'bits':         '--guide-bits',
    'classifier':   '--guide-classifier',
    'class_idx':    '--class',
    'text':         '--guide-text',
    'style':        '--guide-style (or --guide-image)',
    'features':     '--guide-features',
}

# Guide options: (CLI option, the guide types that read it).
GUIDE_OPTIONS = {
    'guide_image':      ('--guide-image',       ('l2', 'superres', 'inpaint', 'color', 'lowbit', 'edge', 'style')),
    'guide_mask':       ('--guide-mask',        ('inpaint',)),
    'guide_bits':       ('--guide-bits',        ('lowbit',)),
    'guide_classifier': ('--guide-classifier',  ('classifier',)),
    'guide_text':       ('--guide-text',        ('clip',)),
    'guide_style':      ('--guide-style',       ('style',)),
    'guide_features':   ('--guide-features',    ('style',)),
    'guide_temp':       ('--guide-temp',        tuple(GUIDE_TYPES)),
    'guide_topk':       ('--guide-topk',        tuple(GUIDE_TYPES)),
}

def chooser(temperature, topk, options=('--guide-temp', '--guide-topk')):
    """(chooser, description) of guided layers (guide_spec.make_chooser: argmin, softmax with a
    temperature, or uniform among the top-k), a usage error naming the two `options` if both are given."""
    try:
        return make_chooser(temperature, topk)
    except ValueError as e:
        raise click.UsageError(f'{"/".join(options)}: {e}') from None

def check_guide_options(opts, guide_types):
    """Usage errors for guide inputs that no guide of `--guide` reads (or given without --guide)."""
    for key, (option, readers) in GUIDE_OPTIONS.items():
        if opts.get(key) is None:
            continue
        if not guide_types:
            raise click.UsageError(f'{option} is only used with --guide')
        if not set(readers) & set(guide_types):
            raise click.UsageError(f'{option} is not read by --guide {opts.guide} (only by {", ".join(readers)})')

def build_guide(opts, net, device):
    """The CombinedScorer of `opts.guide` (None without one), its inputs loaded from their files
    and checked against the network by `parse_guides`."""
    if opts.guide is None:
        return None
    try:
        return parse_guides(opts.guide, img_channels=net.img_channels, img_resolution=net.img_resolution,
            image=opts.guide_image, mask=opts.guide_mask, bits=opts.guide_bits, classifier=opts.guide_classifier,
            class_idx=opts.class_idx, text=opts.guide_text, style=opts.guide_style, features=opts.guide_features,
            device=device, trust_pickle=opts.get('trust_pickle', False))
    except MissingGuideInput as e:
        needs = ' and '.join(GUIDE_INPUT_OPTIONS[name] for name in e.inputs)
        raise click.UsageError(f'--guide {opts.guide}: guide {e.guide!r} ({GUIDE_TYPES[e.guide][0]}) needs {needs}') from None
    except (OSError, ValueError, RuntimeError, pickle.UnpicklingError) as e:
        raise click_error(e, f'--guide {opts.guide}') from e
    except ImportError as e:
        raise click.ClickException(f'--guide {opts.guide}: {e}') from e

# ----------------------------------------------------------------------------
# The `--device` option of every script: the string of the command line, checked by `pick_device`
# when the command line is parsed (a bad value is a usage error naming --device); the script calls
# `pick_device(value)` for its torch.device.
DEVICE_HELP = "Device: auto (this process's GPU if any, else CPU), cpu, cuda, cuda:N, mps"

def device_option(default='auto', **kwargs):
    def check(ctx, param, value):
        try:
            dist.pick_device(value)
        except ValueError as e:
            raise click.BadParameter(str(e)) from None
        return value
    return click.option('--device', help=DEVICE_HELP, metavar='STR', type=str, default=default, show_default=True, callback=check, **kwargs)

# ----------------------------------------------------------------------------
# The `--prior auto|off|PATH` option of the sampling scripts (generate.py, zscg.py) and its rule options
# `--prior-temp`, `--prior-topk`, `--prior-topp`.

def prior_options(fn):
    fn = click.option('--prior-topp', help='Draw only among the most probable codes holding this probability (1 = all)', metavar='P',
                      type=click.FloatRange(min=0, max=1, min_open=True), default=1.0, show_default=True)(fn)
    fn = click.option('--prior-topk', help='Draw only among the N most probable codes of each layer (0 = all)', metavar='N',
                      type=click.IntRange(min=0), default=0, show_default=True)(fn)
    fn = click.option('--prior-temp', help='Prior temperature: draw from p^(1/T); 0 = the most probable code', metavar='T',
                      type=click.FloatRange(min=0), default=1.0, show_default=True)(fn)
    return click.option('--prior', help="Prior over the codes: auto (the network file's X.prior.safetensors if any), off (uniform codes), "
                        'or a prior file', metavar='auto|off|PATH', type=str, default='auto', show_default=True)(fn)

def load_prior(prior, net, net_path, device, temperature=1.0, top_k=0, top_p=1.0):
    """(PriorRule, path) of `--prior` for a loaded network, or (None, None) for uniform codes: 'off', or
    'auto' when the network file has no prior. Usage errors name the options."""
    rule_given = (temperature, top_k, top_p) != (1.0, 0, 1.0)
    if prior == 'off':
        if rule_given:
            raise click.UsageError('--prior-temp/--prior-topk/--prior-topp need a prior (--prior is off)')
        return None, None
    path = prior
    if prior == 'auto':
        path = None if dnnlib.util.is_url(net_path) else prior_files.find_prior(net_path)
        if path is None:
            if rule_given:
                raise click.UsageError(f'--prior-temp/--prior-topk/--prior-topp: {net_path} has no prior '
                                       f'({prior_files.prior_path(net_path)}); fit one with train_prior.py or give --prior PATH')
            return None, None
    if getattr(net, 'condition', None) is not None:
        raise click.UsageError(f'--prior: {net_path} is a conditional network; a prior applies to unconditional networks')
    try:
        loaded = prior_files.check_prior_fits(prior_files.load_prior(path, device), net.ks, path)
    except (OSError, ValueError) as e:
        raise click.BadParameter(str(e), param_hint='--prior') from e
    return prior_rule.PriorRule(loaded, temperature, top_k, top_p), path

# ----------------------------------------------------------------------------
# Outputs: a script replaces only what an earlier run of the same script wrote, and only with
# --force; an output's folder must be writable before the work starts.

# The nearest existing folder at or above `path` (what must be writable to create `path`).
def _existing_parent(path):
    parent = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    return parent

def check_outdir(outdir, force, marker, script, option='--outdir'):
    """Usage errors for an output folder, before any work: it must be new or empty; with --force it
    may hold an earlier run of `script`, whose `marker` file lists what that run wrote, and nothing
    else. Returns the relative paths to delete before writing (those of the earlier run)."""
    if os.path.exists(outdir) and not os.path.isdir(outdir):
        raise click.UsageError(f'{option} {outdir} exists and is not a folder')
    existing = existing_files(outdir)
    remove = set()
    if existing and not force:
        raise click.UsageError(f'{option} {outdir} is not empty; choose a new folder, or add --force to replace '
                               f'the files of an earlier {script} run there')
    if existing:
        if marker not in existing:
            raise click.UsageError(f'{option} {outdir} is not the folder of an earlier {script} run (it has no {marker}); '
                                   '--force replaces only what such a run wrote: choose a new or empty folder')
        try:
            remove = recorded_outputs(outdir, marker)
        except ValueError as e:
            raise click.UsageError(f'{option}: {e}') from None
        foreign = sorted(existing - remove)
        if foreign:
            raise click.UsageError(f'{option} {outdir} holds {len(foreign)} file(s) that the earlier {script} run did not write '
                                   f'(e.g. {foreign[0]}); --force replaces only what it wrote: move them, or choose another folder')
    check_writable_dir(outdir if os.path.isdir(outdir) else _existing_parent(outdir), option)
    return remove

# Whether a file starts with `magic` (e.g. b'\x89PNG'): the kind of file a figure script writes.
def starts_with(magic):
    def check(path):
        with open(path, 'rb') as f:
            return f.read(len(magic)) == magic
    return check

PNG_MAGIC, NPY_MAGIC, GIF_MAGIC = b'\x89PNG\r\n\x1a\n', b'\x93NUMPY', b'GIF8'

def check_output_file(path, force, is_ours, what, option='--out'):
    """Usage errors for an output file, before any work: not a folder; an existing file is replaced
    only with --force and only when `is_ours(path)` (it is `what`, a file this script writes); its
    folder must be writable."""
    if os.path.isdir(path):
        raise click.UsageError(f'{option} {path} is a folder; give a file name')
    if os.path.lexists(path):
        if not force:
            raise click.UsageError(f'{option} {path} exists; choose a new name, or add --force to replace it')
        if not os.path.isfile(path) or not is_ours(path):
            raise click.UsageError(f'{option} {path} exists and is not {what}; --force replaces only such a file: choose a new name')
    check_writable_dir(_existing_parent(path), option)

# Numbers: click.FloatRange lets nan and inf through (every comparison with nan is False).

# Largest seed: torch and numpy generators take int64 seeds.
MAX_SEED = 2**63 - 1

class FiniteFloatRange(click.FloatRange):
    """click.FloatRange that refuses nan and +-inf."""
    def convert(self, value, param, ctx):
        rv = super().convert(value, param, ctx)
        if not math.isfinite(rv):
            self.fail(f'{value!r} is not a finite number', param, ctx)
        return rv

def seed_range():
    """The click type of a --seed option: 0 .. MAX_SEED."""
    return click.IntRange(min=0, max=MAX_SEED)

# ----------------------------------------------------------------------------
# Outputs: checked writable before the work starts, so a read-only or missing folder fails at once,
# not after an hour of computing.

def check_writable_dir(folder, option):
    """Usage error naming `option` unless `folder` exists, is a folder, and a file can be created in it
    (checkpoint.check_writable: tried for real)."""
    folder = folder or '.'
    if not os.path.isdir(folder):
        raise click.UsageError(f'{option}: folder {folder} does not exist' if not os.path.exists(folder) else
                               f'{option}: {folder} is not a folder')
    try:
        checkpoint.check_writable(folder)
    except ValueError as e:
        raise click.UsageError(f'{option}: {e}') from None

def write_error(err, option, path):
    """A one-line click error for an OSError met while writing `path` (a full disk named as such)."""
    import errno
    if getattr(err, 'errno', None) == errno.ENOSPC:
        return click.ClickException(f'{option} {path}: the disk is full ({err.strerror}); free some space and run again')
    return click.ClickException(f'{option} {path}: cannot write: {err}')
