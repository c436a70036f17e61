"""A received file must not run code when loaded. Every loader of a file a user may get from someone
else (--network as a file, a URL and a run folder; train.py --transfer and --resume; the guide
classifier and feature network; convert.py) is fed a harmless payload: a pickle whose __reduce__
creates a marker file. The marker must not appear and the error must say why, by default; with
--trust-pickle the same file does run (so the test would notice a loader that never unpickles)."""

import os
import pickle

import pytest
import torch
from click.testing import CliRunner

import compress
import convert
import dnnlib
import generate
import train
import tree
import zscg
from torch_utils import persistence
from training import snapshot
from training.networks import DDNGenerator

TINY = dict(img_resolution=8, img_channels=1, max_channels=8, max_blockn=1, max_outputk=4)

# Creates `path` when unpickled: the stand-in for any command an attacker would run.
class Payload:
    def __init__(self, path):
        self.path = str(path)
    def __reduce__(self):
        return (open, (self.path, 'w'))

# A persistence record that names another class than ours (os.system instead of a network).
class FakePersistent:
    def __init__(self, path):
        self.path = str(path)
    def __reduce__(self):
        meta = dict(version=1, module_name='os', class_name='system', init_args=(f'touch {self.path}',), init_kwargs={},
                    state_dict={}, training={}, requires_grad={})
        return (persistence._reconstruct_persistent_obj, (meta,))

@pytest.fixture
def files(tmp_path, ddn_cache_dir):
    marker = tmp_path / 'MARKER'
    net = DDNGenerator(**TINY)
    paths = dnnlib.EasyDict()
    paths.marker = marker
    paths.pkl = tmp_path / 'payload.pkl'                        # A bare payload pickle.
    paths.pkl.write_bytes(pickle.dumps(Payload(marker)))
    paths.inside = tmp_path / 'inside.pkl'                      # Our snapshot layout with a payload inside.
    paths.inside.write_bytes(pickle.dumps(dict(ema=net, extra=Payload(marker))))
    paths.fake = tmp_path / 'fake.pkl'                          # The persistence hook naming os.system.
    paths.fake.write_bytes(pickle.dumps(dict(ema=FakePersistent(marker))))
    paths.state = tmp_path / 'training-state-000001.pt'         # torch.save archive with a payload.
    torch.save(dict(net=Payload(marker), cur_nimg=0, config={}), paths.state)
    paths.run = tmp_path / 'run'                                # A run folder with a planted snapshot and state.
    paths.run.mkdir()
    snapshot.save_network_safe(net, paths.run / 'network-snapshot-000000.safetensors')
    (paths.run / 'network-snapshot-999999.pkl').write_bytes(paths.pkl.read_bytes())
    torch.save(dict(net=Payload(marker)), paths.run / 'training-state-999999.pt')
    # An http URL whose download is already in the cache (no network access), and a file:// URL.
    paths.url = 'https://example.com/networks/network-snapshot-000100.pkl'
    cache = ddn_cache_dir / 'downloads'
    cache.mkdir(parents=True)
    (cache / dnnlib.util.url_cache_file_name(paths.url)).write_bytes(paths.pkl.read_bytes())
    paths.file_url = paths.pkl.as_uri()
    return paths

def _refused(cli, args, marker, words=('run code', 'refusing')):
    result = CliRunner().invoke(cli, [str(a) for a in args])
    assert result.exit_code != 0, result.output
    assert not marker.exists(), f'{args}: the payload ran'
    assert isinstance(result.exception, SystemExit), (args, repr(result.exception))
    assert any(w in result.output for w in words), (args, result.output)
    return result.output

# Every --network of every script, in each of its forms.
@pytest.mark.parametrize('source', ['pkl', 'inside', 'fake', 'run', 'url', 'file_url'])
def test_network_loaders_run_no_code(files, tmp_path, source):
    network = files[source]
    outputs = [
        _refused(generate.main, ['--network', network, '--outdir', tmp_path / 'out', '--seeds', '0'], files.marker),
        _refused(zscg.main, ['--network', network, '--out', tmp_path / 'z.png'], files.marker),
        _refused(tree.main, ['--network', network, '--out', tmp_path / 't.png'], files.marker),
        _refused(compress.main, ['encode', '--network', network, '--out', tmp_path / 'c.bin'], files.marker),
        _refused(compress.main, ['decode', '--network', network, '--codes', files.pkl, '--outdir', tmp_path / 'd'], files.marker),
        _refused(convert.main, ['--network', network, '--out', tmp_path / 'n.safetensors'], files.marker),
    ]
    # The library says trust_pickle=True; every script names its flag instead (cli.click_error).
    assert all('--trust-pickle' in out for out in outputs), outputs
    assert not (tmp_path / 'out').exists() and not (tmp_path / 'n.safetensors').exists()

def test_train_loaders_run_no_code(files, tmp_path):
    base = [f'--outdir={tmp_path / "runs"}', '--duration=0.001', '--batch=8', '--max-channels=8', '--max-blockn=1',
            '--max-outputk=4', '--workers=0']
    _refused(train.main, [*base, '--transfer', files.pkl], files.marker)
    _refused(train.main, [*base, '--transfer', files.inside], files.marker)
    _refused(train.main, [*base, '--transfer', files.run], files.marker)
    _refused(train.main, [*base, '--resume', files.state], files.marker)
    _refused(train.main, [*base, '--resume', files.run], files.marker)
    assert not (tmp_path / 'runs').exists()

def test_guide_loaders_run_no_code(files, tmp_path):
    net = tmp_path / 'net.safetensors'
    snapshot.save_network_safe(DDNGenerator(**TINY), net)
    image = tmp_path / 'g.png'
    import PIL.Image
    PIL.Image.new('L', (8, 8)).save(image)
    run = ['--network', net, '--outdir', tmp_path / 'out', '--seeds', '0']
    for bad in (files.pkl, files.state):
        _refused(generate.main, [*run, '--guide', 'classifier', '--guide-classifier', bad, '--class', 1], files.marker,
                 words=('run code', 'TorchScript'))
        _refused(generate.main, [*run, '--guide', 'style', '--guide-image', image, '--guide-features', bad], files.marker,
                 words=('run code', 'TorchScript'))

# The opt-in really unpickles (so the refusals above are not a loader that never reads the file).
def test_trust_pickle_is_an_explicit_opt_in(files, tmp_path):
    result = CliRunner().invoke(generate.main, ['--network', str(files.pkl), '--outdir', str(tmp_path / 'o'), '--trust-pickle'])
    assert result.exit_code != 0 and files.marker.exists()         # It ran, then was found not to be a network.
    assert 'not a DDN snapshot' in result.output

# Our own snapshots, both formats, load by default and give the same network.
def test_own_files_load_by_default(tmp_path):
    net = DDNGenerator(**TINY)
    with open(tmp_path / 'network-snapshot-000001.pkl', 'wb') as f:
        pickle.dump(dict(ema=net, network_kwargs=dnnlib.EasyDict(TINY)), f)
    snapshot.save_network_safe(net, tmp_path / 'net.safetensors')
    _, a = snapshot.load_network(tmp_path / 'network-snapshot-000001.pkl')
    _, b = snapshot.load_network(tmp_path / 'net.safetensors')
    assert snapshot.fingerprint(a) == snapshot.fingerprint(b) == snapshot.fingerprint(net)
    assert torch.equal(a(seeds=[0, 1]).images, net.eval()(seeds=[0, 1]).images)
    assert os.path.getsize(tmp_path / 'net.safetensors') > 0
