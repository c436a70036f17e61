"""The bad-input table (issues 10 and 21): every script run as a careless user or an attacker would,
each case classified as

    ok              a clear error (non-zero exit, `Error: ...`, no traceback), or success where input is fine
    unclear         bad input accepted silently, or an error that does not say what was wrong
    traceback       an exception escaped
    data loss       a file that was not the script's to replace changed, or a temporary file was left
    code execution  a received file ran code (it creates MARKER)
    hang            the case did not end within its time limit, or ran out of memory

Cases run in-process through click's CliRunner (the scripts' commands), each under a SIGALRM time
limit; only the two signal cases run a process group. `python tests/scripts/bad_input_table.py [WORKDIR]`
prints the table; tests/test_bad_input_table.py runs it in CI. Each case names the issue class it
belongs to (1-10, issue 21) and, where another branch owns the fix, that branch (`owner`): such cases
are reported as they are, and only the others must be ok.
"""

import contextlib
import errno
import hashlib
import io
import json
import os
import pickle
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
import zipfile
from typing import Callable, NamedTuple, Optional

import numpy as np
import PIL.Image
import torch
from click.testing import CliRunner

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

import compress
import convert
import dataset_tool
import fid
import generate
import toy_2d
import train
import tree
import zscg
import dnnlib
from training import snapshot
from training.networks import DDNGenerator

OUTCOMES = ('ok', 'unclear', 'traceback', 'data loss', 'code execution', 'hang')
TINY = dict(img_resolution=8, img_channels=1, max_channels=8, max_blockn=1, max_outputk=4)
TRAIN_TINY = ['--batch=20', '--max-channels=8', '--max-blockn=1', '--max-outputk=4', '--lr-rampup=0', '--workers=0', '--seed=0']

class Hang(Exception):
    """Raised by the time limit of a case."""

class Case(NamedTuple):
    cls:        int                 # Issue 21's class (1-10).
    what:       str
    cli:        object              # A click command, or a callable returning (exit_code, output, exception).
    args:       list
    expect:     str = 'error'       # 'error': a clear error; 'ok': success.
    contains:   Optional[str] = None    # The message must contain this.
    keep:       Optional[str] = None    # A path that must be unchanged.
    check:      Optional[Callable] = None   # Extra condition (True = fine); False is data loss.
    owner:      Optional[str] = None    # Branch that owns the fix (reported, not required).
    timeout:    float = 60

# The disks of class 9 (unmounted at the end of a run).
_DISKS = []

class Row(NamedTuple):
    case:       Case
    outcome:    str
    message:    str
    seconds:    float

# ----------------------------------------------------------------------------
# Helpers for the files of the cases.

def tree_hash(path):
    h = hashlib.sha256()
    if os.path.isfile(path):
        h.update(open(path, 'rb').read())
        return h.hexdigest()
    for root, _, files in sorted(os.walk(path)):
        for f in sorted(files):
            h.update(f.encode())
            full = os.path.join(root, f)
            if os.path.isfile(full):
                h.update(open(full, 'rb').read())
    return h.hexdigest()

def safetensors_parts(data):
    (n,) = struct.unpack('<Q', data[:8])
    return json.loads(data[8:8 + n]), data[8 + n:]

def safetensors_join(header, body, raw=None):
    b = raw if raw is not None else json.dumps(header).encode()
    return struct.pack('<Q', len(b)) + b + body

def with_meta(data, **changes):
    header, body = safetensors_parts(data)
    meta = json.loads(header['__metadata__']['ddn'])
    meta['init_kwargs'].update(changes)
    header['__metadata__'] = {'ddn': json.dumps(meta)}
    return safetensors_join(header, body)

def png_with_size(path, width, height):
    """A small PNG whose header claims width x height (a decompression bomb as PIL sees it)."""
    import zlib
    buf = io.BytesIO()
    PIL.Image.new('L', (8, 8)).save(buf, format='png')
    data = bytearray(buf.getvalue())
    ihdr = 8 + 8                    # Signature, then length + 'IHDR'.
    data[ihdr:ihdr + 8] = struct.pack('>II', width, height)
    crc = zlib.crc32(bytes(data[ihdr - 4:ihdr + 13]))
    data[ihdr + 13:ihdr + 17] = struct.pack('>I', crc)
    open(path, 'wb').write(bytes(data))

def gray_pngs(folder, n=4, size=8, labels=None):
    os.makedirs(folder, exist_ok=True)
    for i in range(n):
        PIL.Image.fromarray(np.random.default_rng(i).integers(0, 256, (size, size), dtype=np.uint8)).save(os.path.join(folder, f'{i}.png'))
    if labels is not None:
        json.dump({'labels': [[f'{i}.png', labels[i % len(labels)]] for i in range(n)]}, open(os.path.join(folder, 'dataset.json'), 'w'))

def deep_json(depth=100000):
    return '{"labels": ' + '[' * depth + ']' * depth + '}'

# A file system that refuses writes: a read-only or a full tmpfs when this process may mount one
# (root), else a simulation that makes open/os.open of paths under it fail with EROFS / ENOSPC.
class Disk:
    def __init__(self, path, kind):
        self.path, self.kind, self.mounted = path, kind, False
        os.makedirs(path, exist_ok=True)
        opts = 'ro,size=1m' if kind == 'ro' else 'size=256k'
        try:
            if os.geteuid() == 0 and subprocess.run(['mount', '-t', 'tmpfs', '-o', opts, 'tmpfs', path],
                                                   capture_output=True, timeout=10).returncode == 0:
                self.mounted = True
        except (OSError, subprocess.SubprocessError):
            pass
        if self.mounted:
            _DISKS.append(self)
        if self.mounted and kind == 'full':
            with contextlib.suppress(OSError), open(os.path.join(path, 'filler'), 'wb', buffering=0) as f:
                while True:
                    f.write(b'\0' * 4096)

    def close(self):
        if self.mounted:
            subprocess.run(['umount', '-l', self.path], capture_output=True, timeout=10)

    @contextlib.contextmanager
    def simulated(self):
        """Without a mount: writes under self.path fail as the real file system would make them fail."""
        if self.mounted:
            yield
            return
        code = errno.EROFS if self.kind == 'ro' else errno.ENOSPC
        root = os.path.abspath(self.path) + os.sep
        real_open, real_os_open, real_mkdir = open, os.open, os.mkdir
        def under(p):
            return isinstance(p, (str, bytes, os.PathLike)) and os.path.abspath(os.fsdecode(p)).startswith(root)
        def fake_open(file, mode='r', *a, **k):
            if under(file) and any(c in mode for c in 'wax+'):
                raise OSError(code, os.strerror(code), os.fsdecode(file))
            return real_open(file, mode, *a, **k)
        def fake_os_open(p, flags, *a, **k):
            if under(p) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
                raise OSError(code, os.strerror(code), os.fsdecode(p))
            return real_os_open(p, flags, *a, **k)
        def fake_mkdir(p, *a, **k):
            if under(p):
                raise OSError(code, os.strerror(code), os.fsdecode(p))
            return real_mkdir(p, *a, **k)
        import builtins
        builtins.open, os.open, os.mkdir = fake_open, fake_os_open, fake_mkdir
        try:
            yield
        finally:
            builtins.open, os.open, os.mkdir = real_open, real_os_open, real_mkdir

