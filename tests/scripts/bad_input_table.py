"""Re-run of issue 10's bad-input review: each case runs a script as a user would, with bad input,
and is OK when it ends with a clear message (non-zero exit, `Error:`, no traceback), runs no code from
a received file, and leaves existing outputs as they were. Prints one line per case and a total.

    python tests/scripts/bad_input_table.py [WORKDIR]

Takes a few minutes on a 2-core CPU (it trains two tiny networks). Not part of the test suite: the
tests of each finding live in tests/test_bad_input.py, tests/test_payloads.py and tests/test_preemption.py.
"""

import gzip
import hashlib
import os
import pickle
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np
import PIL.Image
import torch

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)
import dnnlib

W = os.path.abspath(sys.argv[1]) if len(sys.argv) > 1 else tempfile.mkdtemp(prefix='bad-input-')
ENV = dict(os.environ, OMP_NUM_THREADS='1', CUDA_VISIBLE_DEVICES='', PYTHONPATH=REPO, DDN_CACHE_DIR=os.path.join(W, 'cache'))
MARKER = os.path.join(W, 'MARKER')
TINY = ['--batch=20', '--max-channels=8', '--max-blockn=1', '--max-outputk=4', '--lr-rampup=0', '--workers=0', '--seed=0']
results = []

def sh(*args, timeout=300):
    return subprocess.run([sys.executable, *[str(a) for a in args]], cwd=W, env=ENV, capture_output=True, text=True, timeout=timeout)

def tree_hash(path):
    h = hashlib.sha256()
    for root, _, files in sorted(os.walk(path)):
        for f in sorted(files):
            h.update(f.encode())
            h.update(open(os.path.join(root, f), 'rb').read())
    return h.hexdigest()

def case(finding, what, args, expect='error', contains=None, keep=None, check=None):
    before = tree_hash(keep) if keep else None
    proc = sh(*args)
    out = proc.stdout + proc.stderr
    ok = ('Traceback' not in out) and not os.path.exists(MARKER)
    if expect == 'error':
        ok = ok and proc.returncode != 0 and 'Error' in out
    else:
        ok = ok and proc.returncode == 0
    if contains:
        ok = ok and contains in out
    if keep:
        ok = ok and tree_hash(keep) == before
    if check:
        ok = ok and check()
    if os.path.exists(MARKER):
        os.remove(MARKER)
    last = [line for line in out.strip().splitlines() if line.strip()][-1:] or ['']
    results.append((finding, what, ok))
    print(f'{"ok  " if ok else "FAIL"} [{finding}] {what}: {last[0][:150]}', flush=True)

class Payload:
    def __reduce__(self):
        return (open, (MARKER, 'w'))

