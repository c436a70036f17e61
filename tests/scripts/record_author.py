"""Record the outputs of the DDN author's own network as test data for tests/test_author.py.

NOT RUN BY CI: this script needs the author's code, which the project does not ship or import:
a checkout of github:DIYer22/discrete_distribution_networks (its `training/`, `torch_utils/` and
`dnnlib/` must come first on sys.path, so run it with that checkout as --author-repo and never from
a Python that has this repository on its path) and the packages `sddn==0.0.2` and `boxx`, installed
in a scratch environment outside the project, for example:

    python -m venv --system-site-packages /tmp/author && /tmp/author/bin/pip install sddn==0.0.2 boxx
    /tmp/author/bin/python tests/scripts/record_author.py --author-repo /path/to/discrete_distribution_networks \
        --outdir tests/data/author --pickles /tmp/author-pickles

For each configuration below it builds the author's network (`DDNPrecond` with model_type='PHDDN',
configured through `boxx.cf.kwargs` as the author's train.py does), overwrites every parameter with
values from a seeded rule (`perturbed_value()`, which the test repeats), writes the snapshot exactly
as the author's training loop does (`pickle.dump(dict(ema, loss_fn, augment_pipe, dataset_kwargs))`,
into --pickles, kept out of the repository) and records in `<name>.npz`:
- the parameter names and shapes (the layout the test's own writer must reproduce);
- codes and images of seeded samples (the author's generate.py stream: torch.rand(2000) per seed);
- images decoded from given codes;
- reconstruction codes and images of given images (the nearest candidate per layer);
- the condition images of the colour-conditional network.

The author's code runs on CUDA only (`.cuda()` inside the forward); on a CPU host the script makes
`Tensor.cuda()` return the tensor itself, which changes no arithmetic. The channel schedule is
capped by wrapping the author's `get_channeln` (the constant 256 becomes `max_channels`), so that the
recorded networks stay small; the full-width configuration keeps it as released.
"""

import argparse
import copy
import io
import json
import os
import pickle
import sys
import zlib

import numpy as np
import torch

# name: img_resolution, img_channels, max_channels (cap of get_channeln), max_blockn, max_outputk, condition.
CONFIGS = {
    # CIFAR-10 family (v15 ... cifar10-32x32 ... max_blockn=32, max_outputk=64), small.
    'cifar_rgb16':      dict(res=16, channels=3, max_channels=32, max_blockn=2, max_outputk=16, condition=None),
    'cifar_rgb32':      dict(res=32, channels=3, max_channels=16, max_blockn=1, max_outputk=8, condition=None),
    'cifar_fullwidth8': dict(res=8, channels=3, max_channels=256, max_blockn=1, max_outputk=64, condition=None),
    # Grayscale data (the author's network still predicts 3 channels).
    'gray8':            dict(res=8, channels=1, max_channels=16, max_blockn=2, max_outputk=64, condition=None),
    # FFHQ-64 family (blockn64_outputk512: blocks 2^s and K uncapped), small.
    'ffhq_blockn_outputk8': dict(res=8, channels=3, max_channels=32, max_blockn=64, max_outputk=512, condition=None),
    # FFHQ-256 colour-conditional family (ffhq256_cond.color), small.
    'ffhq_color16':     dict(res=16, channels=3, max_channels=32, max_blockn=2, max_outputk=32, condition='color'),
}
SEEDS = [0, 1, 2, 3]
WEIGHT_SEED = 9

# The value every parameter gets, from its name and shape only (repeated by tests/test_author.py):
# GroupNorm scales 1 + 0.2 n, other 1-D parameters (biases, GroupNorm shifts) 0.2 n, conv weights
# n / sqrt(fan_in), the DDL heads 0.1 n / sqrt(fan_in) (images stay near [-1, 1]), with n ~ N(0, 1)
# from a generator seeded by the name.
def perturbed_value(name, shape, seed=WEIGHT_SEED):
    g = torch.Generator().manual_seed(seed * 1000003 + zlib.crc32(name.encode()))
    n = torch.randn(shape, generator=g, dtype=torch.float32)
    if len(shape) == 1:
        return 1 + 0.2 * n if '.norm' in name and name.endswith('.weight') else 0.2 * n
    fan_in = int(np.prod(shape[1:]))
    return n * (0.1 if 'multi_out_conv1x1' in name else 1.0) / np.sqrt(fan_in)

def build_author_net(cfg):
    import boxx
    import sddn
    from training import networks
    boxx.cf.kwargs = dict(max_blockn=cfg['max_blockn'], max_outputk=cfg['max_outputk'], start_size=1,
                          condition=cfg['condition'], learn_res=True, chain_dropout=0.05)
    boxx.cf.debug = False
    sddn.DiscreteDistributionOutput.learn_residual = True
    sddn.DiscreteDistributionOutput.chain_dropout = 0.05
    cap = cfg['max_channels']
    networks.get_channeln = lambda scalei: min(max(4, 2 ** (13 - scalei)), cap)
    net = networks.DDNPrecond(img_resolution=cfg['res'], img_channels=cfg['channels'], label_dim=0,
                              use_fp16=False, model_type='PHDDN', dropout=0.0)
    with torch.no_grad():
        for name, p in net.named_parameters():
            p.copy_(perturbed_value(name, tuple(p.shape)))
    return net.eval().requires_grad_(False)

