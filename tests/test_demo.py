"""demo.py, driven as a user's browser would drive it: through its HTTP API (gradio_client).

A tiny 8x8 digits net is trained once; the demo server runs as a separate process on a free local
port. Every mode (drawn strokes, uploads for super-resolution / colourisation / low-bit / edges / L2,
mixed guides, temperature and top-k) must return, for each seed, exactly the image generate.py writes
for the same seed and guide, next to the unguided image of that seed; the coarse-to-fine path ends at
the guided image. Bad input gets a message and leaves the server running. A last test renders the
page in headless Chromium when one is installed.
"""

import os
import shutil
import subprocess

import numpy as np
import PIL.Image
import pytest
import torch
from click.testing import CliRunner

gradio_client = pytest.importorskip('gradio_client')
pytest.importorskip('gradio')

import demo
import generate
from training.images import to_pil, to_uint8
from training.snapshot import load_network
from sampling import interactive
from training.ddl import resize_area
from training.image_ops import edge_map

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEEDS = '0-5'
NUM = 6

# ----------------------------------------------------------------------------
# Fixtures: a briefly trained net, its snapshot, and the demo server.

# The shared tiny trained net of conftest.py, as a snapshot pickle.
@pytest.fixture(scope='module')
def snapshot(tiny_snapshot):
    return tiny_snapshot

@pytest.fixture(scope='module')
def server(snapshot, tmp_path_factory):
    log = tmp_path_factory.mktemp('demo') / 'server.log'
    try:
        with demo.serving(snapshot, log=log) as (url, proc):
            yield dict(client=gradio_client.Client(url, verbose=False), url=url, proc=proc, log=log)
    except RuntimeError as e:
        pytest.fail(f'{e}\n{log.read_text()}')

# ----------------------------------------------------------------------------
# Helpers.

def _u8(path):
    a = np.array(PIL.Image.open(path))
    return a[..., None] if a.ndim == 2 else a

# The network-resolution images of a gallery (nearest-upscaled in the page), as (N, H, W) uint8.
def _gallery(items, resolution=8):
    images = [_u8(item['image'])[..., 0] for item in items]
    scale = images[0].shape[0] // resolution
    return np.stack([x[::scale, ::scale] for x in images])

def _generated(outdir, num=NUM):
    return np.stack([_u8(os.path.join(outdir, f'{i:06d}.png'))[..., 0] for i in range(num)])

def _run_generate(snapshot, outdir, *args):
    result = CliRunner().invoke(generate.main, ['--network', snapshot, '--outdir', str(outdir), '--seeds', SEEDS] + [str(a) for a in args])
    assert result.exit_code == 0, result.output + repr(result.exception)
    return _generated(outdir)

WEIGHTS = ('w_inpaint', 'w_superres', 'w_color', 'w_lowbit', 'w_edge', 'w_l2', 'w_clip')

def _request(client, strokes=None, upload=None, bits=1, text='', seeds=SEEDS, temperature=0, topk=0, path_seed='', resize=False, **weights):
    w = [float(weights.get(name, 0)) for name in WEIGHTS]
    return client.predict(strokes, upload, *w, bits, text, seeds, temperature, topk, path_seed, resize, api_name='/generate')

def _editor(layer_path, size):
    blank = os.path.join(os.path.dirname(layer_path), 'blank.png')
    PIL.Image.new('RGBA', (size, size)).save(blank)
    return dict(background=gradio_client.handle_file(blank), layers=[gradio_client.handle_file(layer_path)],
                composite=gradio_client.handle_file(layer_path), id=None)

def _save(x, path):
    to_pil(to_uint8(x[0]).numpy()).save(path)
    return str(path)

# ----------------------------------------------------------------------------

def test_strokes_inpaint_equals_generate(server, snapshot, tmp_path):
    # A white bar drawn on a 64x64 canvas: the drawn pixels are the known region.
    layer = np.zeros((64, 64, 4), np.uint8)
    layer[8:40, 24:40] = (255, 255, 255, 255)
    PIL.Image.fromarray(layer).save(tmp_path / 'layer.png')
    guided, plain, path, gif, status = _request(server['client'], strokes=_editor(str(tmp_path / 'layer.png'), 64), w_inpaint=1)
    assert '6 seed(s)' in status
    image, mask = interactive.strokes_to_guide([layer], 1, 8)
    assert 0 < mask.sum() < 64 and torch.all(image[mask.bool()[:, 0:1].expand_as(image)] == 1)
    expected = _run_generate(snapshot, tmp_path / 'gen', '--guide', 'inpaint', '--guide-image', _save(image, tmp_path / 'g.png'),
                             '--guide-mask', _save(mask * 2 - 1, tmp_path / 'm.png'))
    assert np.array_equal(_gallery(guided), expected)
    assert np.array_equal(_gallery(plain), _run_generate(snapshot, tmp_path / 'plain'))
    # The guide had an effect: the known pixels are closer to white than without it.
    known = mask[0, 0].bool().numpy()
    assert _gallery(guided)[:, known].mean() > _gallery(plain)[:, known].mean() + 10
    # Coarse to fine: one frame per layer, the last one the guided image of the traced seed (0).
    net = load_network(snapshot, 'cpu')[1]
    assert len(path) == net.num_layers
    assert np.array_equal(_gallery(path[-1:]), expected[:1])
    with PIL.Image.open(gif) as g:
        assert g.n_frames == net.num_layers

