"""How long a demo.py request takes, per mode: through the HTTP API (what the page waits for) and
in the library alone (`sampling.interactive.run_request`, no server), per image.

    python bench/demo.py --network training-runs/00000-digits-... [--seeds 0-7] [--repeats 3]

Starts demo.py on a free local port, sends each mode's request `--repeats` times and prints the
best time of each (the machine may be busy), in milliseconds per request and per image. A request
computes the guided and the unguided images of every seed and the coarse-to-fine path of one.
"""

import os
import sys
import tempfile
import time

import click
import numpy as np
import PIL.Image
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from sampling import interactive
import demo
from training.ddl import resize_area
from training.image_ops import edge_map
from training.images import save_png, to_uint8
from training.snapshot import load_network

WEIGHTS = ('inpaint', 'superres', 'color', 'lowbit', 'edge', 'l2', 'clip')

def _inputs(net, folder):
    """One stroke layer and one upload per guide kind, as files and as arrays."""
    res, canvas = net.img_resolution, interactive.CANVAS_SIZE
    layer = np.zeros((canvas, canvas, 4), np.uint8)
    layer[canvas // 8:canvas // 2, canvas // 3:2 * canvas // 3] = 255
    PIL.Image.fromarray(layer).save(os.path.join(folder, 'layer.png'))
    PIL.Image.new('RGBA', (canvas, canvas)).save(os.path.join(folder, 'blank.png'))
    x = net(seeds=[12345]).images.clamp(-1, 1)
    images = dict(full=x, low=resize_area(x, max(1, res // 2)), edges=edge_map(x) * 2 - 1)
    files = {}
    for name, image in images.items():
        files[name] = os.path.join(folder, f'{name}.png')
        save_png(to_uint8(image[0]).numpy(), files[name])
    return layer, files

# Mode name -> (weights, which upload, extra request fields).
MODES = {
    'strokes (inpaint)':    (dict(inpaint=1), None, {}),
    'superres':             (dict(superres=1), 'low', {}),
    'color':                (dict(color=1), 'full', {}),
    'lowbit (1 bit)':       (dict(lowbit=1), 'full', dict(bits=1)),
    'edge':                 (dict(edge=1), 'edges', {}),
    'l2':                   (dict(l2=1), 'full', {}),
    'strokes + superres':   (dict(inpaint=1, superres=0.5), 'low', {}),
    'unguided':             ({}, None, {}),
}

@click.command()
@click.option('--network', required=True, help='Network snapshot or run folder')
@click.option('--seeds', default='0-7', show_default=True, help='Seeds per request')
@click.option('--repeats', default=3, show_default=True, type=click.IntRange(min=1), help='Requests per mode (best is kept)')
def main(network, seeds, repeats):
    from gradio_client import Client, handle_file
    torch.set_num_threads(1)
    _, net = load_network(network, 'cpu')
    num = len(interactive.parse_seeds(seeds))
    folder = tempfile.mkdtemp(prefix='ddn-bench-demo-')
    layer, files = _inputs(net, folder)
    with demo.serving(network) as (url, _):
        client = Client(url, verbose=False)
        editor = dict(background=handle_file(os.path.join(folder, 'blank.png')), layers=[handle_file(os.path.join(folder, 'layer.png'))],
                      composite=handle_file(os.path.join(folder, 'layer.png')), id=None)
        print(f'{network}: {net.img_resolution}x{net.img_resolution}, {net.num_layers} layers; {num} seeds per request, best of {repeats}')
        print(f'{"mode":22s} {"API ms/request":>15s} {"API ms/image":>13s} {"library ms/image":>17s}')
        for mode, (weights, upload, extra) in MODES.items():
            w = [float(weights.get(name, 0)) for name in WEIGHTS]
            up = handle_file(files[upload]) if upload else None
            api = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                client.predict(editor if 'inpaint' in weights else None, up, *w, extra.get('bits', 1), '', seeds, 0.3, 0, '', False,
                               api_name='/generate')
                api.append(time.perf_counter() - t0)
            lib = []
            picture = PIL.Image.open(files[upload]) if upload else None
            for _ in range(repeats):
                t0 = time.perf_counter()
                interactive.run_request(net, weights, seeds, temperature=0.3, strokes=dict(layers=[layer]), upload=picture, bits=extra.get('bits'))
                lib.append(time.perf_counter() - t0)
            print(f'{mode:22s} {min(api) * 1e3:15.0f} {min(api) * 1e3 / num:13.1f} {min(lib) * 1e3 / num:17.1f}')

if __name__ == '__main__':
    main()