# ----------------------------------------------------------------------------
# Running one case.

def _alarm(_signum, _frame):
    raise Hang('time limit')

def run_case(case, marker, disks=()):
    before = tree_hash(case.keep) if case.keep and os.path.exists(case.keep) else None
    start = time.time()
    old = signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, case.timeout)
    exception, output, code = None, '', 0
    try:
        with contextlib.ExitStack() as stack:
            for disk in disks:
                stack.enter_context(disk.simulated())
            if callable(case.cli) and not hasattr(case.cli, 'main'):
                code, output, exception = case.cli(*case.args)
            else:
                result = CliRunner().invoke(case.cli, [str(a) for a in case.args])
                code, output, exception = result.exit_code, result.output, result.exception
    except (Hang, MemoryError) as err:
        exception = err
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    seconds = time.time() - start
    lines = [line for line in output.strip().splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith('Error')]
    message = errors[-1] if errors else lines[-1] if lines else ''
    if os.path.exists(marker):
        os.remove(marker)
        outcome = 'code execution'
    elif isinstance(exception, (Hang, MemoryError)):
        outcome, message = 'hang', f'{type(exception).__name__}: {exception}'
    elif before is not None and (not os.path.exists(case.keep) or tree_hash(case.keep) != before):
        outcome = 'data loss'
    elif case.check is not None and not case.check():
        outcome = 'data loss'
    elif exception is not None and not isinstance(exception, SystemExit):
        outcome, message = 'traceback', f'{type(exception).__name__}: {str(exception)[:120]}'
    elif 'Traceback (most recent call last)' in output:
        outcome = 'traceback'
    elif case.expect == 'error':
        clear = code != 0 and 'Error' in output and 'Aborted' not in output
        if case.contains is not None:
            clear = clear and case.contains in output
        outcome = 'ok' if clear else 'unclear'
        if code == 0:
            message = f'accepted (exit 0): {message}'
    else:
        outcome = 'ok' if code == 0 and (case.contains is None or case.contains in output) else 'unclear'
    return Row(case, outcome, message, seconds)

# ----------------------------------------------------------------------------
# The cases.

class Payload:
    """A pickle that, when loaded, creates the marker file."""
    def __init__(self, marker):
        self.marker = marker
    def __reduce__(self):
        return (open, (self.marker, 'w'))

