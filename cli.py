"""Command-line helpers shared by the scripts (generate.py, zscg.py, ...): the only library-side code
that knows option names. The packages below take keyword arguments and raise ValueError; these
helpers turn options into those arguments and errors into click usage errors."""

import pickle

import click

import dnnlib
from sampling.guide_spec import GUIDE_TYPES, parse_guides
from torch_utils import distributed as dist
from training import prior as prior_lib

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
        path = None if dnnlib.util.is_url(net_path) else prior_lib.find_prior(net_path)
        if path is None:
            if rule_given:
                raise click.UsageError(f'--prior-temp/--prior-topk/--prior-topp: {net_path} has no prior '
                                       f'({prior_lib.prior_path(net_path)}); fit one with train_prior.py or give --prior PATH')
            return None, None
    if getattr(net, 'condition', None) is not None:
        raise click.UsageError(f'--prior: {net_path} is a conditional network; a prior applies to unconditional networks')
    try:
        loaded = prior_lib.check_prior_fits(prior_lib.load_prior(path, device), net.ks, path)
    except (OSError, ValueError) as e:
        raise click.BadParameter(str(e), param_hint='--prior') from e
    return prior_lib.PriorRule(loaded, temperature, top_k, top_p), path
