"""Draw the latent tree of a trained DDN: its first levels as recursive grids (paper Fig. 6, MNIST).

Every node of the tree is an image chosen at some layer, identified by its code prefix (k_1..k_l).
The picture is a grid around a centre cell: the centre shows the node (the root shows the mean of
all drawn leaves), the K_{l+1} cells around it its children, each child again a grid of its own
children, down to `--levels` levels. A node's image and the border of the grid of its children share
the node's level colour; the small images without a frame are the leaves (layer `--levels`). Bigger
images come earlier in the generation, so they are coarser: a layer's image, smaller than the
output, is upsampled bilinearly (as the next layer's learning residual sees it).

For the paper's figure (K = 8, L = 3) train e.g. on the built-in digits with
`--start-size 4 --max-blockn 1 --max-outputk 8` (layers at 4x4, 8x8, 16x16) and draw `--levels 3`.

SECURITY: --network loads without running code from the file (training/snapshot.py) unless --trust-pickle.
"""

import itertools
import math

import click
import numpy as np
import PIL.Image
import PIL.ImageDraw
import torch
from torch.nn import functional as F

import cli
from torch_utils import distributed as dist
from training.images import check_png_out, save_png, to_pil, to_uint8
from training.determinism import batch_invariant

# Level colours: the root's children's grid border, then one per level.
LEVEL_COLOURS = [(230, 25, 75), (245, 130, 48), (60, 180, 75), (0, 130, 200), (145, 30, 180), (240, 50, 230), (128, 128, 0)]

# Most leaves the picture may hold (K_1 x ... x K_levels).
MAX_LEAVES = 1 << 16

# ----------------------------------------------------------------------------

# Side of the odd square grid holding a centre cell and K cells around it.
def grid_side(K):
    g = math.ceil(math.sqrt(K + 1))
    return g if g % 2 else g + 1

# Grid cells (row, col) of the K children, row by row, skipping the centre.
def child_cells(K):
    g = grid_side(K)
    c = g // 2
    cells = [(r, q) for r in range(g) for q in range(g) if (r, q) != (c, c)]
    return cells[:K]

# Side in pixels of the whole picture for K per level and a leaf cell of `cell` pixels.
def tree_size(ks, cell):
    return cell * math.prod(grid_side(k) for k in ks)

# ----------------------------------------------------------------------------
# The images of the tree's nodes.

@torch.no_grad()
def node_images(net, levels, batch=1024):
    """uint8 (N, C, H, W) images of every node of the first `levels` levels, as a list per level:
    entry l holds the K_1 x ... x K_{l+1} images of layer l in lexicographic code order, upsampled to
    the output resolution; plus the mean of the leaves (C, H, W) uint8."""
    ks = net.ks[:levels]
    leaves = np.array(list(itertools.product(*[range(k) for k in ks])), dtype=np.int64).reshape(-1, levels)
    device = net.init_feature.device
    per_level = [[] for _ in range(levels)]
    leaf_sum = None
    for start in range(0, len(leaves), batch):
        codes = torch.from_numpy(leaves[start:start + batch]).to(device)
        with batch_invariant():
            out = net(codes=codes, num_layers=levels, return_layers=True)
        for l, image in enumerate(out.layer_images):
            image = image.float()
            if image.shape[-1] != net.img_resolution:
                image = F.interpolate(image, size=(net.img_resolution,) * 2, mode='bilinear', align_corners=False)
            if l == levels - 1:
                leaf_sum = image.sum(0) if leaf_sum is None else leaf_sum + image.sum(0)
            # The image of a prefix of length l + 1 is that of its first leaf (later codes set to 0).
            stride = math.prod(ks[l + 1:])
            first = torch.arange(start, start + len(codes), device=device) % stride == 0
            per_level[l].append(to_uint8(image[first]).cpu())
    images = [torch.cat(chunks).numpy() for chunks in per_level]
    mean = to_uint8(leaf_sum / len(leaves)).cpu().numpy()
    return images, mean

# ----------------------------------------------------------------------------
# Drawing.

def _to_rgb(image, side):
    return to_pil(image).convert('RGB').resize((side, side), PIL.Image.Resampling.NEAREST)