# The (module, name) globals a pickle refers to, found without importing or calling any of them.
def pickle_globals(raw):
    found = []
    class Recorder(pickle.Unpickler):
        def find_class(self, module, name):
            found.append([module, name])
            return type(name, (), {'__init__': lambda self, *a, **k: None, '__setstate__': lambda self, s: None,
                                   '__new__': lambda cls, *a, **k: object.__new__(cls)})
        def persistent_load(self, pid):
            return None
    Recorder(io.BytesIO(raw)).load()
    return [tuple(g) for g in found]

def run(net, d):
    with torch.no_grad():
        return net(d)

def record(name, cfg, outdir, pickles):
    from training.loss import DDNLoss
    net = build_author_net(cfg)
    L = len(net.model.module_names)
    ks = [getattr(net.model, n).ddo.k for n in net.model.module_names]
    rng = np.random.RandomState(zlib.crc32(name.encode()))
    res, B = cfg['res'], len(SEEDS)
    images = torch.from_numpy(rng.uniform(-1, 1, (B, 3 if cfg['channels'] == 3 else 1, res, res)).astype(np.float32))
    # Smooth the random images a little (an image-like target with structure at every scale).
    images = torch.nn.functional.avg_pool2d(torch.nn.functional.pad(images, (1, 1, 1, 1), mode='replicate'), 3, 1)
    out = dict(config=json.dumps(dict(cfg, name=name, weight_seed=WEIGHT_SEED)), ks=np.array(ks),
               param_names=np.array([n for n, _ in net.named_parameters()]),
               param_shapes=json.dumps([list(p.shape) for _, p in net.named_parameters()]),
               versions=json.dumps(dict(torch=torch.__version__, sddn=__import__('sddn').__version__)))
    cond = {}
    if cfg['condition'] == 'color':
        cond_images = torch.from_numpy(rng.uniform(-1, 1, (B, 3, res, res)).astype(np.float32))
        out['cond_images'] = cond_images.numpy()
        cond = dict(condition_source=cond_images)

    # Samples of the author's generate.py stream: torch.rand(2000, 1) per seed, codes floor(K u).
    u = torch.cat([torch.rand(2000, 1, generator=torch.Generator().manual_seed(s)) for s in SEEDS], -1)
    d = run(net, dict(batch_size=B, idx_ks=u, **cond))
    out['sample_seeds'] = np.array(SEEDS)
    out['sample_codes'] = d['idx_ks'][:L].T.long().numpy()
    out['sample_images'] = d['predict'].float().numpy()

    # Decoding given codes.
    codes = np.stack([rng.randint(0, k, B) for k in ks], 1)
    d = run(net, dict(batch_size=B, idx_ks=[torch.from_numpy(codes[:, l]) for l in range(L)], **cond))
    out['decode_codes'] = codes
    out['decode_images'] = d['predict'].float().numpy()

    # Reconstruction (encoding): nearest candidate per layer; a colour net's condition is the image's mean.
    d = run(net, dict(target=images))
    out['recon_inputs'] = images.numpy()
    out['recon_codes'] = torch.stack([torch.as_tensor(c) for c in d['idx_ks']], 1).long().numpy()
    out['recon_images'] = d['predict'].float().numpy()
    np.savez_compressed(os.path.join(outdir, f'{name}.npz'), **out)

    # The snapshot as the author's training loop writes it.
    if pickles:
        data = dict(ema=copy.deepcopy(net).eval().requires_grad_(False).cpu(), loss_fn=DDNLoss(), augment_pipe=None,
                    dataset_kwargs=dict(class_name='training.dataset.ImageFolderDataset', path=f'datasets/{name}.zip',
                                        use_labels=False, xflip=False, cache=True, resolution=res, max_size=1000))
        raw = pickle.dumps(data)
        with open(os.path.join(pickles, f'{name}-shot-000000.pkl'), 'wb') as f:
            f.write(raw)
        out['globals'] = json.dumps(sorted(set(pickle_globals(raw))))
        np.savez_compressed(os.path.join(outdir, f'{name}.npz'), **out)
    print(f'{name}: L={L} ks={ks} params={sum(p.numel() for p in net.parameters())}')

def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--author-repo', required=True, help='checkout of DIYer22/discrete_distribution_networks')
    parser.add_argument('--outdir', default=os.path.join(os.path.dirname(__file__), '..', 'data', 'author'))
    parser.add_argument('--pickles', default=None, help='also write the author-made snapshots here')
    parser.add_argument('--only', default=None, help='comma-separated configuration names')
    args = parser.parse_args()
    here = os.path.abspath(os.path.join(os.path.dirname(__file__), '..', '..'))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or '.') != here]
    sys.path.insert(0, os.path.abspath(args.author_repo))
    if not torch.cuda.is_available():
        torch.Tensor.cuda = lambda self, *a, **k: self  # The author's forward calls .cuda(); same arithmetic on the CPU.
    os.makedirs(args.outdir, exist_ok=True)
    if args.pickles:
        os.makedirs(args.pickles, exist_ok=True)
    torch.set_num_threads(1)
    for name, cfg in CONFIGS.items():
        if args.only and name not in args.only.split(','):
            continue
        record(name, cfg, args.outdir, args.pickles)

if __name__ == '__main__':
    main()
