"""The zero-shot conditional generation figure of the DDN paper, for one task on a few dataset images.

For each chosen image of a dataset, a condition is derived from it (a low-resolution copy, the image
with a hole, its luminance, a low-bit copy, its edge map, or the image itself), an unconditional DDN
is guided by that condition (`sampling/guidance.py`, the guide of `--task` built by
`sampling/guide_spec.py`), and one row of the figure shows:

    condition | guided result of each seed | ground truth

Rows are stacked into one PNG (`--out`). Cells are nearest-upscaled to at least `--cell` pixels
(an integer factor: res * ceil(cell / res)); every cell is framed by a white separator of
max(1, cell // 32) pixels, so the image is  (S + 2) * cell + (S + 3) * sep  wide and
N * cell + (N + 1) * sep  high, for S seeds and N images. The run also prints the mean guide
distance of the guided results and of unguided samples of the same seeds.

With a prior over the codes (`--prior`, default auto: the network file's own X.prior.safetensors) the
unguided samples come from the prior and the guide's choice is weighed by it (the rule:
sampling/prior_sampling.py); `--prior=off` gives the uniform codes.

Example:
    python zscg.py --network=training-runs/00000-digits --task=superres --images=0-3 --seeds=0-5

SECURITY: --network loads without running code from the file (training/snapshot.py) unless --trust-pickle.
"""

import math

import click
import numpy as np
import torch
import tqdm

import cli
from cli import device_option
from torch_utils.distributed import pick_device
from sampling import guidance
from training.ddl import resize_area
from sampling.guide_spec import parse_guides
from sampling.prior_sampling import sample_with_prior
from training.image_ops import edge_map, grayscale, quantize
from training.images import check_png_out, make_grid, save_png, to_float, to_uint8
from training.determinism import batch_invariant

# Tasks: the condition is computed from the ground truth.
TASKS = ('superres', 'inpaint', 'color', 'lowbit', 'edge', 'l2')

# Temperature of the guided choice when neither --temperature nor --topk is given (a figure shows variety).
DEFAULT_TEMPERATURE = 0.2

# Most rows (--images) and columns (--seeds) of one figure.
MAX_CELLS = 256

# Regions an inpainting row must fill.
HOLES = ('bottom', 'top', 'left', 'right', 'center')

# ----------------------------------------------------------------------------
# Command-line helpers.

# The EMA network of a snapshot pickle, URL or run folder (training/snapshot.py), in eval mode. ZSCG
# guides an unconditional network: a conditional one would need its condition at every call.
def load_network(network, device, trust_pickle=False, with_path=False):
    path, net = cli.load_network(network, device, trust_pickle=trust_pickle)
    if getattr(net, 'condition', None) is not None:
        raise click.ClickException(f'{network}: this network is conditioned on {net.condition!r}; zscg.py guides '
                                   'unconditional networks (generate.py --guide combines guidance with a condition)')
    return (path, net) if with_path else net

# ----------------------------------------------------------------------------
# Conditions: the degraded observation of the ground truth that a task starts from.