# Paste an image into a square cell (x, y, side), inset by `pad`, with an optional coloured frame.
def _paste(canvas, image, x, y, side, colour=None):
    draw = PIL.ImageDraw.Draw(canvas)
    frame = min(6, max(2, side // 14)) if colour is not None else 0
    pad = max(1, side // 16)
    inner = side - 2 * pad - 2 * frame
    if inner < 1:
        return
    if colour is not None:
        draw.rectangle([x + pad, y + pad, x + side - pad - 1, y + side - pad - 1], fill=colour)
    canvas.paste(_to_rgb(image, inner), (x + pad + frame, y + pad + frame))

def render_tree(images, mean, ks, cell):
    """The recursive grid (RGB PIL image of side tree_size(ks, cell))."""
    levels = len(ks)
    canvas = PIL.Image.new('RGB', (tree_size(ks, cell),) * 2, 'white')
    draw = PIL.ImageDraw.Draw(canvas)

    # A node at depth d (its code prefix has d codes, index `node` among its level) drawn in the
    # square block (x, y, side): itself in the centre cell, its children around it.
    def block(d, node, x, y, side):
        K, g = ks[d], grid_side(ks[d])
        sub = side // g
        colour = LEVEL_COLOURS[(d - 1) % len(LEVEL_COLOURS)] if d > 0 else None
        if colour is not None:
            draw.rectangle([x, y, x + side - 1, y + side - 1], outline=colour, width=max(1, side // 100))
        centre = mean if d == 0 else images[d - 1][node]
        _paste(canvas, centre, x + (g // 2) * sub, y + (g // 2) * sub, sub, colour if d > 0 else (128, 128, 128))
        for k, (r, q) in enumerate(child_cells(K)):
            child = node * K + k
            if d == levels - 1:
                _paste(canvas, images[d][child], x + q * sub, y + r * sub, sub)
            else:
                block(d + 1, child, x + q * sub, y + r * sub, sub)

    block(0, 0, 0, 0, canvas.width)
    return canvas

# ----------------------------------------------------------------------------

@click.command()
@click.option('--network',  help='Network snapshot (.safetensors or .pkl), URL, or run folder (latest snapshot)', metavar='FILE|URL|DIR', required=True)
@click.option('--levels',   help='Levels (layers) of the tree to draw', metavar='INT', type=click.IntRange(min=1), default=3, show_default=True)
@click.option('--out',      help='Output PNG', metavar='PNG', default='tree.png', show_default=True)
@click.option('--cell',     help='Side of a leaf cell in pixels  [default: output resolution + padding, >= 24]', metavar='INT', type=click.IntRange(min=4), default=None)
@cli.device_option()
@click.option('--trust-code', '--trust-pickle', 'trust_pickle', help='Load a --network pickle that is not a plain ddn snapshot (it runs code)', is_flag=True)
@click.option('--force',    help='Replace an existing --out PNG', is_flag=True)
def main(network, levels, out, cell, device, trust_pickle, force):
    """Draw the first levels of a trained DDN's latent tree as recursive grids.

    \b
    python tree.py --network training-runs/00000-digits --levels 3 --out tree.png
    """
    try:
        check_png_out(out)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint='--out') from e
    cli.check_output_file(out, force, cli.starts_with(cli.PNG_MAGIC), 'a PNG image')
    device = dist.pick_device(device)
    path, net = cli.load_network(network, device, trust_pickle)
    if levels > net.num_layers:
        raise click.ClickException(f'--levels {levels}: the network has only L={net.num_layers} layers')
    ks = net.ks[:levels]
    if math.prod(ks) > MAX_LEAVES:
        raise click.ClickException(f'{" x ".join(map(str, ks))} = {math.prod(ks)} leaves is too many to draw; use fewer --levels')
    if cell is None:
        cell = max(24, net.img_resolution + 2 * max(1, net.img_resolution // 8))
    images, mean = node_images(net, levels)
    picture = render_tree(images, mean, ks, cell)
    try:
        save_png(picture, out)
    except OSError as e:
        raise cli.write_error(e, '--out', out) from None
    click.echo(f'Network: {path} (L={net.num_layers}, K={ks})')
    click.echo(f'Saved {out}: {picture.width}x{picture.height}, {levels} levels, {math.prod(ks)} leaves')

# ----------------------------------------------------------------------------

if __name__ == '__main__':
    main()

# ----------------------------------------------------------------------------
