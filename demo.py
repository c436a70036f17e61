"""Zero-shot conditional generation in the browser: a local web app for a trained DDN.

    python demo.py --network training-runs/00000-digits-...      # then open http://127.0.0.1:7860

Draw colour strokes (the drawn pixels become the known region of an inpainting guide), upload an
image for super-resolution / colourisation / low-bit / edge / L2 guidance, mix guides with weights,
choose seeds and the choice rule, and add a CLIP prompt when `open_clip_torch` is installed. The page
shows guided samples beside the unguided samples of the same seeds, the coarse-to-fine path of one
sample (the chosen image of every layer) and a GIF of it. Guidance is the library's
(`training/guidance.py`, `training/interactive.py`): a demo image is the image `generate.py` writes
for the same network, seed, guide and rule.

Needs gradio (`pip install gradio`), which ddn does not install by default. The app listens on
127.0.0.1 only unless `--host` says otherwise; it loads networks named in the page as `--network` does.
"""

import contextlib
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

import click
import numpy as np
import torch

import generate
from training import guidance, interactive

GRADIO_INSTALL_HINT = 'demo.py needs gradio, which ddn does not install: pip install gradio'

# At most this many seeds per request, so a typo such as 0-99999 cannot stall the page.
MAX_SEEDS = 64

# Side of the displayed images (nearest-upscaled), and of the drawing canvas.
VIEW_SIZE = 128
CANVAS_SIZE = 256

# Guides that read the uploaded image, with their slider labels.
UPLOAD_GUIDES = {
    'superres': 'super-resolution (upload: a low-resolution image)',
    'color':    'colourisation (upload: a grayscale image; luminance L2)',
    'lowbit':   'low-bit (upload, quantised to the bits below)',
    'edge':     'edges (upload: an edge map, white = edge)',
    'l2':       'L2 to the upload',
}

# ----------------------------------------------------------------------------
# Request -> library calls. Every failure of the user's input is a ValueError with a message for
# the page.

def parse_seeds(text):
    """'0-7' -> [0, ..., 7], at most MAX_SEEDS seeds (checked before a range is expanded)."""
    text = str(text or '').strip()
    if not text:
        raise ValueError('No seeds given: write e.g. 0-7 or 1,5,9')
    for lo, hi in re.findall(r'(\d+)\s*-\s*(\d+)', text):
        if int(hi) - int(lo) + 1 > MAX_SEEDS:
            raise ValueError(f'Seed range {lo}-{hi} has more than {MAX_SEEDS} seeds')
    seeds = generate.parse_int_list(text)
    if len(seeds) > MAX_SEEDS:
        raise ValueError(f'{len(seeds)} seeds given; the demo takes at most {MAX_SEEDS} per request')
    return seeds

def _editor_layers(editor):
    """The stroke layers of an ImageEditor value (a dict with 'layers'), or [] if nothing is drawn."""
    if not editor:
        return []
    layers = editor.get('layers') or []
    return [np.asarray(layer) for layer in layers if layer is not None and np.asarray(layer).size]

def build_scorer(net, weights, strokes=None, upload=None, bits=None, text=None, resize=False, device='cpu'):
    """The CombinedScorer of the weighted guides (None if every weight is 0), each guide built by
    `guidance.parse_guides` as generate.py builds it. weights: {guide: weight}; 'inpaint' reads the
    strokes, the UPLOAD_GUIDES the upload, 'clip' the text."""
    ch, res = net.img_channels, net.img_resolution
    parts = []
    for name, weight in weights.items():
        if not weight:
            continue
        kwargs = {}
        if name == 'inpaint':
            layers = _editor_layers(strokes)
            image, mask = interactive.strokes_to_guide(layers, ch, res)
            kwargs = dict(image=image, mask=mask)
        elif name in UPLOAD_GUIDES:
            if upload is None:
                raise ValueError(f'The {name} guide needs an uploaded image')
            # As generate.py reads --guide-image: colour and edge guides as grayscale files.
            channels = 1 if name in ('color', 'edge') else ch
            image = interactive.upload_to_guide(upload, channels, res, low_res=name == 'superres', resize=resize)
            kwargs = dict(image=image, bits=int(bits) if bits else None)
        elif name == 'clip':
            if not (text or '').strip():
                raise ValueError('The CLIP guide needs a text prompt')
            kwargs = dict(text=text.strip())
        else:
            raise ValueError(f'Unknown guide {name!r}')
        combined = guidance.parse_guides(f'{name}:{weight}', img_channels=ch, img_resolution=res, device=device, **kwargs)
        parts.extend(combined.scorers)
    return guidance.CombinedScorer(parts) if parts else None

def run_request(net, weights, seeds_text, temperature=0.0, topk=0, path_seed=None, strokes=None, upload=None,
                bits=None, text=None, resize=False, device='cpu'):
    """Everything one click of "Generate" computes: a GuidedResult plus the uint8 images to show."""
    seeds = parse_seeds(seeds_text)
    chooser = interactive.make_chooser(temperature=temperature or None, topk=int(topk) if topk else None)
    scorer = build_scorer(net, weights, strokes=strokes, upload=upload, bits=bits, text=text, resize=resize, device=device)
    if path_seed in (None, ''):
        path_seed = seeds[0]
    result = interactive.run_guided(net, scorer, seeds, chooser=chooser, path_seed=int(path_seed))
    return result, scorer is not None