# Mask (1, 1, res, res) with 1 = known pixel, 0 = the hole.
def hole_mask(res, hole):
    m = torch.ones(1, 1, res, res)
    h = max(1, res // 2)
    q = res // 4
    if hole == 'bottom':
        m[..., res - h:, :] = 0
    elif hole == 'top':
        m[..., :h, :] = 0
    elif hole == 'left':
        m[..., :, :h] = 0
    elif hole == 'right':
        m[..., :, res - h:] = 0
    else:
        m[..., q:res - q, q:res - q] = 0
    return m

# The observation of `task` made from ground truth x (1, C, res, res): (the inputs of parse_guides,
# its picture (1, C, res, res) in [-1, 1] for the figure).
def degraded_observation(task, x, sr_size, bits, hole):
    res, C = x.shape[-1], x.shape[1]
    if task == 'superres':
        low = resize_area(x, sr_size)
        return dict(image=low), torch.nn.functional.interpolate(low, size=(res, res), mode='nearest')
    if task == 'inpaint':
        m = hole_mask(res, hole)
        return dict(image=x * m, mask=m), x * m                   # The hole shows as mid-gray (0).
    if task == 'color':
        gray = grayscale(x)
        return dict(image=gray), gray.expand(-1, C, -1, -1)
    if task == 'lowbit':
        q = quantize(x, bits)
        return dict(image=q, bits=bits), q
    if task == 'edge':
        e = edge_map(x) * 2 - 1
        return dict(image=e), e.expand(-1, C, -1, -1)
    return dict(image=x), x                                       # l2

# ----------------------------------------------------------------------------
# Figure layout.

# Rows of uint8 images (C, res, res) -> one uint8 (C, H, W) grid: cells nearest-upscaled by
# ceil(cell_min / res), each framed by white separators of max(1, cell // 32) pixels.
def layout(rows, cell_min):
    res = rows[0][0].shape[-1]
    cell = res * max(1, math.ceil(cell_min / res))
    sep = max(1, cell // 32)
    grid = make_grid(np.stack([image for row in rows for image in row]), cols=len(rows[0]), min_cell=cell, gap=sep, fill=255)
    return np.pad(grid, ((0, 0), (sep, sep), (sep, sep)), constant_values=255)

# ----------------------------------------------------------------------------

@click.command()
@click.option('--network', help='Network snapshot (.safetensors or .pkl), URL, or run folder (its latest snapshot)', metavar='FILE|URL|DIR', required=True)
@click.option('--data', help='Dataset of the ground-truth images: folder, zip, or "digits"', metavar='PATH|digits', default='digits', show_default=True)
@click.option('--task', help='Task: how the condition is made from each image', type=click.Choice(TASKS), default='superres', show_default=True)
@click.option('--images', 'indices', help='Indices of the dataset images, one row each', metavar='LIST', default='0-3', show_default=True, callback=cli.int_list(MAX_CELLS))
@click.option('--seeds', help='Seeds, one column each', metavar='LIST', default='0-5', show_default=True, callback=cli.int_list(MAX_CELLS))
@click.option('--out', help='Output PNG', metavar='PNG', default='zscg.png', show_default=True)
@click.option('--sr-size', help='superres: resolution of the condition  [default: resolution / 4]', metavar='INT', type=click.IntRange(min=1), default=None)
@click.option('--bits', help='lowbit: bits per channel of the condition', metavar='INT', type=click.IntRange(min=1, max=8), default=1, show_default=True)
@click.option('--hole', help='inpaint: the region to fill', type=click.Choice(HOLES), default='bottom', show_default=True)
@click.option('--temperature', help='Softmax temperature of the choice (0 = argmin: every seed gives the same image)  [default: 0.2 without --topk]', metavar='FLOAT', type=cli.FiniteFloatRange(min=0), default=None)
@click.option('--topk', help='Choose uniformly among the N best instead of --temperature', metavar='INT', type=click.IntRange(min=1), default=None)
@click.option('--cell', help='Smallest cell side in pixels (nearest upscaling)', metavar='INT', type=click.IntRange(min=1), default=64, show_default=True)
@cli.prior_options
@device_option()
@click.option('--trust-code', '--trust-pickle', 'trust_pickle', help='Load a --network pickle that is not a plain ddn snapshot (it runs code)', is_flag=True)
@click.option('--force', help='Replace an existing --out PNG', is_flag=True)
def main(network, data, task, indices, seeds, out, sr_size, bits, hole, temperature, topk, cell, prior, prior_temp, prior_topk,
         prior_topp, device, trust_pickle, force):
    """Zero-shot conditional generation figure: condition | guided results per seed | ground truth."""
    try:
        check_png_out(out)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint='--out') from e
    cli.check_output_file(out, force, cli.starts_with(cli.PNG_MAGIC), 'a PNG image')
    if temperature is None and topk is None:
        temperature = DEFAULT_TEMPERATURE
    chooser, _ = cli.chooser(temperature, topk, options=('--temperature', '--topk'))
    device = pick_device(device)
    net_path, net = load_network(network, device, trust_pickle, with_path=True)
    rule, prior_path = cli.load_prior(prior, net, net_path, device, prior_temp, prior_topk, prior_topp)
    if rule is not None:
        print(f'Prior: {prior_path} (temperature {prior_temp}, top-k {prior_topk or "all"}, top-p {prior_topp})')
    # Samples, guided or not: through the prior when there is one (sampling/prior_sampling.py).
    run = (lambda **kw: net(seeds=seeds, **kw)) if rule is None else (lambda **kw: sample_with_prior(net, seeds, rule, **kw))
    res, C = net.img_resolution, net.img_channels
    dataset = cli.open_dataset_for(data, net)
    if max(indices) >= len(dataset):
        raise click.ClickException(f'--images: index {max(indices)} out of range; the dataset has {len(dataset)} images')
    sr_size = sr_size or max(1, res // 4)
    if task == 'superres' and (sr_size > res or res % sr_size):
        raise click.ClickException(f'--sr-size {sr_size} must divide the resolution {res}')

    rows, guided_d, unguided_d = [], [], []
    with torch.no_grad(), batch_invariant():
        unguided = run().images
        for idx in tqdm.tqdm(indices, desc=f'zscg {task}', unit='image'):
            try:
                x = to_float(torch.from_numpy(dataset[idx][0]).to(device))[None]
            except ValueError as e:     # DatasetError: an image that cannot be decoded.
                raise click.ClickException(f'--data {data}: {e}') from None
            inputs, condition = degraded_observation(task, x, sr_size, bits, hole)
            scorer = parse_guides(task, img_channels=C, img_resolution=res, device=device,
                                  **{k: v.to(device) if torch.is_tensor(v) else v for k, v in inputs.items()})
            results = run(scorer=scorer, chooser=chooser).images
            guided_d.append(guidance.final_distance(scorer, results).mean().item())
            unguided_d.append(guidance.final_distance(scorer, unguided).mean().item())
            cells = torch.cat([condition, results, x])                    # condition | seeds | ground truth.
            rows.append(list(to_uint8(cells).cpu().numpy()))
    try:
        save_png(layout(rows, cell), out)
    except OSError as e:
        raise cli.write_error(e, '--out', out) from None
    print(f'{task}: mean guide distance {np.mean(guided_d):.4g} guided vs {np.mean(unguided_d):.4g} unguided '
          f'({len(indices)} images x {len(seeds)} seeds) -> {out}')

# ----------------------------------------------------------------------------

if __name__ == '__main__':
    main()
