"""Zero-shot conditional generation in the browser: a local web app for a trained DDN.

    python demo.py --network training-runs/00000-digits-...      # then open http://127.0.0.1:7860

Draw colour strokes (the drawn pixels become the known region of an inpainting guide), upload an
image for super-resolution / colourisation / low-bit / edge / L2 guidance, mix guides with weights,
choose seeds and the choice rule, and add a CLIP prompt when `open_clip_torch` is installed. The page
shows guided samples beside the unguided samples of the same seeds, the coarse-to-fine path of one
sample (the chosen image of every layer) and a GIF of it. Guidance is the library's
(`sampling/interactive.py`, `sampling/guide_spec.py`, `sampling/guidance.py`): a demo image is the
image `generate.py` writes for the same network, seed, guide and rule. When the network file has a
prior over its codes (`X.prior.safetensors`), samples are drawn through it, as `generate.py --prior=auto`.

Needs gradio (`pip install gradio`), which ddn does not install by default. The app listens on
127.0.0.1 only unless `--host` says otherwise. Each visitor's page keeps its own network (Load changes it
for that visitor only); a network named in the page must be a network file (safe format or our snapshot
pickle, loaded without running code) of at most `--max-network-mb`, and a URL is read into memory, never
cached on disk. Requests wait in a queue (`--concurrency` at once) instead of failing.
"""

import collections
import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

import click
import numpy as np
import PIL.Image

import dnnlib
from cli import device_option
from torch_utils.distributed import pick_device
from training import prior_files
from training import prior_rule
from sampling import interactive
from training.images import to_uint8
from sampling.interactive import CANVAS_SIZE, MAX_SEEDS, UPLOAD_GUIDES
from training.snapshot import load_network

GRADIO_INSTALL_HINT = 'demo.py needs gradio, which ddn does not install: pip install gradio'

# Side of the displayed images (nearest-upscaled).
VIEW_SIZE = 128