def _view(images):
    """(N, C, H, W) [-1, 1] images -> list of HxWx3 uint8 arrays, nearest-upscaled to VIEW_SIZE."""
    u8 = generate.to_uint8(images).numpy()
    scale = max(1, VIEW_SIZE // u8.shape[-1])
    out = []
    for x in u8:
        x = x.repeat(scale, axis=1).repeat(scale, axis=2).transpose(1, 2, 0)
        out.append(np.repeat(x, 3, axis=2) if x.shape[2] == 1 else x)
    return out

# ----------------------------------------------------------------------------
# The page.

def build_app(network, device):
    """A gradio Blocks app serving `network` (path, URL or run folder) on `device`."""
    try:
        import gradio as gr
    except ImportError as e:
        raise click.ClickException(f'{GRADIO_INSTALL_HINT} ({e})') from e
    holder = {}

    def load(name):
        name = (name or '').strip()
        if not name:
            raise gr.Error('Give a network: a network-snapshot-*.pkl, a URL or a run folder')
        try:
            path, net = generate.load_network(name, device)
        except (OSError, ValueError, RuntimeError) as e:
            raise gr.Error(f'Could not load the network: {e}') from None
        if net.condition is not None:
            raise gr.Error(f'{path} is conditioned on {net.condition!r}; the demo guides unconditional networks')
        holder.update(net=net, path=path)
        return _describe()

    def _describe():
        net = holder['net']
        kind = 'grayscale' if net.img_channels == 1 else 'RGB'
        return (f'**{holder["path"]}** — {net.img_resolution}x{net.img_resolution} {kind}, '
                f'{net.num_layers} layers, K up to {max(net.ks)}. Upload guides must be '
                f'{net.img_resolution}x{net.img_resolution} (super-resolution: a size that divides it).')

    def generate_fn(strokes, upload, w_inpaint, w_superres, w_color, w_lowbit, w_edge, w_l2, w_clip, bits, text,
                    seeds, temperature, topk, path_seed, resize):
        if 'net' not in holder:
            raise gr.Error('No network is loaded')
        weights = dict(inpaint=w_inpaint, superres=w_superres, color=w_color, lowbit=w_lowbit, edge=w_edge, l2=w_l2, clip=w_clip)
        try:
            result, guided = run_request(holder['net'], weights, seeds, temperature=temperature, topk=topk,
                                         path_seed=path_seed, strokes=strokes, upload=upload, bits=bits, text=text,
                                         resize=resize, device=device)
        except (ValueError, OSError) as e:
            raise gr.Error(str(e)) from None
        except ImportError as e:  # clip without a CLIP package
            raise gr.Error(str(e)) from None
        frames = interactive.coarse_to_fine(result.path, VIEW_SIZE)
        gif = os.path.join(tempfile.mkdtemp(prefix='ddn-demo-'), f'path-seed{result.path_seed}.gif')
        interactive.write_gif(frames, gif)
        captions = [str(s) for s in result.seeds]
        note = '' if guided else ' (all guide weights are 0: these are unguided samples)'
        status = f'{len(result.seeds)} seed(s), {holder["net"].num_layers} layers{note}.'
        return ([(x, c) for x, c in zip(_view(result.guided), captions)],
                [(x, c) for x, c in zip(_view(result.unguided), captions)],
                [(f, f'layer {i + 1}') for i, f in enumerate(frames)], gif, status)

    with gr.Blocks(title='DDN zero-shot conditional generation') as app:
        gr.Markdown('# Discrete Distribution Networks — zero-shot conditional generation\n'
                    'Every layer emits K candidates; the guides below score them and the best is kept. '
                    'The network never saw these conditions in training.')
        with gr.Row():
            net_box = gr.Textbox(value=network, label='Network (snapshot, URL or run folder)', scale=4)
            load_btn = gr.Button('Load', scale=1)
        info = gr.Markdown()
        with gr.Row():
            with gr.Column():
                # A black canvas (the digits' background) to draw on; only the strokes are read.
                blank = np.zeros((CANVAS_SIZE, CANVAS_SIZE, 4), np.uint8)
                blank[..., 3] = 255
                strokes = gr.ImageEditor(label='Draw colour strokes (drawn pixels = known region; the eraser removes)',
                                         value=dict(background=blank, layers=[], composite=blank),
                                         type='numpy', image_mode='RGBA', canvas_size=(CANVAS_SIZE, CANVAS_SIZE),
                                         brush=gr.Brush(default_size=32, default_color='#ffffff', colors=['#ffffff', '#808080', '#ff0000', '#00ff00', '#0000ff', '#ffff00']), height=CANVAS_SIZE + 140)
                upload = gr.Image(label='Upload a guide image', type='numpy', image_mode='RGB', height=160)
                resize = gr.Checkbox(label='Resize the upload to the network (otherwise its size must fit)', value=False)
            with gr.Column():
                gr.Markdown('**Guides and weights** (0 = off)')
                w_inpaint = gr.Slider(0, 4, value=1, step=0.1, label='strokes (inpainting on the drawn pixels)')
                sliders = {name: gr.Slider(0, 4, value=0, step=0.1, label=label) for name, label in UPLOAD_GUIDES.items()}
                bits = gr.Slider(1, 8, value=1, step=1, label='bits of the low-bit guide')
                w_clip = gr.Slider(0, 4, value=0, step=0.1, label='CLIP prompt (needs open_clip_torch)')
                text = gr.Textbox(label='Text prompt', placeholder='a smiling face')
                seeds = gr.Textbox(value='0-7', label=f'Seeds (at most {MAX_SEEDS})')
                with gr.Row():
                    temperature = gr.Number(value=0.3, minimum=0, label='Temperature (0 = argmin)')
                    topk = gr.Number(value=0, minimum=0, precision=0, label='Top-k (0 = off)')
                    path_seed = gr.Textbox(value='', label='Seed to trace (default: the first)')
                run_btn = gr.Button('Generate', variant='primary')
        status = gr.Markdown()
        with gr.Row():
            guided_out = gr.Gallery(label='Guided', columns=4, height=300, format='png')
            plain_out = gr.Gallery(label='Unguided, same seeds', columns=4, height=300, format='png')
        path_out = gr.Gallery(label='Coarse to fine: the chosen image of every layer', columns=12, height=140, format='png')
        gif_out = gr.File(label='GIF of the path')

        load_btn.click(load, inputs=net_box, outputs=info, api_name='load')
        run_btn.click(generate_fn,
                      inputs=[strokes, upload, w_inpaint, sliders['superres'], sliders['color'], sliders['lowbit'],
                              sliders['edge'], sliders['l2'], w_clip, bits, text, seeds, temperature, topk, path_seed, resize],
                      outputs=[guided_out, plain_out, path_out, gif_out, status], api_name='generate')
        app.load(lambda: _describe() if 'net' in holder else '', outputs=info)

    load(network)  # Fail at start, on the command line, for a network that does not load.
    return app

# ----------------------------------------------------------------------------
# The app in a child process (tests, benchmarks, screenshots): started on a free local port, waited
# for until it answers, stopped on exit.

@contextlib.contextmanager
def serving(network, log=None, timeout=120, extra_args=()):
    """Run `demo.py --network NETWORK` on 127.0.0.1 and a free port; yields (url, process).
    `log`: a file path for its output (default: discarded). Raises RuntimeError if it exits or
    does not answer within `timeout` seconds."""
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        port = sock.getsockname()[1]
    env = dict(os.environ, GRADIO_ANALYTICS_ENABLED='False', OMP_NUM_THREADS='1')
    out = open(log, 'w') if log is not None else subprocess.DEVNULL
    proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), '--network', str(network), '--port', str(port), *extra_args],
                            stdout=out, stderr=subprocess.STDOUT, env=env, cwd=os.path.dirname(os.path.abspath(__file__)))
    url = f'http://127.0.0.1:{port}/'
    try:
        deadline = time.time() + timeout
        while True:
            try:
                urllib.request.urlopen(url, timeout=2).close()
                break
            except OSError:
                if proc.poll() is not None or time.time() > deadline:
                    raise RuntimeError(f'demo.py did not start (exit code {proc.poll()}); see {log or "its output"}') from None
                time.sleep(0.5)
        yield url, proc
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
        if log is not None:
            out.close()

