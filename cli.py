"""Command-line helpers shared by the scripts (generate.py, zscg.py, ...): the only library-side code
that knows option names. The packages below take keyword arguments and raise ValueError; these
helpers turn options into those arguments and errors into click usage errors."""

import math
import pickle

import click

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
    (tried for real: permissions alone do not tell a read-only mount, and root passes every permission)."""
    import os
    import tempfile
    folder = folder or '.'
    if not os.path.isdir(folder):
        raise click.UsageError(f'{option}: folder {folder} does not exist' if not os.path.exists(folder) else
                               f'{option}: {folder} is not a folder')
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix='.write-test-'):
            pass
    except OSError as err:
        raise click.UsageError(f'{option}: cannot write in {folder}: {err.strerror or err}') from None

def check_output_file(path, option, make_parents=False):
    """Usage error naming `option` unless `path` can be written as a file (its folder exists and is
    writable, and `path` is not a folder). With `make_parents`, the folder may be missing: then its
    nearest existing ancestor must be writable."""
    import os
    if os.path.isdir(path):
        raise click.UsageError(f'{option}: {path} is a folder; give a file name')
    folder = os.path.dirname(os.path.abspath(path))
    while make_parents and not os.path.exists(folder) and os.path.dirname(folder) != folder:
        folder = os.path.dirname(folder)
    check_writable_dir(folder, option)

def write_error(err, option, path):
    """A one-line click error for an OSError met while writing `path` (a full disk named as such)."""
    import errno
    if getattr(err, 'errno', None) == errno.ENOSPC:
        return click.ClickException(f'{option} {path}: the disk is full ({err.strerror}); free some space and run again')
    return click.ClickException(f'{option} {path}: cannot write: {err}')