@pytest.mark.parametrize('guide,size,extra', [
    ('superres', 4, {}), ('color', 8, {}), ('lowbit', 8, {'bits': 1}), ('edge', 8, {}), ('l2', 8, {}),
])
def test_upload_guides_equal_generate(server, snapshot, digits, tmp_path, guide, size, extra):
    x = digits[0][1500:1501]
    if guide == 'edge':
        x = edge_map(x) * 2 - 1
    if size != 8:
        x = resize_area(x, size)
    upload = _save(x, tmp_path / 'up.png')
    guided, plain, *_ = _request(server['client'], upload=gradio_client.handle_file(upload), **{f'w_{guide}': 1}, **extra)
    args = ['--guide', guide, '--guide-image', upload] + (['--guide-bits', extra['bits']] if 'bits' in extra else [])
    assert np.array_equal(_gallery(guided), _run_generate(snapshot, tmp_path / 'gen', *args))

def test_mixed_guides_and_choice_rules_equal_generate(server, snapshot, digits, tmp_path):
    upload = _save(digits[0][1501:1502], tmp_path / 'up.png')
    client = server['client']
    guided, *_ = _request(client, upload=gradio_client.handle_file(upload), w_l2=1, w_lowbit=0.5, bits=2, temperature=0.7)
    expected = _run_generate(snapshot, tmp_path / 'mix', '--guide', 'l2:1,lowbit:0.5', '--guide-image', upload,
                             '--guide-bits', 2, '--guide-temp', 0.7)
    assert np.array_equal(_gallery(guided), expected)
    guided, *_ = _request(client, upload=gradio_client.handle_file(upload), w_l2=1, topk=3)
    expected = _run_generate(snapshot, tmp_path / 'topk', '--guide', 'l2', '--guide-image', upload, '--guide-topk', 3)
    assert np.array_equal(_gallery(guided), expected)
    assert len({g.tobytes() for g in expected}) > 1              # top-k keeps some diversity

def test_bad_input_gets_a_message_and_the_server_keeps_running(server, digits, tmp_path):
    client = server['client']
    PIL.Image.new('RGBA', (64, 64)).save(tmp_path / 'empty.png')
    big = _save(resize_area(digits[0][:1], 16), tmp_path / 'big.png')
    cases = [
        (dict(strokes=_editor(str(tmp_path / 'empty.png'), 64), w_inpaint=1), 'Nothing is drawn'),
        (dict(upload=gradio_client.handle_file(big), w_l2=1), 'needs 8x8'),
        (dict(w_superres=1), 'needs an uploaded image'),
        (dict(seeds='0-99999'), 'more than 64 values'),
        (dict(seeds='a,b'), 'Cannot parse'),
        (dict(temperature=0.5, topk=2), 'two choice rules'),
        (dict(w_clip=1, text=''), 'text prompt'),
    ]
    for kwargs, message in cases:
        with pytest.raises(Exception, match=message):
            _request(client, **kwargs)
    with pytest.raises(Exception, match='Could not load the network'):
        client.predict(str(tmp_path / 'missing.pkl'), api_name='/load')
    assert server['proc'].poll() is None
    # Resizing the wrong-size upload on request works, and unguided requests still do.
    guided, plain, *_ = _request(client, upload=gradio_client.handle_file(big), w_l2=1, resize=True)
    assert len(guided) == NUM
    guided, plain, _, _, status = _request(client)
    assert 'unguided' in status and np.array_equal(_gallery(guided), _gallery(plain))

def test_cli_refuses_a_network_that_does_not_load(tmp_path):
    result = CliRunner().invoke(demo.main, ['--network', str(tmp_path / 'nope.pkl'), '--port', '1'])
    assert result.exit_code != 0 and 'Could not load the network' in result.output

# The page itself, rendered by a real browser (skipped where none is installed).
def test_page_renders_in_headless_chromium(server, tmp_path):
    browser = shutil.which('chromium') or shutil.which('chromium-browser') or shutil.which('google-chrome')
    if browser is None:
        pytest.skip('no headless Chromium installed (apt-get install chromium)')
    shot = tmp_path / 'page.png'
    subprocess.run([browser, '--headless', '--no-sandbox', '--disable-gpu', '--hide-scrollbars', f'--screenshot={shot}',
                    '--window-size=1280,1400', '--virtual-time-budget=15000', server['url']],
                   check=True, capture_output=True, timeout=120)
    page = np.asarray(PIL.Image.open(shot).convert('L'), dtype=np.float32)
    # A blank or error page is nearly uniform; the rendered app has text, widgets and a canvas.
    assert page.std() > 10, 'the screenshot is blank'
