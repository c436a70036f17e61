"""Tests of dnnlib: EasyDict, name-based construction, time formatting, Logger and open_url (with a
loopback HTTP server started inside the test, never the internet)."""

import collections
import copy
import hashlib
import http.server
import io
import json
import os
import pickle
import sys
import threading
from pathlib import Path

import pytest
import torch

import dnnlib
from dnnlib import util

# ----------------------------------------------------------------------------
# EasyDict: attribute access on a dict that still pickles, copies and serialises as a dict.

def test_easydict_attribute_access():
    d = dnnlib.EasyDict(a=1)
    d.b = 2
    assert d == {'a': 1, 'b': 2}
    assert d.a == 1 and d['b'] == 2
    del d.a
    assert 'a' not in d
    with pytest.raises(AttributeError):
        _ = d.missing
    with pytest.raises(AttributeError):
        del d.missing
    assert getattr(d, 'missing', 'default') == 'default'

# EasyDict survives pickle, deepcopy and json with its contents intact.
def test_easydict_roundtrips():
    d = dnnlib.EasyDict(x=[1, 2], y=dnnlib.EasyDict(z=3))
    for clone in (pickle.loads(pickle.dumps(d)), copy.deepcopy(d)):
        assert isinstance(clone, dnnlib.EasyDict) and clone == d and clone.y.z == 3
        assert clone.x is not d.x
    assert json.loads(json.dumps(d)) == {'x': [1, 2], 'y': {'z': 3}}

# ----------------------------------------------------------------------------
# format_time thresholds as printed in training logs.

@pytest.mark.parametrize('seconds, expected', [
    (0, '0s'), (59.4, '59s'), (60, '1m 00s'), (185, '3m 05s'), (3600, '1h 00m 00s'),
    (7269, '2h 01m 09s'), (86400, '1d 00h 00m'), (3 * 86400 + 4 * 3600 + 10 * 60 + 5, '3d 04h 10m'),
])
def test_format_time(seconds, expected):
    assert util.format_time(seconds) == expected

# ----------------------------------------------------------------------------
# get_obj_by_name resolves modules, nested attributes and builtins.

def test_get_obj_by_name():
    assert util.get_obj_by_name('torch.optim.Adam') is torch.optim.Adam
    assert util.get_obj_by_name('dnnlib.util.EasyDict') is dnnlib.EasyDict
    assert util.get_obj_by_name('os.path.join') is os.path.join
    assert util.get_obj_by_name('collections.OrderedDict.fromkeys') == collections.OrderedDict.fromkeys
    assert util.get_obj_by_name('dict') is dict
    with pytest.raises(AttributeError, match='NoSuchThing'):
        util.get_obj_by_name('torch.optim.NoSuchThing')
    with pytest.raises(ImportError, match='no_such_module_ddn'):
        util.get_obj_by_name('no_such_module_ddn.Thing')

# A module that exists but fails to import a dependency reports that dependency, not "not found".
def test_get_obj_by_name_surfaces_broken_imports(tmp_path, monkeypatch):
    package = tmp_path / 'brokenpkg_ddn'
    package.mkdir()
    (package / '__init__.py').write_text('')
    (package / 'mod.py').write_text('import missing_dependency_ddn\nclass Thing: pass\n')
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ModuleNotFoundError) as info:
        util.get_obj_by_name('brokenpkg_ddn.mod.Thing')
    assert info.value.name == 'missing_dependency_ddn'

# construct_class_by_name passes positional and keyword arguments through.
def test_construct_class_by_name():
    obj = util.construct_class_by_name(class_name='dnnlib.EasyDict', a=1, b=2)
    assert isinstance(obj, dnnlib.EasyDict) and obj == {'a': 1, 'b': 2}
    queue = util.construct_class_by_name([1, 2, 3], class_name='collections.deque', maxlen=2)
    assert list(queue) == [2, 3]
    assert util.call_func_by_name(3, 4, func_name='math.hypot') == 5.0
    with pytest.raises(ValueError, match='class_name'):
        util.construct_class_by_name(a=1)

# ----------------------------------------------------------------------------
# Cache folder: $DDN_CACHE_DIR wins, else ~/.cache/ddn.