# ----------------------------------------------------------------------------

@click.command()
@click.option('--network', help='Network snapshot, URL or run folder', metavar='PATH|URL|DIR', type=str, required=True)
@click.option('--host', help='Address to listen on', metavar='ADDR', type=str, default='127.0.0.1', show_default=True)
@click.option('--port', help='Port to listen on', metavar='INT', type=click.IntRange(1, 65535), default=7860, show_default=True)
@click.option('--device', help='Device: auto, cpu, cuda, cuda:N, mps', metavar='STR', type=str, default='auto', show_default=True)
def main(network, host, port, device):
    """Zero-shot conditional generation in the browser (gradio app on HOST:PORT)."""
    os.environ.setdefault('GRADIO_ANALYTICS_ENABLED', 'False')
    if device == 'auto':
        device = 'cuda' if torch.cuda.is_available() else 'cpu'
    try:
        device = torch.device(device)
        torch.empty(0, device=device)
    except (RuntimeError, ValueError) as e:
        raise click.BadParameter(f'{device!r} is not a usable device: {e}', param_hint='--device') from None
    try:
        app = build_app(network, device)
    except Exception as e:  # gradio's Error for a network that does not load
        if type(e).__name__ == 'Error':
            raise click.ClickException(str(e)) from None
        raise
    print(f'DDN demo on http://{host}:{port}/ (Ctrl+C to stop)', flush=True)
    app.queue(default_concurrency_limit=1).launch(server_name=host, server_port=port, share=False, show_error=True)

if __name__ == '__main__':
    main()
