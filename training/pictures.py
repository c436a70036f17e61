"""Pictures of a snapshot, written beside it by the training loop: a grid of samples of fixed seeds
and the node usage of Split-and-Prune (a bar plot of a few layers, with the snapshot's usage on
data beside the statistics, and the summary numbers of all layers that the tick report logs). Pixels go through `images.py`, as generate.py's do.
"""

import math

import PIL.Image
import PIL.ImageDraw
import torch

from training import prior_rule
from training.images import make_grid, to_pil, to_uint8
from training.determinism import batch_invariant
from training.split_prune import find_node_sets

# Seeds of the images in every sample grid (a fixed 8x8 grid, so grids of a run are comparable).
SAMPLE_GRID_SEEDS = range(64)

# Gap between the cells of a sample grid, in pixels, and its grey level.
GRID_GAP, GRID_GAP_VALUE = 2, 128

# Samples of fixed seeds as a square grid, upscaled (nearest) so that cells are at least 64 px, with
# grey gaps between cells (digits touch their borders); pixels as generate.py saves them.
# With `prior` (training/prior.py, unconditional nets), each seed's codes are drawn through it at
# temperature 1 from that seed's uniforms, as generate.py --prior does.
@torch.no_grad()
def sample_grid(net, seeds=SAMPLE_GRID_SEEDS, batch=64, cond_images=None, cond_labels=None, prior=None):
    seeds = list(seeds)
    condition = None
    if getattr(net, 'condition', None):  # Conditional nets: the conditions of the first dataset images.
        condition = net.make_condition(cond_images[:len(seeds)], cond_labels[:len(seeds)])
    def chunk(i):
        if prior is not None:
            return net(codes=prior_rule.sample(prior, net.seed_uniforms(seeds[i : i + batch])))
        return net(seeds=seeds[i : i + batch], condition=None if condition is None else condition[i : i + batch])
    with batch_invariant():
        images = torch.cat([chunk(i).images.float().cpu() for i in range(0, len(seeds), batch)])
    return to_pil(make_grid(to_uint8(images).numpy(), min_cell=64, gap=GRID_GAP, fill=GRID_GAP_VALUE))

# Size of one panel of the node-usage plot.
USAGE_PANEL_SIZE = (640, 160)

# Layers shown in the node-usage plot: first, middle, last, and `extra` (e.g. the layer that uses
# the fewest nodes on data), without repeats.
def usage_layers(num_layers, extra=()):
    return sorted({0, num_layers // 2, num_layers - 1, *extra})

# Colours of the bars: Split-and-Prune's statistics, and the usage on data.
STATS_COLOR, DATA_COLOR = (70, 110, 200), (240, 140, 30)

# Bars of K * frequency (1 = the uniform share 1/K) of the nodes of a few layers, with the 1/K line:
# blue, how often each node was the nearest in training (Split-and-Prune's statistics); orange,
# beside it, how often the encoded training images choose it (`data_usage`, a code_usage dict of
# this network; its least used layer is shown too). A node with a blue bar and no orange one is
# balanced in the statistics but dead on data.
@torch.no_grad()
def node_usage_plot(net, data_usage=None):
    ddls = find_node_sets(net)
    extra = ()
    if data_usage is not None:
        shares = [n / k for n, k in zip(data_usage['used'], data_usage['ks'])]
        extra = (min(range(len(shares)), key=shares.__getitem__),)
    layers = usage_layers(len(ddls), extra)
    pw, ph = USAGE_PANEL_SIZE
    image = PIL.Image.new('RGB', (pw, ph * len(layers)), 'white')
    draw = PIL.ImageDraw.Draw(image)
    for row, l in enumerate(layers):
        stats = ddls[l].node_stats
        K = stats.K
        usage = (stats.frequency() * K).double().cpu().numpy()
        data = None if data_usage is None else [f * K for f in data_usage['freq'][l]]
        dead = int((stats.count == 0).sum()) if float(stats.count.sum()) > 0 else 0
        top = row * ph
        left, right, y0, y1 = 40, pw - 10, top + 22, top + ph - 12    # Plot area; y1 = value 0.
        ymax = max(2.0, math.ceil(float(max(usage.max(), max(data) if data else 0))))
        title = (f'layer {l}  K={K}  splits {int(stats.num_splits)}  dead {dead}  '
                 f'max {usage.max():.2f}/K  min {usage.min():.2f}/K')
        if data is not None:
            title += f'  |  on data: used {data_usage["used"][l]}/{K}, {data_usage["entropy"][l]:.2f} of {math.log2(K):.2f} bits'
        draw.text((left, top + 4), title, fill='black')
        draw.line([(left, y0), (left, y1), (right, y1)], fill='black')
        for v in range(0, int(ymax) + 1, max(1, math.ceil(ymax / 5))):      # At most about 6 labels.
            y = y1 - (y1 - y0) * v / ymax
            draw.text((left - 14, y - 5), str(v), fill='black')
        bar_w = (right - left) / K
        for k in range(K):
            x0 = left + k * bar_w
            bars = [(usage[k], STATS_COLOR)] if data is None else [(usage[k], STATS_COLOR), (data[k], DATA_COLOR)]
            w = 0.7 * bar_w / len(bars)
            for i, (u, color) in enumerate(bars):
                if u <= 0:              # No bar at all for a node never chosen (not even a 1-pixel line).
                    continue
                h = (y1 - y0) * min(u, ymax) / ymax
                xa = x0 + 0.15 * bar_w + i * w
                draw.rectangle([xa, y1 - h, xa + max(w, 1), y1], fill=color)
        y_uniform = y1 - (y1 - y0) / ymax
        draw.line([(left, y_uniform), (right, y_uniform)], fill=(220, 40, 40))
    return image

# Summary of Split-and-Prune over all layers, as host numbers (one device-to-host copy).
@torch.no_grad()
def node_usage_summary(net):
    ddls = find_node_sets(net)
    rows = []
    for ns in ddls:
        st = ns.node_stats
        freq = st.frequency()
        tv = 0.5 * (freq - 1 / st.K).abs().sum()                      # Distance to uniform usage.
        dead = torch.where(st.count.sum() > 0, (st.count == 0).sum().double(), torch.zeros_like(tv))
        rows.append(torch.stack([st.num_splits.double(), dead.double(), tv.double()]))
    if not rows:
        return dict(splits=0, dead_nodes=0, usage_tv=0.0)
    total = torch.stack(rows).cpu().numpy()
    return dict(splits=int(total[:, 0].sum()), dead_nodes=int(total[:, 1].sum()), usage_tv=float(total[:, 2].mean()))