def test_make_cache_dir_path(tmp_path, monkeypatch):
    monkeypatch.setenv('DDN_CACHE_DIR', str(tmp_path / 'c'))
    assert util.make_cache_dir_path('downloads', 'x') == os.path.join(str(tmp_path / 'c'), 'downloads', 'x')
    monkeypatch.delenv('DDN_CACHE_DIR')
    monkeypatch.setenv('HOME', str(tmp_path / 'home'))
    assert util.make_cache_dir_path('downloads') == os.path.join(str(tmp_path / 'home'), '.cache', 'ddn', 'downloads')

# ----------------------------------------------------------------------------
# Logger tees both streams into the file and restores them on close.

def test_logger_tees_output(tmp_path, capsys):
    log_path = tmp_path / 'log.txt'
    with util.Logger(file_name=str(log_path), file_mode='w'):
        print('hello stdout')
        print('hello stderr', file=sys.stderr)
    print('after close')
    captured = capsys.readouterr()
    assert 'hello stdout' in captured.out and 'hello stderr' in captured.err
    text = log_path.read_text()
    assert 'hello stdout\n' in text and 'hello stderr\n' in text and 'after close' not in text
    with util.Logger(file_name=str(log_path), file_mode='a'):
        print('appended')
    assert log_path.read_text().startswith(text) and log_path.read_text().endswith('appended\n')

# ----------------------------------------------------------------------------
# Local paths and file:// URLs open directly.

def test_open_url_local(tmp_path):
    path = tmp_path / 'data.bin'
    path.write_bytes(b'\x00local\xff')
    with util.open_url(str(path)) as f:
        assert f.read() == b'\x00local\xff'
    with util.open_url(path.as_uri()) as f:
        assert f.read() == b'\x00local\xff'
    assert util.open_url(path.as_uri(), return_filename=True) == str(path)
    with pytest.raises(FileNotFoundError, match='nothing-here.bin'):
        util.open_url(str(tmp_path / 'nothing-here.bin'))

# ----------------------------------------------------------------------------
# Loopback HTTP server whose behaviour per path is scripted by the test.

class _ScriptedHandler(http.server.BaseHTTPRequestHandler):
    # Serve GET according to server.routes: path -> list of (status, body, declared length or None).
    def do_GET(self):
        self.server.requests.append(self.path)
        script = self.server.routes.get(self.path)
        if not script:
            self.send_error(404)
            return
        status, body, length = script.pop(0) if len(script) > 1 else script[0]
        self.send_response(status)
        self.send_header('Content-Length', str(len(body) if length is None else length))
        self.end_headers()
        self.wfile.write(body)

    # Keep pytest output clean.
    def log_message(self, *args):
        pass

# Start the scripted server on 127.0.0.1 (an ephemeral port) in a thread; yields (server, base URL).
@pytest.fixture
def http_server(monkeypatch):
    for name in ('HTTP_PROXY', 'HTTPS_PROXY', 'ALL_PROXY', 'http_proxy', 'https_proxy', 'all_proxy'):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv('NO_PROXY', '127.0.0.1,localhost')
    server = http.server.ThreadingHTTPServer(('127.0.0.1', 0), _ScriptedHandler)
    server.routes, server.requests = {}, []
    thread = threading.Thread(target=server.serve_forever, kwargs={'poll_interval': 0.02}, daemon=True)
    thread.start()
    try:
        yield server, f'http://127.0.0.1:{server.server_address[1]}'
    finally:
        server.shutdown()
        server.server_close()
        thread.join()

