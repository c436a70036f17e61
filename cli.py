"""Command-line helpers shared by the scripts (generate.py, zscg.py, ...): the only library-side code
that knows option names. The packages below take keyword arguments and raise ValueError; these
helpers turn options into those arguments and errors into click usage errors."""

import os
import pickle

import click

from sampling.generation import existing_files, recorded_outputs
from sampling.guide_spec import GUIDE_TYPES, parse_guides
from torch_utils import distributed as dist

# ----------------------------------------------------------------------------
# generate.py's guide options: which guide reads which option, the scorer of the options, the choice rule.

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
    except (OSError, ValueError, RuntimeError, pickle.UnpicklingError) as e:
        raise ValueError(f'--guide {opts.guide}: {e}') from e
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
    target = outdir if os.path.isdir(outdir) else _existing_parent(outdir)
    if not os.access(target, os.W_OK | os.X_OK):
        raise click.UsageError(f'{option} {outdir}: no permission to write in {target}')
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
    folder = _existing_parent(path)
    if not os.access(folder, os.W_OK | os.X_OK):
        raise click.UsageError(f'{option} {path}: no permission to write there')