def _view(images):
    """(N, C, H, W) [-1, 1] images -> list of HxWx3 uint8 arrays, nearest-upscaled to VIEW_SIZE."""
    u8 = to_uint8(images).numpy()
    scale = max(1, VIEW_SIZE // u8.shape[-1])
    out = []
    for x in u8:
        x = x.repeat(scale, axis=1).repeat(scale, axis=2).transpose(1, 2, 0)
        out.append(np.repeat(x, 3, axis=2) if x.shape[2] == 1 else x)
    return out

# ----------------------------------------------------------------------------
# Output files of the requests. gradio copies a returned file into its cache atomically, but writes
# returned arrays there non-atomically under a name made from their content, so two visitors getting
# the same image could read a half-written file (RemoteProtocolError): every request writes its PNGs
# and GIF into its own folder instead, and only the newest KEEP_REQUEST_FOLDERS folders are kept.

KEEP_REQUEST_FOLDERS = 64

class _RequestFolders:
    def __init__(self):
        self.root = tempfile.mkdtemp(prefix='ddn-demo-')
        self.folders = collections.deque()
        self.lock = threading.Lock()

    # A new, empty folder; the oldest ones beyond KEEP_REQUEST_FOLDERS are removed.
    def new(self):
        folder = tempfile.mkdtemp(dir=self.root)
        with self.lock:
            self.folders.append(folder)
            old = [self.folders.popleft() for _ in range(max(0, len(self.folders) - KEEP_REQUEST_FOLDERS))]
        for path in old:
            shutil.rmtree(path, ignore_errors=True)
        return folder

# HxWx3 uint8 images -> PNG files in `folder` (prefix + index), with their captions.
def _png_items(images, captions, folder, prefix):
    items = []
    for i, (image, caption) in enumerate(zip(images, captions, strict=True)):
        path = os.path.join(folder, f'{prefix}{i:03d}.png')
        PIL.Image.fromarray(image).save(path)
        items.append((path, caption))
    return items

# ----------------------------------------------------------------------------
# The page.

# What every visitor shares (read-only): the network given on the command line, the device, the
# folders of the outputs. A visitor's own network lives in the page's session state (gr.State): one
# visitor's Load never changes another's network. The user's errors become gradio errors, shown as
# messages in the page.
class _Page:
    def __init__(self, gr, device, max_bytes):
        self.gr = gr
        self.device = device
        self.max_bytes = max_bytes
        self.default = None         # (path, net, prior) of --network.
        self.outputs = _RequestFolders()

    # (path, net, prior) of a network name, or a gradio error. The command line's network loads as --network
    # does everywhere; one named in the page is bounded (interactive.load_page_network).
    def open(self, name, command_line=False):
        name = (name or '').strip()
        if not name:
            raise self.gr.Error('Give a network: a network-snapshot-*.safetensors or .pkl, a URL or a run folder')
        try:
            if command_line:
                path, net = load_network(name, self.device)
            else:
                path, net = interactive.load_page_network(name, self.device, self.max_bytes)
        except (OSError, ValueError, RuntimeError) as e:
            raise self.gr.Error(f'Could not load the network: {e}') from None
        if net.condition is not None:
            raise self.gr.Error(f'{path} is conditioned on {net.condition!r}; the demo guides unconditional networks')
        # The network file's own prior (X.prior.safetensors), as generate.py --prior=auto.
        found = None if dnnlib.util.is_url(path) else prior_files.find_prior(path)
        try:
            prior = None if found is None else prior_rule.PriorRule(
                prior_files.check_prior_fits(prior_files.load_prior(found, self.device), net.ks, found))
        except (OSError, ValueError) as e:
            raise self.gr.Error(f'Could not load the prior of the network: {e}') from None
        return path, net, prior

    # The Load button: the visitor's session now uses this network -> (description, new session state).
    def load(self, name, _state=None):
        loaded = self.open(name)
        return self.describe(loaded), loaded

    # The session's network: its own, else --network.
    def network(self, state):
        return state if state is not None else self.default

    def describe(self, state=None):
        loaded = self.network(state)
        if loaded is None:
            return ''
        path, net, prior = loaded
        kind = 'grayscale' if net.img_channels == 1 else 'RGB'
        return (f'**{path}** — {net.img_resolution}x{net.img_resolution} {kind}, '
                f'{net.num_layers} layers, K up to {max(net.ks)}. Upload guides must be '
                f'{net.img_resolution}x{net.img_resolution} (super-resolution: a size that divides it).'
                + ('' if prior is None else ' Samples are drawn through its prior over the codes.'))

    def generate(self, strokes, upload, w_inpaint, w_superres, w_color, w_lowbit, w_edge, w_l2, w_clip, bits, text,
                 seeds, temperature, topk, path_seed, resize, state=None):
        loaded = self.network(state)
        if loaded is None:
            raise self.gr.Error('No network is loaded')
        _, net, prior = loaded
        weights = dict(inpaint=w_inpaint, superres=w_superres, color=w_color, lowbit=w_lowbit, edge=w_edge, l2=w_l2, clip=w_clip)
        try:
            result, guided = interactive.run_request(net, weights, seeds, temperature=temperature, topk=topk,
                                                     path_seed=path_seed, strokes=strokes, upload=upload, bits=bits,
                                                     text=text, resize=resize, device=self.device, prior=prior)
        except (ValueError, OSError, click.UsageError, ImportError) as e:  # ImportError: clip without a CLIP package.
            raise self.gr.Error(str(e)) from None
        folder = self.outputs.new()
        frames = interactive.coarse_to_fine(result.path, VIEW_SIZE)
        gif = os.path.join(folder, f'path-seed{result.path_seed}.gif')
        interactive.write_gif(frames, gif)
        captions = [str(s) for s in result.seeds]
        note = '' if guided else ' (all guide weights are 0: these are unguided samples)'
        status = f'{len(result.seeds)} seed(s), {net.num_layers} layers{note}.'
        return (_png_items(_view(result.guided), captions, folder, 'guided-'),
                _png_items(_view(result.unguided), captions, folder, 'plain-'),
                _png_items(frames, [f'layer {i + 1}' for i in range(len(frames))], folder, 'layer-'), gif, status)

def build_app(network, device, max_bytes=interactive.MAX_NETWORK_BYTES):
    """A gradio Blocks app serving `network` (path, URL or run folder) on `device`; a visitor may load
    another network of at most `max_bytes` for their own session."""
    try:
        import gradio as gr
    except ImportError as e:
        raise click.ClickException(f'{GRADIO_INSTALL_HINT} ({e})') from e
    page = _Page(gr, device, max_bytes)
    # Fail at start, on the command line, for a network that does not load.
    page.default = page.open(network, command_line=True)
    # gradio's own cache of returned files is emptied of files older than an hour, every hour.
    with gr.Blocks(title='DDN zero-shot conditional generation', delete_cache=(3600, 3600)) as app:
        session_net = gr.State(None)   # This visitor's (path, network) after a Load; None = --network.
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

        load_btn.click(page.load, inputs=[net_box, session_net], outputs=[info, session_net], api_name='load')
        run_btn.click(page.generate,
                      inputs=[strokes, upload, w_inpaint, sliders['superres'], sliders['color'], sliders['lowbit'],
                              sliders['edge'], sliders['l2'], w_clip, bits, text, seeds, temperature, topk, path_seed, resize,
                              session_net],
                      outputs=[guided_out, plain_out, path_out, gif_out, status], api_name='generate')
        app.load(page.describe, inputs=session_net, outputs=info)
    return app

# ----------------------------------------------------------------------------

@click.command()
@click.option('--network', help='Network snapshot, URL or run folder', metavar='PATH|URL|DIR', type=str, required=True)
@click.option('--host', help='Address to listen on', metavar='ADDR', type=str, default='127.0.0.1', show_default=True)
@click.option('--port', help='Port to listen on', metavar='INT', type=click.IntRange(1, 65535), default=7860, show_default=True)
@click.option('--max-network-mb', help='Largest network a visitor may load in the page (file or URL)', metavar='MB', type=click.FloatRange(min=0, min_open=True), default=interactive.MAX_NETWORK_BYTES / 2**20, show_default=True)
@click.option('--concurrency', help='Requests computed at once; more wait in the queue', metavar='INT', type=click.IntRange(min=1), default=1, show_default=True)
@click.option('--max-queue', help='Requests that may wait in the queue; beyond that a visitor is asked to retry', metavar='INT', type=click.IntRange(min=1), default=256, show_default=True)
@device_option()
def main(network, host, port, max_network_mb, concurrency, max_queue, device):
    """Zero-shot conditional generation in the browser (gradio app on HOST:PORT)."""
    os.environ.setdefault('GRADIO_ANALYTICS_ENABLED', 'False')
    device = pick_device(device)
    try:
        app = build_app(network, device, max_bytes=int(max_network_mb * 2**20))
    except Exception as e:  # gradio's Error for a network that does not load
        if type(e).__name__ == 'Error':
            raise click.ClickException(str(e)) from None
        raise
    print(f'DDN demo on http://{host}:{port}/ (Ctrl+C to stop)', flush=True)
    # Every event goes through the queue: concurrent visitors wait for their turn instead of failing.
    app.queue(default_concurrency_limit=concurrency, max_size=max_queue).launch(server_name=host, server_port=port, share=False, show_error=True)

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

if __name__ == '__main__':
    main()