# A download is cached under md5(url)_basename; after the server stops, the cache still serves it.
def test_open_url_downloads_once_then_works_offline(http_server, ddn_cache_dir):
    server, base = http_server
    payload = bytes(range(256)) * 100
    server.routes['/weights/net%20v1.pkl'] = [(200, payload, None)]
    url = f'{base}/weights/net%20v1.pkl'
    with util.open_url(url, verbose=False) as f:
        assert f.read() == payload
    cache_file = ddn_cache_dir / 'downloads' / f'{hashlib.md5(url.encode()).hexdigest()}_net_v1.pkl'
    assert cache_file.read_bytes() == payload
    assert sorted(p.name for p in cache_file.parent.iterdir()) == [cache_file.name]  # no temp files left
    assert util.open_url(url, verbose=False, return_filename=True) == str(cache_file)
    assert server.requests == ['/weights/net%20v1.pkl']  # the second call did not hit the network

    server.shutdown()
    server.server_close()
    with util.open_url(url, verbose=False) as f:
        assert f.read() == payload

    # Not cached and unreachable: the error names the URL and where to place the file.
    other = f'{base}/other/detector.pkl'
    with pytest.raises(OSError) as info:
        util.open_url(other, verbose=False, num_attempts=1)
    message = str(info.value)
    expected_path = str(ddn_cache_dir / 'downloads' / f'{hashlib.md5(other.encode()).hexdigest()}_detector.pkl')
    assert other in message and expected_path in message and 'place it' in message
    assert not Path(expected_path).exists()

# Transient server errors are retried; permanent ones (404) are not.
def test_open_url_retries(http_server, ddn_cache_dir):
    server, base = http_server
    server.routes['/flaky.bin'] = [(500, b'oops', None), (200, b'finally', None)]
    with util.open_url(f'{base}/flaky.bin', verbose=False, num_attempts=2) as f:
        assert f.read() == b'finally'
    assert server.requests == ['/flaky.bin', '/flaky.bin']
    server.requests.clear()
    with pytest.raises(OSError, match='404'):
        util.open_url(f'{base}/missing.bin', verbose=False, num_attempts=3)
    assert server.requests == ['/missing.bin']

# A truncated download fails and leaves nothing under the cache name.
def test_open_url_rejects_truncated_download(http_server, ddn_cache_dir):
    server, base = http_server
    server.routes['/short.bin'] = [(200, b'12345', 10)]
    with pytest.raises(OSError, match='short.bin'):
        util.open_url(f'{base}/short.bin', verbose=False, num_attempts=1)
    downloads = ddn_cache_dir / 'downloads'
    assert not downloads.exists() or list(downloads.iterdir()) == []

# cache=False returns the bytes in memory and writes nothing.
def test_open_url_without_cache(http_server, ddn_cache_dir):
    server, base = http_server
    server.routes['/stats.npz'] = [(200, b'in-memory', None)]
    f = util.open_url(f'{base}/stats.npz', cache=False, verbose=False)
    assert isinstance(f, io.BytesIO) and f.read() == b'in-memory'
    assert not (ddn_cache_dir / 'downloads').exists()
    with pytest.raises(ValueError):
        util.open_url(f'{base}/stats.npz', cache=False, return_filename=True)

# An explicit cache_dir is used instead of $DDN_CACHE_DIR.
def test_open_url_explicit_cache_dir(http_server, tmp_path, ddn_cache_dir):
    server, base = http_server
    server.routes['/a.txt'] = [(200, b'abc', None)]
    path = util.open_url(f'{base}/a.txt', cache_dir=str(tmp_path / 'mine'), verbose=False, return_filename=True)
    assert Path(path).parent == tmp_path / 'mine' and Path(path).read_bytes() == b'abc'
    assert not (ddn_cache_dir / 'downloads').exists()

# Verbose mode reports on stderr, never on stdout (which scripts may pipe).
def test_open_url_verbose_goes_to_stderr(http_server, ddn_cache_dir, capsys):
    server, base = http_server
    server.routes['/v.bin'] = [(200, b'v', None)]
    util.open_url(f'{base}/v.bin', verbose=True).close()
    captured = capsys.readouterr()
    assert captured.out == '' and 'Downloading' in captured.err and 'done' in captured.err

# url_cache_file_name is stable and filesystem-safe.
def test_url_cache_file_name():
    name = util.url_cache_file_name('https://example.com/a/b/inception-2015-12-05.pkl?x=1')
    assert name == hashlib.md5(b'https://example.com/a/b/inception-2015-12-05.pkl?x=1').hexdigest() + '_inception-2015-12-05.pkl'
    assert util.url_cache_file_name('https://example.com/').endswith('_download')
    assert not set(util.url_cache_file_name('https://x/%2F..%5C:?*')) & set('/\\:?*')
