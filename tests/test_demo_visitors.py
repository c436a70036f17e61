"""The demo with several visitors (issue 21, class 7): concurrent requests queue instead of failing, each
visitor's Load changes only their own network, and a URL typed in the page is bounded: a size cap, only
network files, nothing left in the download cache. One demo server (a real process on 127.0.0.1) serves
the tests of this file; the URLs come from a local http.server."""

import functools
import http.server
import os
import threading

import numpy as np
import PIL.Image
import pytest
import torch

gradio_client = pytest.importorskip('gradio_client')
pytest.importorskip('gradio')

import demo
from sampling import interactive
from training import snapshot
from training.networks import DDNGenerator

TINY = dict(img_resolution=8, img_channels=1, max_channels=8, max_blockn=1, max_outputk=4)

# The page's cap in the tests: a tiny network (~27 KB) fits, 200 KB do not.
CAP_MB = 0.1

@pytest.fixture(scope='module')
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp('served')
    for seed in (0, 1):
        torch.manual_seed(seed)
        snapshot.save_network_safe(DDNGenerator(**TINY), root / f'net{seed}.safetensors')
    (root / 'big.safetensors').write_bytes((root / 'net1.safetensors').read_bytes() + b'\0' * 200_000)
    PIL.Image.fromarray(np.zeros((8, 8), np.uint8)).save(root / 'image.png')
    return root

# A local http.server over `files`; /nolength/NAME sends NAME without a Content-Length header.
class _Handler(http.server.SimpleHTTPRequestHandler):
    def do_GET(self):
        if self.path.startswith('/nolength/'):
            data = open(os.path.join(self.directory, self.path[len('/nolength/'):]), 'rb').read()
            self.send_response(200)
            self.end_headers()
            self.wfile.write(data)
            self.close_connection = True
            return
        super().do_GET()

    def log_message(self, *args):
        pass

@pytest.fixture(scope='module')
def http_url(files):
    server = http.server.ThreadingHTTPServer(('127.0.0.1', 0), functools.partial(_Handler, directory=str(files)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f'http://127.0.0.1:{server.server_address[1]}/'
    server.shutdown()
    server.server_close()

@pytest.fixture(scope='module')
def server(files, tmp_path_factory):
    log = tmp_path_factory.mktemp('demo') / 'server.log'
    try:
        with demo.serving(files / 'net0.safetensors', log=log, extra_args=['--max-network-mb', str(CAP_MB)]) as (url, proc):
            yield dict(url=url, proc=proc, log=log)
    except RuntimeError as e:
        pytest.fail(f'{e}\n{log.read_text()}')

def _client(server):
    return gradio_client.Client(server['url'], verbose=False)

GENERATE = (None, None, 0, 0, 0, 0, 0, 0, 0, 1, '', '0', 0, 0, '', False)

# The unguided images of seed 0 (network resolution) of a result, as one array.
def _images(result):
    return np.stack([np.asarray(PIL.Image.open(item['image'])) for item in result[0]])

def _generate(client):
    return _images(client.predict(*GENERATE, api_name='/generate'))

# 30 requests at once from 3 visitors, all identical (the case where gradio's content-named files raced,
# and some results failed to download): all succeed, with the same images.
def test_thirty_concurrent_requests_all_succeed(server):
    clients = [_client(server) for _ in range(3)]
    first = _generate(clients[0])
    jobs = [clients[i % 3].submit(*GENERATE, api_name='/generate') for i in range(30)]
    results = [_images(job.result(timeout=300)) for job in jobs]
    assert len(results) == 30 and all(np.array_equal(r, first) for r in results)
    assert server['proc'].poll() is None

# Two visitors: one loads another network; the other keeps the command line's network.
def test_sessions_have_their_own_network(server, files):
    a, b = _client(server), _client(server)
    default = _generate(b)
    info = a.predict(str(files / 'net1.safetensors'), api_name='/load')
    assert 'net1.safetensors' in info
    other = _generate(a)
    assert not np.array_equal(other, default)
    assert np.array_equal(_generate(b), default)             # b did not see a's Load.
    assert np.array_equal(_generate(_client(server)), default)   # Nor does a new visitor.
    assert np.array_equal(_generate(a), other)

# A URL typed in the page: over the cap, or not a network file, is refused with a message; a network is
# loaded; and the server keeps running.
def test_page_urls_are_capped_and_must_be_networks(server, http_url):
    client = _client(server)
    for name, message in [('big.safetensors', 'more than'), ('nolength/big.safetensors', 'more than'),
                          ('image.png', 'is not a network file')]:
        with pytest.raises(Exception, match=message):
            client.predict(http_url + name, api_name='/load')
    assert 'net1.safetensors' in client.predict(http_url + 'net1.safetensors', api_name='/load')
    assert server['proc'].poll() is None

# The function layer: the cap with and without Content-Length, and nothing written to the download cache.
def test_load_page_network_downloads_into_memory_only(http_url, files, tmp_path, monkeypatch):
    monkeypatch.setenv('DDN_CACHE_DIR', str(tmp_path / 'cache'))
    cap = int(CAP_MB * 2**20)
    for name in ('big.safetensors', 'nolength/big.safetensors'):
        with pytest.raises(ValueError, match='more than'):
            interactive.load_page_network(http_url + name, max_bytes=cap)
    with pytest.raises(ValueError, match='is not a network file'):
        interactive.load_page_network(http_url + 'image.png', max_bytes=cap)
    with pytest.raises(ValueError, match='more than'):
        interactive.load_page_network(str(files / 'big.safetensors'), max_bytes=cap)
    path, net = interactive.load_page_network(http_url + 'nolength/net1.safetensors', max_bytes=cap)
    expected = snapshot.load_network(files / 'net1.safetensors')[1]
    assert all(torch.equal(v, expected.state_dict()[k]) for k, v in net.state_dict().items())
    assert not os.path.exists(tmp_path / 'cache')