def _torchscript_payload(marker, path):
    """A TorchScript archive whose __setstate__ writes a file (issue 21, class 1)."""
    class Evil(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.path = marker
        @torch.jit.export
        def __getstate__(self):
            return (self.path, self.training)
        @torch.jit.export
        def __setstate__(self, state: tuple[str, bool]):
            self.path = state[0]
            self.training = state[1]
            t = torch.from_file(self.path, shared=True, size=4, dtype=torch.uint8)
            t.copy_(torch.ones(4, dtype=torch.uint8))
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.flatten(1)[:, :4].float()
    torch.jit.script(Evil()).save(path)
    if os.path.exists(marker):
        os.remove(marker)

class _Detector(torch.nn.Module):
    def forward(self, x: torch.Tensor, return_features: bool = True) -> torch.Tensor:
        f = torch.nn.functional.adaptive_avg_pool2d(x.to(torch.float64) / 255, 2).flatten(1)
        return f if return_features else torch.softmax(f, dim=1)

def _demo_load(source):
    """demo.py's Load button with a file (class 6/7), through its page object with a stand-in gradio."""
    import demo
    from sampling import interactive
    class GrError(Exception):
        pass
    gr = type('gr', (), {'Error': GrError})
    page = demo._Page(gr, 'cpu', interactive.MAX_NETWORK_BYTES)
    try:
        page.load(source)
    except GrError as err:
        return 1, f'Error: {err}', SystemExit(1)
    except Exception as err:
        return 1, '', err
    return 0, f'loaded {source}', None

def _demo_sessions(net_a, net_b):
    """Two visitors of the demo: the second one's Load must not change the first one's network (class 7)."""
    import demo
    try:
        import gradio
    except ImportError:
        return 0, 'gradio not installed: skipped', None
    app = demo.build_app(net_a, 'cpu')
    sessions = [obj for obj in getattr(app, 'fns', {}).values()] if app is not None else []
    state_components = [b for b in getattr(app, 'blocks', {}).values() if isinstance(b, gradio.State)]
    if not state_components:
        return 1, 'the loaded network is one global object shared by every visitor (no gr.State)', None
    return 0, f'{len(sessions)} handlers, per-visitor state', None

def build_cases(w, marker):
    """(cases, background): the case list, and the process-group runs whose results come at the end."""
    P = lambda *names: os.path.join(w, *names)
    cases = []
    add = lambda *a, **k: cases.append(Case(*a, **k))

    # Files: a tiny network in both formats, a trained run folder, datasets, payloads.
    torch.manual_seed(0)
    net = DDNGenerator(**TINY)
    snapshot.save_network_safe(net, P('net.safetensors'))
    snapshot.save_network_pickle(net, P('net.pkl'))
    good = open(P('net.safetensors'), 'rb').read()
    gray_pngs(P('ds'), labels=[0, 1])
    with zipfile.ZipFile(P('ds.zip'), 'w') as z:
        for name in os.listdir(P('ds')):
            z.write(P('ds', name), name)
    result = CliRunner().invoke(train.main, [f'--outdir={P("runs")}', '--duration=0.0004', '--tick=0.2', '--snap=1', '--dump=1',
                                             *TRAIN_TINY], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    run = P('runs', sorted(n for n in os.listdir(P('runs')) if not n.startswith('.'))[0])
    state = sorted(n for n in os.listdir(run) if n.startswith('training-state-'))[-1]
    pickle.dump(Payload(marker), open(P('payload.pkl'), 'wb'))
    torch.save(dict(net=Payload(marker)), P('training-state-000009.pt'))
    shutil.copytree(run, P('planted'))
    shutil.copy(P('payload.pkl'), P('planted', 'network-snapshot-999999.pkl'))
    shutil.copy(P('training-state-000009.pt'), P('planted', 'training-state-999999.pt'))
    url = 'https://example.com/net/network-snapshot-000100.pkl'
    os.makedirs(P('cache', 'downloads'), exist_ok=True)
    shutil.copy(P('payload.pkl'), P('cache', 'downloads', dnnlib.util.url_cache_file_name(url)))
    _torchscript_payload(marker, P('evil.pt'))
    torch.jit.script(_Detector()).save(P('det.pt'))
    PIL.Image.new('L', (8, 8), 128).save(P('g.png'))
    np.savez(P('ref4.npz'), mu=np.zeros(4), sigma=np.eye(4))
    CliRunner().invoke(generate.main, ['--network', P('net.safetensors'), '--outdir', P('gen'), '--seeds', '0-11'], catch_exceptions=False)

    # Network loaders, named by script: (script, args before the network, args after).
    def loaders(out):
        return [
            ('generate', generate.main, ['--network'], ['--outdir', P(f'o-{out}')]),
            ('zscg', zscg.main, ['--network'], ['--out', P(f'z-{out}.png'), '--data', P('ds')]),
            ('tree', tree.main, ['--network'], ['--out', P(f't-{out}.png')]),
            ('convert', convert.main, ['--network'], ['--out', P(f'c-{out}.safetensors')]),
            ('compress encode', compress.main, ['encode', '--network'], ['--out', P(f'e-{out}.bin'), '--data', P('ds')]),
            ('train --transfer', train.main, [f'--outdir={P("r-" + out)}', '--transfer'], ['--dry-run', '--data', P('ds'), *TRAIN_TINY]),
        ]

    # 1. Files that run code (the "coder" branch owns TorchScript).
    for source, label in ((P('payload.pkl'), 'pickle'), (url, 'URL'), (P('planted'), 'planted run folder')):
        for name, cli, pre, post in loaders('p'):
            add(1, f'{name} --network {label} payload', cli, [*pre, source, *post])
    add(1, 'train --resume payload state', train.main, [f'--outdir={P("r1")}', '--resume', P('training-state-000009.pt'), '--duration=0.0001',
        *TRAIN_TINY])
    add(1, 'train --resume planted run folder', train.main, [f'--outdir={P("r1")}', '--resume', P('planted'), '--duration=0.0001', *TRAIN_TINY])
    for det, label, owner in ((P('payload.pkl'), 'pickle', None), (P('evil.pt'), 'TorchScript', 'coder')):
        add(1, f'fid calc --detector {label} payload', fid.cli, ['calc', '--images', P('gen'), '--detector', det, '--metrics', 'is', '-n', '4'], owner=owner)
        add(1, f'fid ref --detector {label} payload', fid.cli, ['ref', '--data', P('ds'), '--dest', P(f'ref-{label}.npz'), '--detector', det], owner=owner)
        add(1, f'generate --fid-ref --detector {label} payload', generate.main, ['--network', P('net.safetensors'), '--outdir', P(f'o-det-{label}'),
            '--fid-ref', P('ref4.npz'), '--detector', det], owner=owner)
        add(1, f'generate --guide-classifier {label} payload', generate.main, ['--network', P('net.safetensors'), '--outdir', P(f'o-cls-{label}'),
            '--guide', 'classifier', '--guide-classifier', det, '--class', '1'], owner=owner)
        add(1, f'generate --guide-features {label} payload', generate.main, ['--network', P('net.safetensors'), '--outdir', P(f'o-feat-{label}'),
            '--guide', 'style', '--guide-image', P('g.png'), '--guide-features', det], owner=owner)
        add(1, f'train --metrics --detector {label} payload --dry-run', train.main, [f'--outdir={P("r-det")}', '--metrics', 'is', '--detector', det,
            '--dry-run', *TRAIN_TINY], owner=owner)

    # 4. Outputs that were not ours (the "rel2" branch).
    os.makedirs(P('mine'), exist_ok=True)
    for i in range(3):
        PIL.Image.new('L', (8, 8), 7).save(P('mine', f'{i:06d}.png'))
    add(4, 'generate --force into a folder generate.py never wrote', generate.main, ['--network', P('net.safetensors'), '--outdir', P('mine'),
        '--seeds', '0-2', '--force'], keep=P('mine'), owner='rel2')
    add(4, 'compress decode --outdir a generate.py folder', compress.main, ['decode', '--network', P('net.safetensors'), '--codes', P('codes.bin'),
        '--outdir', P('gen')], keep=P('gen'), owner='rel2')
    open(P('existing.bin'), 'wb').write(b'mine')
    add(4, 'compress encode --out an existing file', compress.main, ['encode', '--network', P('net.safetensors'), '--data', P('ds'),
        '--out', P('existing.bin')], keep=P('existing.bin'), owner='rel2')
    np.savez(P('existing.npz'), mu=np.zeros(4))
    add(4, 'fid ref --dest an existing .npz', fid.cli, ['ref', '--data', P('ds'), '--dest', P('existing.npz'), '--detector', P('det.pt'), '--trust-code'],
        keep=P('existing.npz'), owner='rel2')
    shutil.copy(P('net.safetensors'), P('keep.safetensors'))
    add(4, 'convert --out an existing file', convert.main, ['--network', P('net.pkl'), '--out', P('keep.safetensors')], keep=P('keep.safetensors'))
    add(4, 'generate into a used --outdir', generate.main, ['--network', P('net.safetensors'), '--outdir', P('gen'), '--seeds', '0-1'], keep=P('gen'))
    PIL.Image.new('L', (8, 8), 9).save(P('existing.png'))
    add(4, 'zscg --out an existing PNG', zscg.main, ['--network', P('net.safetensors'), '--data', P('ds'), '--out', P('existing.png')],
        keep=P('existing.png'), owner='rel2')
    add(4, 'tree --out an existing PNG', tree.main, ['--network', P('net.safetensors'), '--out', P('existing.png')], keep=P('existing.png'), owner='rel2')
    np.save(P('existing.npy'), np.zeros(3))
    add(4, 'toy_2d --out an existing .npy', toy_2d.main, ['--density=gaussian', '--steps=1', '--k=4', '--out', P('existing.npy')],
        keep=P('existing.npy'), owner='rel2')
    add(4, 'dataset_tool --dest an existing zip', dataset_tool.main, ['--source', P('ds'), '--dest', P('ds.zip')], keep=P('ds.zip'))

    # 5. Resource bombs.
    bombs = {
        'max_channels=1e6': with_meta(good, max_channels=1000000),
        'max_blockn=200': with_meta(good, max_blockn=200),
        'img_resolution=2^20': with_meta(good, img_resolution=1 << 20),
        'max_channels=16 (shapes differ)': with_meta(good, max_channels=16),
        'max_outputk=nan': with_meta(good, max_outputk=float('nan')),
    }
    for i, (label, data) in enumerate(bombs.items()):
        open(P(f'bomb{i}.safetensors'), 'wb').write(data)
        for name, cli, pre, post in loaders(f'b{i}'):
            if name in ('generate', 'convert', 'train --transfer') or i < 2:
                add(5, f'{name}: safetensors with {label}', cli, [*pre, P(f'bomb{i}.safetensors'), *post], timeout=30)
    big = DDNGenerator(**TINY)
    big.init_kwargs['max_channels'] = 1000000
    snapshot.save_network_pickle(big, P('bigpickle.pkl'))
    for name, cli, pre, post in loaders('bp')[:4]:
        add(5, f'{name}: pickle whose arguments say max_channels=1e6', cli, [*pre, P('bigpickle.pkl'), *post], timeout=30)

    class Reduce:
        def __init__(self, fn, args):
            self.fn, self.args = fn, args
        def __reduce__(self):
            return (self.fn, self.args)
    # Snapshot pickles (the persistence hook makes them ours) carrying a container of a count they inflate.
    import copyreg
    snapshot.save_network_pickle(net, P('setrange.pkl'), extra=Reduce(set, (Reduce(range, (400_000_000,)),)))
    snapshot.save_network_pickle(net, P('bytearray.pkl'), extra=Reduce(bytearray, (4_000_000_000,)))
    snapshot.save_network_pickle(net, P('recon.pkl'), extra=Reduce(copyreg._reconstructor, (bytearray, bytearray, 4_000_000_000)))
    for f in ('setrange', 'bytearray', 'recon'):
        for name, cli, pre, post in loaders(f)[:4]:
            add(5, f'{name}: pickle with {f} of 4e8+ items', cli, [*pre, P(f'{f}.pkl'), *post], timeout=30)

    os.makedirs(P('bombds'), exist_ok=True)
    gray_pngs(P('bombds'))
    png_with_size(P('bombds', '9.png'), 40000, 40000)
    png_with_size(P('bomb.png'), 40000, 40000)
    png_with_size(P('bomb-warn.png'), 10000, 10000)     # PIL only warns at this size.
    for label, source in (('40000x40000', P('bombds')),):
        add(5, f'dataset_tool --source with a {label} PNG', dataset_tool.main, ['--source', source, '--dest', P('bd.zip')])
        add(5, f'train --data with a {label} PNG', train.main, [f'--outdir={P("r-bomb")}', '--data', source, '--dry-run', *TRAIN_TINY])
        add(5, f'zscg --data with a {label} PNG', zscg.main, ['--network', P('net.safetensors'), '--data', source, '--out', P('zb.png')])
        add(5, f'compress encode --data with a {label} PNG', compress.main, ['encode', '--network', P('net.safetensors'), '--data', source,
            '--out', P('eb.bin')])
        add(5, f'fid ref --data with a {label} PNG', fid.cli, ['ref', '--data', source, '--dest', P('rb.npz'), '--detector', P('det.pt'), '--trust-code'])
        add(5, f'fid calc --images with a {label} PNG', fid.cli, ['calc', '--images', source, '--detector', P('det.pt'), '--trust-code', '--metrics', 'is', '-n', '4'])
        add(5, f'generate --reconstruct with a {label} PNG', generate.main, ['--network', P('net.safetensors'), '--outdir', P('o-rb'),
            '--reconstruct', source])
    for bomb in ('bomb.png', 'bomb-warn.png'):
        add(5, f'generate --guide-image {bomb}', generate.main, ['--network', P('net.safetensors'), '--outdir', P(f'o-g-{bomb}'),
            '--guide', 'l2', '--guide-image', P(bomb)])
        add(5, f'generate --guide-mask {bomb}', generate.main, ['--network', P('net.safetensors'), '--outdir', P(f'o-m-{bomb}'),
            '--guide', 'inpaint', '--guide-image', P('g.png'), '--guide-mask', P(bomb)])
        add(5, f'toy_2d --density {bomb}', toy_2d.main, [f'--density={P(bomb)}', '--steps=1', '--k=4'])
    # A dataset zip whose dataset.json inflates a thousand-fold, and a latents.npz of the same kind.
    with zipfile.ZipFile(P('jsonbomb.zip'), 'w', compression=zipfile.ZIP_DEFLATED) as z:
        for name in os.listdir(P('ds')):
            if name.endswith('.png'):
                z.write(P('ds', name), name)
        z.writestr('dataset.json', '{"labels": [' + ' ' * 300_000_000 + ']}')
    add(5, 'train --data zip with a 300 MB dataset.json (--cond)', train.main, [f'--outdir={P("r-jb")}', '--data', P('jsonbomb.zip'),
        '--cond=True', '--dry-run', *TRAIN_TINY], contains='limit')
    add(5, 'dataset_tool --source zip with a 300 MB dataset.json', dataset_tool.main, ['--source', P('jsonbomb.zip'), '--dest', P('jb.zip')],
        contains='limit')
    with zipfile.ZipFile(P('latbomb.npz'), 'w', compression=zipfile.ZIP_DEFLATED) as z:
        buf = io.BytesIO()
        np.save(buf, np.zeros((40_000_000, 4), np.int64))
        z.writestr('codes.npy', buf.getvalue())
    add(5, 'generate --codes latents.npz inflating to 1.3 GB', generate.main, ['--network', P('net.safetensors'), '--outdir', P('o-lb'),
        '--codes', P('latbomb.npz')], contains='limit')
    # FIFOs where files are expected.
    gray_pngs(P('fifods'))
    os.mkfifo(P('fifods', 'x.png'))
    os.mkfifo(P('fifo.png'))
    os.mkfifo(P('fifo.npz'))
    os.mkfifo(P('fifo.bin'))
    gray_pngs(P('fifojson'))
    os.mkfifo(P('fifojson', 'dataset.json'))
    add(5, 'dataset_tool --source folder with a FIFO x.png', dataset_tool.main, ['--source', P('fifods'), '--dest', P('ff.zip')], timeout=20)
    add(5, 'train --data folder with a FIFO x.png', train.main, [f'--outdir={P("r-ff")}', '--data', P('fifods'), '--dry-run', *TRAIN_TINY], timeout=20)
    add(5, 'zscg --data folder with a FIFO x.png', zscg.main, ['--network', P('net.safetensors'), '--data', P('fifods'), '--out', P('zf.png')], timeout=20)
    add(5, 'fid calc --images folder with a FIFO x.png', fid.cli, ['calc', '--images', P('fifods'), '--detector', P('det.pt'), '--trust-code', '--metrics', 'is',
        '-n', '4'], timeout=20)
    add(5, 'train --data folder with a FIFO dataset.json (--cond)', train.main, [f'--outdir={P("r-fj")}', '--data', P('fifojson'), '--cond=True',
        '--dry-run', *TRAIN_TINY], timeout=20)
    add(5, 'dataset_tool --source folder with a FIFO dataset.json', dataset_tool.main, ['--source', P('fifojson'), '--dest', P('fj.zip')], timeout=20)
    add(5, 'generate --guide-image FIFO', generate.main, ['--network', P('net.safetensors'), '--outdir', P('o-gf'), '--guide', 'l2',
        '--guide-image', P('fifo.png')], timeout=20)
    add(5, 'toy_2d --density FIFO', toy_2d.main, [f'--density={P("fifo.png")}', '--steps=1', '--k=4'], timeout=20)
    add(5, 'generate --codes FIFO', generate.main, ['--network', P('net.safetensors'), '--outdir', P('o-cf'), '--codes', P('fifo.npz')], timeout=20)
    add(5, 'compress decode --codes FIFO', compress.main, ['decode', '--network', P('net.safetensors'), '--codes', P('fifo.bin'),
        '--outdir', P('d-f')], timeout=20)
    add(5, 'generate --network FIFO', generate.main, ['--network', P('fifo.bin'), '--outdir', P('o-nf')], timeout=20)
    add(5, 'generate --seeds=0-99999999999', generate.main, ['--network', P('net.safetensors'), '--outdir', P('o-s'), '--seeds=0-99999999999'])

    # 6. Damaged and hostile safetensors, deep JSON.
    header, body = safetensors_parts(good)
    damaged = {
        'truncated': good[:len(good) - 100],
        'truncated header': good[:50],
        'empty': b'',
        'deep JSON header': safetensors_join(None, body, raw=('{"a": ' + '[' * 100000 + ']' * 100000 + '}').encode()),
        'deep "ddn" metadata': safetensors_join(dict(header, __metadata__={'ddn': '[' * 100000 + ']' * 100000}), body),
        '"ddn" not JSON': safetensors_join(dict(header, __metadata__={'ddn': '{oops'}), body),
        'another class_name': safetensors_join(dict(header, __metadata__={'ddn': header['__metadata__']['ddn'].replace(
            'training.networks.DDNGenerator', 'os.system')}), body),
        'a tensor shape of 1e12': safetensors_join({**header, **{k: dict(v, shape=[10**6, 10**6]) for k, v in list(header.items())[:2]
                                                                 if k != '__metadata__'}}, body),
        'offsets past the end': safetensors_join({**header, **{k: dict(v, data_offsets=[0, 10**9]) for k, v in list(header.items())[:2]
                                                               if k != '__metadata__'}}, body),
    }
    for i, (label, data) in enumerate(damaged.items()):
        open(P(f'dmg{i}.safetensors'), 'wb').write(data)
        for name, cli, pre, post in loaders(f'd{i}'):
            if i < 4 or name in ('generate', 'train --transfer'):
                add(6, f'{name}: {label} safetensors', cli, [*pre, P(f'dmg{i}.safetensors'), *post], timeout=30)
        if i < 5:
            add(6, f'demo Load: {label} safetensors', _demo_load, [P(f'dmg{i}.safetensors')])
    add(6, 'compress decode --network truncated safetensors', compress.main, ['decode', '--network', P('dmg0.safetensors'), '--codes', P('codes.bin'),
        '--outdir', P('d-t')])
    open(P('trunc.pkl'), 'wb').write(open(P('net.pkl'), 'rb').read()[:3000])
    for name, cli, pre, post in loaders('tp')[:3]:
        add(6, f'{name}: truncated .pkl', cli, [*pre, P('trunc.pkl'), *post])
    gray_pngs(P('deepds'))
    open(P('deepds', 'dataset.json'), 'w').write(deep_json())
    with zipfile.ZipFile(P('deep.zip'), 'w') as z:
        for name in os.listdir(P('deepds')):
            z.write(P('deepds', name), name)
    for source in ('deepds', 'deep.zip'):
        add(6, f'train --data {source} with a deeply nested dataset.json', train.main, [f'--outdir={P("r-deep")}', '--data', P(source),
            '--cond=True', '--dry-run', *TRAIN_TINY])
        add(6, f'dataset_tool --source {source} with a deeply nested dataset.json', dataset_tool.main, ['--source', P(source),
            '--dest', P(f'deep-{source}.zip')])
    add(6, 'generate --reconstruct deep.zip (labels not needed)', generate.main, ['--network', P('net.safetensors'), '--outdir', P('o-deep'),
        '--reconstruct', P('deep.zip'), '--max-images', '2'], expect='ok')

    # 7. The demo with visitors (the "rel2" branch).
    add(7, 'demo Load: a payload pickle', _demo_load, [P('payload.pkl')])
    add(7, 'demo Load: a non-network file', _demo_load, [P('g.png')])
    add(7, 'demo: one visitor\'s Load does not switch the others\' network', _demo_sessions, [P('net.safetensors'), P('net.pkl')], expect='ok')

    # 8. Resume and run folders (the "rel2" branch for locks and process counts).
    add(8, 'train --resume with another --batch', train.main, [f'--outdir={P("r8")}', f'--resume={run}', '--duration=0.0006',
        *[a if a != '--batch=20' else '--batch=40' for a in TRAIN_TINY]], contains='--batch=20')
    open(P('trunc-state.pt'), 'wb').write(open(os.path.join(run, state), 'rb').read()[:2000])
    add(8, 'train --resume a truncated state', train.main, [f'--outdir={P("r8")}', '--resume', P('trunc-state.pt'), *TRAIN_TINY])
    add(8, 'train --resume a network snapshot', train.main, [f'--outdir={P("r8")}', '--resume', P('net.safetensors'), *TRAIN_TINY])
    add(8, 'train --resume a missing folder', train.main, [f'--outdir={P("r8")}', '--resume', P('nowhere'), *TRAIN_TINY])
    add(8, 'train --transfer and --resume together', train.main, [f'--outdir={P("r8")}', '--resume', run, '--transfer', P('net.safetensors'),
        *TRAIN_TINY])
    add(8, 'train --nosubdir into a folder holding another run', train.main, [f'--outdir={run}', '--nosubdir', '--duration=0.0001', *TRAIN_TINY],
        keep=run)

    # 9. Unwritable and full disks.
    ro, full = Disk(P('ro'), 'ro'), Disk(P('full'), 'full')
    for disk in (ro, full):
        d = disk.path
        kind = 'read-only' if disk.kind == 'ro' else 'full'
        no_temp = lambda d=d: _no_files_left(d)
        targets = [
            ('fid ref --dest', fid.cli, ['ref', '--data', P('ds'), '--dest', os.path.join(d, 'ref.npz'), '--detector', P('det.pt'), '--trust-code']),
            ('fid calc --out', fid.cli, ['calc', '--images', P('gen'), '--detector', P('det.pt'), '--trust-code', '--metrics', 'is',
                                          '-n', '12', '--out', os.path.join(d, 'm.json')]),
            ('compress encode --out', compress.main, ['encode', '--network', P('net.safetensors'), '--data', P('ds'), '--out', os.path.join(d, 'c.bin')]),
            ('compress decode --outdir', compress.main, ['decode', '--network', P('net.safetensors'), '--codes', P('codes.bin'),
                                                          '--outdir', os.path.join(d, 'dec')]),
            ('toy_2d --out', toy_2d.main, ['--density=gaussian', '--steps=1', '--k=4', '--out', os.path.join(d, 'p.npy')]),
            ('toy_2d --gif', toy_2d.main, ['--density=gaussian', '--steps=2', '--k=4', '--gif', os.path.join(d, 'p.gif')]),
            ('train --outdir', train.main, [f'--outdir={d}', '--duration=0.0001', *TRAIN_TINY]),
            ('dataset_tool --dest zip', dataset_tool.main, ['--source', P('ds'), '--dest', os.path.join(d, 'x.zip')]),
            ('dataset_tool --dest folder', dataset_tool.main, ['--source', P('ds'), '--dest', os.path.join(d, 'xdir')]),
            ('generate --outdir', generate.main, ['--network', P('net.safetensors'), '--outdir', os.path.join(d, 'gen'), '--seeds', '0-1']),
            ('zscg --out', zscg.main, ['--network', P('net.safetensors'), '--data', P('ds'), '--out', os.path.join(d, 'z.png')]),
            ('tree --out', tree.main, ['--network', P('net.safetensors'), '--out', os.path.join(d, 't.png')]),
            ('convert --out', convert.main, ['--network', P('net.pkl'), '--out', os.path.join(d, 'n.safetensors')]),
        ]
        for label, cli, args in targets:
            cases.append(Case(9, f'{label} on a {kind} disk', cli, args, check=no_temp, timeout=60)._replace(what=f'{label} on a {kind} disk'))
    # 10. Values never checked.
    for value in ('nan', 'inf', '-inf', '1e400'):
        add(10, f'train --lr={value}', train.main, [f'--outdir={P("r10")}', f'--lr={value}', '--dry-run', *TRAIN_TINY], contains='--lr')
    for option in ('--lr-rampup=nan', '--ema=inf', '--duration=nan', '--tick=inf', '--dropout=nan', '--chain-dropout=nan', '--bias-rate=inf'):
        add(10, f'train {option}', train.main, [f'--outdir={P("r10")}', '--dry-run', *TRAIN_TINY, option])
    add(10, 'toy_2d --lr=nan', toy_2d.main, ['--density=gaussian', '--steps=1', '--k=4', '--lr=nan'])
    add(10, 'toy_2d --bias-rate=inf', toy_2d.main, ['--density=gaussian', '--steps=1', '--k=4', '--bias-rate=inf'])
    add(10, 'zscg --temperature=nan', zscg.main, ['--network', P('net.safetensors'), '--data', P('ds'), '--out', P('zt.png'), '--temperature=nan'])
    add(10, 'generate --guide-temp=nan', generate.main, ['--network', P('net.safetensors'), '--outdir', P('o-gt'), '--guide', 'l2',
        '--guide-image', P('g.png'), '--guide-temp=nan'])
    for seed in (str(2**63), str(2**64 + 5), '-1'):
        add(10, f'train --seed={seed}', train.main, [f'--outdir={P("r10")}', '--dry-run', *TRAIN_TINY, f'--seed={seed}'])
        add(10, f'toy_2d --seed={seed}', toy_2d.main, ['--density=gaussian', '--steps=1', '--k=4', f'--seed={seed}'])
        add(10, f'fid calc --seed={seed}', fid.cli, ['calc', '--images', P('gen'), '--detector', P('det.pt'), '--trust-code', '--metrics', 'is', '-n', '4', f'--seed={seed}'])
    add(10, 'generate --seeds=2^63', generate.main, ['--network', P('net.safetensors'), '--outdir', P('o-s63'), f'--seeds={2**63}'])
    add(10, 'generate --seeds=2^63-2..2^63', generate.main, ['--network', P('net.safetensors'), '--outdir', P('o-s63r'), f'--seeds={2**63 - 2}-{2**63}'])
    add(10, 'generate --seeds=2^63-1 (largest seed)', generate.main, ['--network', P('net.safetensors'), '--outdir', P('o-s63ok'),
        f'--seeds={2**63 - 1}'], expect='ok')
    add(10, 'zscg --seeds=2^64', zscg.main, ['--network', P('net.safetensors'), '--data', P('ds'), '--out', P('zs.png'), f'--seeds={2**64}'])
    add(10, 'zscg --seeds=0-9999999', zscg.main, ['--network', P('net.safetensors'), '--data', P('ds'), '--out', P('zs.png'), '--seeds=0-9999999'])
    add(10, 'zscg --images=0-9999999', zscg.main, ['--network', P('net.safetensors'), '--data', P('ds'), '--out', P('zs.png'), '--images=0-9999999'])
    for label in (2_000_000_000, -1, 1.5, 1e30, '"a"', 'true', 'null'):
        folder = P(f'lab-{label}')
        gray_pngs(folder)
        open(os.path.join(folder, 'dataset.json'), 'w').write('{"labels": [' + ', '.join(f'["{i}.png", {json.dumps(label) if not isinstance(label, str) else label}]'
                                                                                         for i in range(4)) + ']}')
        add(10, f'dataset_tool label {label}', dataset_tool.main, ['--source', folder, '--dest', P(f'lab-{len(cases)}.zip')], contains='label')
        if label in (2_000_000_000, 1.5, 1e30):
            add(10, f'train --cond=True with label {label}', train.main, [f'--outdir={P("r10")}', '--data', folder, '--cond=True', '--dry-run',
                *TRAIN_TINY], contains='label')
    other = DDNGenerator(**dict(TINY, max_channels=16))
    snapshot.save_network_safe(other, P('other-arch.safetensors'))
    for label, path in (('another architecture', P('other-arch.safetensors')), ('another resolution', P('net.safetensors'))):
        add(10, f'train --transfer of {label}', train.main, [f'--outdir={P("r-arch")}', '--transfer', path, '--duration=0.0001', *TRAIN_TINY],
            contains='--transfer', check=lambda: not os.path.exists(P('r-arch')) or not os.listdir(P('r-arch')))
    with open(P('codes.bin'), 'wb') as f:
        pass
    CliRunner().invoke(compress.main, ['encode', '--network', P('net.safetensors'), '--data', P('ds'), '--out', P('codes.bin')])
    codes = open(P('codes.bin'), 'rb').read()
    bad_codes = {
        'wrong magic': b'XXXX' + codes[4:],
        'L = 2^32-1': codes[:9] + struct.pack('<I', 2**32 - 1) + codes[13:],
        'K = 0': codes[:13] + struct.pack('<I', 0) + codes[17:],
        'truncated header': codes[:15],
        'num = 2^32-1': codes[:5] + struct.pack('<I', 2**32 - 1) + codes[9:],
        'version 9': codes[:4] + bytes([9]) + codes[5:],
        'empty': b'',
    }
    for i, (label, data) in enumerate(bad_codes.items()):
        open(P(f'codes{i}.bin'), 'wb').write(data)
        add(10, f'compress decode: codes file with {label}', compress.main, ['decode', '--network', P('net.safetensors'), '--codes', P(f'codes{i}.bin'),
            '--outdir', P(f'd10-{i}')])
    add(10, 'zscg --data missing', zscg.main, ['--network', P('net.safetensors'), '--data', P('nowhere'), '--out', P('zd.png')])
    add(10, 'zscg --data a file that is not a dataset', zscg.main, ['--network', P('net.safetensors'), '--data', P('g.png'), '--out', P('zd.png')])
    gray_pngs(P('ds16'), size=16)
    add(10, 'zscg --data of another resolution', zscg.main, ['--network', P('net.safetensors'), '--data', P('ds16'), '--out', P('zd.png')])
    open(P('notadet.pt'), 'w').write('hello')
    open(P('truncdet.pt'), 'wb').write(open(P('det.pt'), 'rb').read()[:500])
    for label, det in (('missing', P('nodet.pt')), ('a text file', P('notadet.pt')), ('a truncated TorchScript', P('truncdet.pt'))):
        add(10, f'fid calc --detector {label}', fid.cli, ['calc', '--images', P('gen'), '--detector', det, '--metrics', 'is', '-n', '4'])
        add(10, f'fid ref --detector {label}', fid.cli, ['ref', '--data', P('ds'), '--dest', P('r10.npz'), '--detector', det])
    add(10, 'fid ref --dest in a missing folder (created)', fid.cli, ['ref', '--data', P('ds'), '--dest', P('no', 'where', 'r.npz'),
        '--detector', P('det.pt'), '--trust-code'], expect='ok')
    open(P('afile'), 'w').write('x')
    add(10, 'fid ref --dest under a file', fid.cli, ['ref', '--data', P('ds'), '--dest', P('afile', 'r.npz'), '--detector', P('det.pt'), '--trust-code'])
    add(10, 'fid ref --dest a folder', fid.cli, ['ref', '--data', P('ds'), '--dest', P('ds'), '--detector', P('det.pt'), '--trust-code'])
    add(10, 'fid calc --out a folder', fid.cli, ['calc', '--images', P('gen'), '--detector', P('det.pt'), '--trust-code', '--metrics', 'is', '-n', '4', '--out', P('ds')])
    nan_net = DDNGenerator(**TINY)
    with torch.no_grad():
        for p in nan_net.parameters():
            p.fill_(float('nan'))
    snapshot.save_network_safe(nan_net, P('nan.safetensors'))
    for name, cli, pre, post in loaders('nan')[:5]:
        if name != 'convert':
            add(10, f'{name}: a network with NaN weights', cli, [*pre, P('nan.safetensors'), *post], contains='non-finite')
    def diverged_run_kept():
        runs = [n for n in os.listdir(P('r-div')) if not n.startswith('.')] if os.path.isdir(P('r-div')) else []
        return bool(runs) and any(n.startswith('network-snapshot-') for n in os.listdir(P('r-div', runs[0])))
    add(10, 'train --lr=1e30: the loss turns NaN', train.main, [f'--outdir={P("r-div")}', '--duration=0.002', '--tick=0.1', '--snap=1',
        *TRAIN_TINY, '--lr=1e30'], contains='Training diverged', check=diverged_run_kept)
    add(10, 'generate --device=foo', generate.main, ['--network', P('net.safetensors'), '--outdir', P('o-dev'), '--device=foo'])
    add(10, 'toy_2d --density=foo', toy_2d.main, ['--density=foo', '--steps=1'], contains='neither built in')

    # 2, 3 and 8: process groups (SIGTERM to every process, Ctrl+C), and a second resume of a folder in use.
    env = dict(os.environ, OMP_NUM_THREADS='1', CUDA_VISIBLE_DEVICES='', PYTHONPATH=REPO)
    background = []
    for cls, sig, what in ((2, signal.SIGTERM, 'SIGTERM to the process group (a DataLoader worker too) saves a state, exits 0'),
                           (3, signal.SIGINT, 'Ctrl+C (SIGINT to the group) saves a state, exits 0')):
        outdir = P(f'sig{cls}')
        proc = subprocess.Popen([sys.executable, os.path.join(REPO, 'train.py'), f'--outdir={outdir}', '--duration=1', '--tick=0.02', '--dump=1000',
                                 '--snap=1000', *[a for a in TRAIN_TINY if a != '--workers=0'], '--workers=1'], cwd=w, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
        background.append((cls, sig, what, proc, outdir))
    return cases, background

def _no_files_left(folder):
    """True if a failed case left no file in `folder` (empty folders are fine); empties it for the next case."""
    left = [os.path.join(root, f) for root, _, files in os.walk(folder) for f in files if f not in ('filler', '.run-id.lock')]
    for name in os.listdir(folder):
        if name != 'filler':
            path = os.path.join(folder, name)
            shutil.rmtree(path, ignore_errors=True) if os.path.isdir(path) else os.remove(path)
    if left:
        print(f'    left behind: {left[:3]}', flush=True)
    return not left

def finish_background(background, timeout=240):
    rows = []
    for cls, sig, what, proc, outdir in background:
        start = time.time()
        deadline = start + timeout
        outcome, message = 'hang', 'no tick within the time limit'
        line = ''
        while time.time() < deadline and not line.startswith('tick '):
            line = proc.stdout.readline()
            if not line and proc.poll() is not None:
                break
        if line.startswith('tick '):
            os.killpg(proc.pid, sig)
            try:
                out, _ = proc.communicate(timeout=max(deadline - time.time(), 10))
                runs = sorted(n for n in os.listdir(outdir) if not n.startswith('.')) if os.path.isdir(outdir) else []
                run = os.path.join(outdir, runs[0]) if runs else outdir
                states = [n for n in os.listdir(run) if n.startswith('training-state-')] if os.path.isdir(run) else []
                tail = [x for x in out.strip().splitlines() if x.strip()][-1:] or ['']
                message = tail[0][:150]
                if proc.returncode == 0 and states:
                    outcome = 'ok'
                elif 'Traceback' in out:
                    outcome = 'traceback' if states else 'data loss'
                else:
                    outcome = 'data loss' if not states else 'unclear'
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.communicate()
        else:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            out, _ = proc.communicate()
            message = (line + out)[-150:]
        rows.append(Row(Case(cls, what, None, [], expect='ok', owner='rel2'), outcome, message, time.time() - start))
    return rows

# ----------------------------------------------------------------------------
# Run everything; print and return the rows.

def run(w=None, out=None, skip_signals=False):
    out = out or sys.stdout         # Looked up now: under pytest's capsys.disabled() it is the terminal.
    w = os.path.abspath(w or tempfile.mkdtemp(prefix='bad-input-'))
    os.makedirs(w, exist_ok=True)
    marker = os.path.join(w, 'MARKER')
    saved_env = {k: os.environ.get(k) for k in ('DDN_CACHE_DIR', 'CUDA_VISIBLE_DEVICES')}
    os.environ['DDN_CACHE_DIR'] = os.path.join(w, 'cache')
    cwd = os.getcwd()
    os.chdir(w)
    try:
        import warnings
        warnings.filterwarnings('ignore')
        cases, background = build_cases(w, marker)
        if skip_signals:
            for *_, proc, _outdir in background:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.communicate()
            background = []
        rows = []
        for case in cases:
            sim = [d for d in _DISKS if d.path in ' '.join(map(str, case.args))]
            row = run_case(case, marker, sim)
            rows.append(row)
            print(format_row(row), file=out, flush=True)
        for row in finish_background(background):
            rows.append(row)
            print(format_row(row), file=out, flush=True)
        print(summary(rows), file=out, flush=True)
        return rows
    finally:
        for disk in list(_DISKS):
            disk.close()
            _DISKS.remove(disk)
        os.chdir(cwd)
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v

def format_row(row):
    owner = f' ({row.case.owner})' if row.case.owner else ''
    return f'{row.outcome:14s} [{row.case.cls:2d}] {row.case.what}{owner}: {row.message[:140]}'

def summary(rows):
    counts = {o: sum(r.outcome == o for r in rows) for o in OUTCOMES}
    lines = ['', f'{"class":>5s} {"cases":>5s} ' + ' '.join(f'{o:>14s}' for o in OUTCOMES)]
    for cls in sorted({r.case.cls for r in rows}):
        sub = [r for r in rows if r.case.cls == cls]
        lines.append(f'{cls:5d} {len(sub):5d} ' + ' '.join(f'{sum(r.outcome == o for r in sub):14d}' for o in OUTCOMES))
    lines.append(f'{"all":>5s} {len(rows):5d} ' + ' '.join(f'{counts[o]:14d}' for o in OUTCOMES))
    slow = sorted(rows, key=lambda r: -r.seconds)[:3]
    lines.append(f'{sum(r.seconds for r in rows):.0f} s in cases; slowest: ' + ', '.join(f'{r.case.what} {r.seconds:.1f} s' for r in slow))
    lines.append(f'{counts["ok"]} of {len(rows)} cases ok')
    return '\n'.join(lines)

if __name__ == '__main__':
    run(sys.argv[1] if len(sys.argv) > 1 else None)