def main():
    os.makedirs(W, exist_ok=True)
    os.chdir(W)
    # A trained tiny run (digits) and a payload of every kind.
    proc = sh('train.py' if False else os.path.join(REPO, 'train.py'), '--outdir=runs', '--duration=0.0004', '--tick=0.1',
              '--snap=1', '--dump=1', *TINY)
    assert proc.returncode == 0, proc.stderr
    run = os.path.join(W, 'runs', sorted(n for n in os.listdir('runs') if not n.startswith('.'))[0])
    P = lambda name: os.path.join(REPO, name)
    with open('payload.pkl', 'wb') as f:
        pickle.dump(Payload(), f)
    torch.save(dict(net=Payload()), 'training-state-000009.pt')
    planted = os.path.join(W, 'planted')
    shutil.copytree(run, planted)
    shutil.copy('payload.pkl', os.path.join(planted, 'network-snapshot-999999.pkl'))
    shutil.copy('training-state-000009.pt', os.path.join(planted, 'training-state-999999.pt'))
    url = 'https://example.com/net/network-snapshot-000100.pkl'
    os.makedirs(os.path.join(W, 'cache', 'downloads'), exist_ok=True)
    shutil.copy('payload.pkl', os.path.join(W, 'cache', 'downloads', dnnlib.util.url_cache_file_name(url)))
    PIL.Image.new('L', (16, 16), 128).save('g.png')

    # 1. Loaders of received files.
    for source, label in (('payload.pkl', 'file'), (url, 'URL'), (planted, 'run folder')):
        case(1, f'generate --network {label}', [P('generate.py'), '--network', source, '--outdir', 'o1'])
        case(1, f'zscg --network {label}', [P('zscg.py'), '--network', source, '--out', 'z.png'])
        case(1, f'tree --network {label}', [P('tree.py'), '--network', source, '--out', 't.png'])
        case(1, f'compress encode --network {label}', [P('compress.py'), 'encode', '--network', source, '--out', 'c.bin'])
    case(1, 'compress decode --network file', [P('compress.py'), 'decode', '--network', 'payload.pkl', '--codes', 'payload.pkl', '--outdir', 'd'])
    case(1, 'convert --network file', [P('convert.py'), '--network', 'payload.pkl', '--out', 'x.safetensors'])
    case(1, 'train --transfer file', [P('train.py'), '--outdir=r1', '--transfer', 'payload.pkl', *TINY])
    case(1, 'train --transfer run folder', [P('train.py'), '--outdir=r1', '--transfer', planted, *TINY])
    case(1, 'train --resume file', [P('train.py'), '--outdir=r1', '--resume', 'training-state-000009.pt', *TINY])
    case(1, 'train --resume run folder', [P('train.py'), '--outdir=r1', '--resume', planted, *TINY])
    case(1, 'generate --guide-classifier pickle', [P('generate.py'), '--network', run, '--outdir', 'o2', '--guide', 'classifier',
                                                    '--guide-classifier', 'payload.pkl', '--class', '1'])
    case(1, 'generate --guide-features pickle', [P('generate.py'), '--network', run, '--outdir', 'o3', '--guide', 'style',
                                                  '--guide-image', 'g.png', '--guide-features', 'payload.pkl'])
    case(1, 'fid calc --detector pickle (issue 14 owns this loader)', [P('fid.py'), 'calc', '--images', run, '--detector', 'payload.pkl',
                                                                     '--metrics', 'is'])

    # 3. 16-bit PNGs.
    os.makedirs('png16', exist_ok=True)
    for i in range(4):
        PIL.Image.fromarray((np.arange(256).reshape(16, 16) * 200 + i).astype(np.uint16)).save(f'png16/{i}.png')
    def not_white():
        sys.path.insert(0, REPO)
        from training.dataset import ImageFolderDataset
        return ImageFolderDataset(os.path.join(W, 'png16.zip'))[0][0].mean() < 200
    case(3, 'dataset_tool 16-bit PNGs', [P('dataset_tool.py'), '--source', 'png16', '--dest', 'png16.zip'], expect='ok', check=not_white)

    # 4. generate -> fid calc, with and without --subdirs.
    torch.jit.script(_Detector()).save('det.pt')
    for sub in ([], ['--subdirs']):
        out = f'gen{len(sub)}'
        sh(P('generate.py'), '--network', run, '--outdir', out, '--seeds', '0-11', *sub)
        case(4, f'generate{" --subdirs" if sub else ""} -> fid calc --images outdir', [P('fid.py'), 'calc', '--images', out,
             '--detector', 'det.pt', '--trust-code', '--metrics', 'is', '-n', '12'], expect='ok')

    # 5. dataset_tool replacing an existing --dest, or its --source.
    case(5, 'dataset_tool existing --dest zip', [P('dataset_tool.py'), '--source', 'png16', '--dest', 'png16.zip'], keep='png16.zip')
    case(5, 'dataset_tool --dest == --source', [P('dataset_tool.py'), '--source', 'png16.zip', '--dest', 'png16.zip', '--force'], keep='png16.zip')

    # 6. Sub-kimg ticks: one file per snapshot.
    names = os.listdir(run)
    ok6 = sum(n.startswith('network-snapshot-') and n.endswith('.pkl') for n in names) == 5
    results.append((6, 'ticks of 0.1 kimg keep every snapshot (5 of 5)', ok6))
    print(f'{"ok  " if ok6 else "FAIL"} [6] ticks of 0.1 kimg keep every snapshot: {sorted(names)[:3]}...')

    # 7. Resume: tick numbers, changed --batch.
    case(7, 'resume with another --batch', [P('train.py'), '--outdir=r2', f'--resume={run}', '--duration=0.0006', '--tick=0.1',
         *[a if a != '--batch=20' else '--batch=40' for a in TINY]], contains='--batch=20')
    proc = sh(P('train.py'), '--outdir=r3', f'--resume={run}', '--duration=0.0006', '--tick=0.1', '--snap=1', '--dump=1', *TINY)
    ticks = [line.split()[1] for line in proc.stdout.splitlines() if line.startswith('tick ')]
    ok7 = proc.returncode == 0 and ticks == ['5', '6']
    results.append((7, 'resume continues with ticks 5, 6', ok7))
    print(f'{"ok  " if ok7 else "FAIL"} [7] resume continues with ticks 5, 6: {ticks}')

    # 8. Reusing an --outdir.
    case(8, 'generate into a used --outdir', [P('generate.py'), '--network', run, '--outdir', 'gen0', '--seeds', '0-3'], keep='gen0')

    # 9. Truncated PNG met while training.
    os.makedirs('trunc', exist_ok=True)
    for i in range(4):
        PIL.Image.fromarray(np.random.default_rng(i).integers(0, 256, (16, 16), dtype=np.uint8)).save(f'trunc/{i}.png')
    data = open('trunc/2.png', 'rb').read()
    open('trunc/2.png', 'wb').write(data[:70])
    case(9, 'truncated PNG while training (1 worker)', [P('train.py'), '--outdir=r4', '--data=trunc', '--duration=0.001',
         *[a for a in TINY if a != '--workers=0'], '--workers=1'], contains='2.png',
         check=lambda: not [n for n in os.listdir(os.path.join(W, 'r4')) if not n.startswith('.')])

    # 10. The rest.
    case(10, 'compress decode missing --codes', [P('compress.py'), 'decode', '--network', run, '--codes', 'none.bin', '--outdir', 'd'])
    os.makedirs('badjson', exist_ok=True)
    PIL.Image.new('L', (16, 16)).save('badjson/a.png')
    open('badjson/dataset.json', 'w').write('{"labels": [1, 2')
    case(10, 'train --data with malformed dataset.json --cond', [P('train.py'), '--outdir=r5', '--data=badjson', '--cond=True', *TINY])
    case(10, 'dataset_tool malformed dataset.json', [P('dataset_tool.py'), '--source', 'badjson', '--dest', 'bj.zip'])
    case(10, 'generate --device=foo', [P('generate.py'), '--network', run, '--outdir', 'o5', '--device=foo'])
    case(10, 'zscg --device=foo', [P('zscg.py'), '--network', run, '--device=foo'])
    case(10, 'zscg --out a folder', [P('zscg.py'), '--network', run, '--out', W])
    case(10, 'tree --out unknown extension', [P('tree.py'), '--network', run, '--out', 't.xyz'])
    case(10, 'generate --seeds=0-99999999999', [P('generate.py'), '--network', run, '--outdir', 'o6', '--seeds=0-99999999999'])
    sh(P('generate.py'), '--network', run, '--outdir', 'lat', '--seeds', '0-3')
    sh(P('train.py'), '--outdir=runs2', '--duration=0.0001', '--seed=7', *[a for a in TINY if a != '--seed=0'])
    other = os.path.join(W, 'runs2', sorted(n for n in os.listdir('runs2') if not n.startswith('.'))[0])
    case(10, 'decode latents with another network of the same shape', [P('generate.py'), '--network', other, '--outdir', 'o7',
         '--codes', 'lat/latents.npz'], expect='ok', contains='made by another network')
    open('trunc.tar.gz', 'wb').write(gzip.compress(os.urandom(100000))[:3000])
    os.rename('trunc.tar.gz', 'cifar-10-python.tar.gz')
    case(10, 'truncated CIFAR tarball', [P('dataset_tool.py'), '--source', 'cifar-10-python.tar.gz', '--dest', 'c.zip'])
    case(10, 'toy_2d --density=foo', [P('toy_2d.py'), '--density=foo', '--steps=1'], contains='neither built in')
    PIL.Image.new('L', (16, 16)).save('black.png')
    case(10, 'toy_2d all-black density', [P('toy_2d.py'), '--density=black.png', '--steps=1'], contains='all black')
    case(10, 'generate --network training state', [P('generate.py'), '--network', os.path.join(run, sorted(
        n for n in os.listdir(run) if n.startswith('training-state-'))[-1]), '--outdir', 'o8'], contains='--resume')
    stale = os.path.join(run, 'training-state-000000.pt.tmp-999999')
    open(stale, 'wb').write(b'x')
    sh(P('train.py'), f'--outdir={run}', '--nosubdir', f'--resume={run}', '--duration=0.0007', '--tick=0.1', *TINY)
    ok = not os.path.exists(stale)
    results.append((10, 'stale *.tmp-PID removed on the next start', ok))
    print(f'{"ok  " if ok else "FAIL"} [10] stale *.tmp-PID removed on the next start')

    # Preemption.
    proc = subprocess.Popen([sys.executable, P('train.py'), '--outdir=r6', '--duration=1', '--tick=0.1', *TINY], cwd=W, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen = ''
    while not seen.startswith('tick '):       # Training has started.
        seen = proc.stdout.readline()
        assert seen or proc.poll() is None, 'the run ended'
    time.sleep(1)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    ok = proc.returncode == 0 and 'To continue' in out
    results.append(('P', 'SIGTERM saves a state, exits 0', ok))
    print(f'{"ok  " if ok else "FAIL"} [P] SIGTERM: {out.strip().splitlines()[-1]}')

    good = sum(ok for _, _, ok in results)
    print(f'\n{good} of {len(results)} cases ok')

class _Detector(torch.nn.Module):
    def forward(self, x: torch.Tensor, return_features: bool = True) -> torch.Tensor:
        f = torch.nn.functional.adaptive_avg_pool2d(x.to(torch.float64) / 255, 2).flatten(1)
        return f if return_features else torch.softmax(f, dim=1)

if __name__ == '__main__':
    main()
