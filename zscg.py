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

Example:
    python zscg.py --network=training-runs/00000-digits --task=superres --images=0-3 --seeds=0-5

SECURITY: --network loads without running code from the file (training/snapshot.py) unless --trust-pickle.
"""

import math

import click
import numpy as np
import torch
import tqdm

import dnnlib
import cli
from cli import device_option
from torch_utils.distributed import pick_device
from sampling import guidance
from training import snapshot
from training.dataset import open_dataset
from training.ddl import resize_area
from sampling.guide_spec import make_chooser, parse_guides
from training.image_ops import edge_map, grayscale, quantize
from training.images import check_png_out, make_grid, save_png, to_float, to_uint8
from training.networks import batch_invariant

# Tasks: the condition is computed from the ground truth.
TASKS = ('superres', 'inpaint', 'color', 'lowbit', 'edge', 'l2')

# Regions an inpainting row must fill.
HOLES = ('bottom', 'top', 'left', 'right', 'center')

# ----------------------------------------------------------------------------
# Command-line helpers.

# Most rows (--images) and columns (--seeds) of one figure.
MAX_CELLS = 256

# '0-3,7' -> [0, 1, 2, 3, 7]; a click error naming `option` on bad input or more than MAX_CELLS values.
def parse_int_list(text, option):
    try:
        return dnnlib.util.parse_int_list(text, max_values=MAX_CELLS)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint=option) from None

# The EMA network of a snapshot pickle, URL or run folder (training/snapshot.py), in eval mode. ZSCG
# guides an unconditional network: a conditional one would need its condition at every call.
def load_network(network, device, trust_pickle=False):
    try:
        _, net = snapshot.load_network(network, device, trust_pickle=trust_pickle)
    except (OSError, ValueError) as e:
        raise click.ClickException(str(e)) from e
    if getattr(net, 'condition', None) is not None:
        raise click.ClickException(f'{network}: this network is conditioned on {net.condition!r}; zscg.py guides '
                                   'unconditional networks (generate.py --guide combines guidance with a condition)')
    return net

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
@click.option('--images', help='Indices of the dataset images, one row each', metavar='LIST', default='0-3', show_default=True)
@click.option('--seeds', help='Seeds, one column each', metavar='LIST', default='0-5', show_default=True)
@click.option('--out', help='Output PNG', metavar='PNG', default='zscg.png', show_default=True)
@click.option('--sr-size', help='superres: resolution of the condition  [default: resolution / 4]', metavar='INT', type=click.IntRange(min=1), default=None)
@click.option('--bits', help='lowbit: bits per channel of the condition', metavar='INT', type=click.IntRange(min=1, max=8), default=1, show_default=True)
@click.option('--hole', help='inpaint: the region to fill', type=click.Choice(HOLES), default='bottom', show_default=True)
@click.option('--temperature', help='Softmax temperature of the choice (0 = argmin: every seed gives the same image)', metavar='FLOAT', type=cli.FiniteFloatRange(min=0), default=0.2, show_default=True)
@click.option('--topk', help='Choose uniformly among the N best instead (overrides --temperature)', metavar='INT', type=click.IntRange(min=1), default=None)
@click.option('--cell', help='Smallest cell side in pixels (nearest upscaling)', metavar='INT', type=click.IntRange(min=1), default=64, show_default=True)
@device_option()
@click.option('--trust-pickle', help='Load a --network pickle that is not a plain ddn snapshot (it runs code)', is_flag=True)
def main(network, data, task, images, seeds, out, sr_size, bits, hole, temperature, topk, cell, device, trust_pickle):
    """Zero-shot conditional generation figure: condition | guided results per seed | ground truth."""
    try:
        check_png_out(out)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint='--out') from e
    device = pick_device(device)
    indices, seeds = parse_int_list(images, '--images'), parse_int_list(seeds, '--seeds')
    cli.check_output_file(out, '--out')
    net = load_network(network, device, trust_pickle)
    res, C = net.img_resolution, net.img_channels
    try:
        dataset = open_dataset(data, resolution=res)
    except (OSError, ValueError) as e:
        raise click.ClickException(f'--data {data}: {e}') from None
    if dataset.num_channels != C or dataset.resolution != res:
        raise click.ClickException(f'Dataset {data} has {dataset.num_channels}x{dataset.resolution}x{dataset.resolution} images, '
                                   f'the network makes {C}x{res}x{res}')
    if max(indices) >= len(dataset):
        raise click.ClickException(f'--images: index {max(indices)} out of range; the dataset has {len(dataset)} images')
    sr_size = sr_size or max(1, res // 4)
    if task == 'superres' and (sr_size > res or res % sr_size):
        raise click.ClickException(f'--sr-size {sr_size} must divide the resolution {res}')
    chooser, _ = make_chooser(temperature=None if topk else temperature or None, topk=topk)

    rows, guided_d, unguided_d = [], [], []
    with torch.no_grad(), batch_invariant():
        unguided = net(seeds=seeds).images
        for idx in tqdm.tqdm(indices, desc=f'zscg {task}', unit='image'):
            try:
                x = to_float(torch.from_numpy(dataset[idx][0]).to(device))[None]
            except ValueError as e:     # DatasetError: an image that cannot be decoded.
                raise click.ClickException(f'--data {data}: {e}') from None
            inputs, condition = degraded_observation(task, x, sr_size, bits, hole)
            scorer = parse_guides(task, img_channels=C, img_resolution=res, device=device,
                                  **{k: v.to(device) if torch.is_tensor(v) else v for k, v in inputs.items()})
            results = net(scorer=scorer, chooser=chooser, seeds=seeds).images
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
