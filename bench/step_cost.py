"""Benchmark: the device-independent cost of one training step, measured on any machine (a CPU will do).

For the reference CIFAR-10 net (32x32 RGB, max-blockn 32, max-outputk 64: 63 layers, 76.29 M
parameters) and the README's digits net (16x16 grey, max-channels 32, max-blockn 3), this runs the
training loop's own `TrainingStep` forward and backward on fake tensors (FakeTensorMode: every
tensor has its true shape, dtype and storage, nothing is computed, so batch 256 costs seconds) and
counts what does not depend on the device:
- FLOPs per image, forward and backward (torch.utils.flop_counter.FlopCounterMode);
- bytes autograd saves for backward per image (saved_tensors_hooks, unique storages, parameters
  excluded), by dtype: the memory that grows with the batch;
- operators per step: aten operators below autograd that are not views (each launches at least
  one kernel on a GPU), forward (the graph), forward without grad (the DDLs' selection and
  statistics, and the forward of custom autograd Functions, which runs without grad: the chosen
  head's bmm, GroupNorm + SiLU), backward, and the update (gradient clean-up, Adam (foreach, as on
  CUDA), Split-and-Prune; run on real tensors with zero gradients, as it does not depend on the batch);
- bytes read + written by the non-GEMM operators per image (every tensor argument and result of
  every operator other than convolutions and matrix products: casts, GroupNorm, SiLU, adds, ...);
- the modelled peak of live tensor bytes over forward + backward at the batch, with Adam's two
  moments (torch.distributed._tools.mem_tracker.MemTracker), with --peak=True.

Precision bf16 / fp16 is torch.autocast as TrainingStep runs it. CPU autocast keeps `group_norm` in
the input dtype where CUDA autocast runs it in fp32 (it is on CUDA's fp32 list); the only op of this
network whose autocast policy differs between the two devices. So here F.group_norm called under
autocast does what the CUDA wrapper does (fp32 copies of its inputs, autocast off): the saved
tensors, casts and bytes counted are CUDA's. A GroupNorm that turns autocast off itself (as
training.networks.GroupNorm does) is not affected.

With the author's code (--author-repo, or $DDN_AUTHOR_DIR/ddn; its packages sddn and boxx
importable, e.g. through PYTHONPATH), the author's net (`DDNPrecond`/`PHDDN`, built as
bench/author_speed.py builds it) is measured the same way in a process of its own (its packages are
named like ours), in fp16 (its default) beside our bf16, fp32 beside our fp32. Its selection copies
the distances to the host, which fake tensors cannot: here it picks random codes instead (the same
shapes, operators and memory).

    python bench/step_cost.py                                   # both nets, bf16, batch 256
    python bench/step_cost.py --net=digits --precision=fp32 --peak=False
    PYTHONPATH=author/pkgs python bench/step_cost.py --author-repo=author/ddn --json=cost.json

Prints a table; `--json=FILE` writes every figure. Nothing here is a GPU time.
"""

import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter

import click
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

# The nets, as bench/train_step.py and the README's digits recipe build them.
NETS = {
    'ref':    dict(img_resolution=32, img_channels=3, max_blockn=32, max_outputk=64),
    'digits': dict(img_resolution=16, img_channels=1, max_channels=32, max_blockn=3, max_outputk=64, chain_dropout=0.0),
}
AUTOCAST_DTYPES = {'fp32': None, 'bf16': torch.bfloat16, 'fp16': torch.float16}

# Operators that only make views or metadata (no kernel on a GPU).
VIEW_OPS = {'view', '_unsafe_view', 'reshape', 'expand', 'permute', 'transpose', 't', 'slice', 'select', 'unsqueeze',
            'squeeze', 'as_strided', 'alias', 'detach', 'split', 'split_with_sizes', 'unbind', 'view_as', 'flatten',
            'unflatten', 'chunk', 'lift_fresh', 'empty', 'empty_like', 'empty_strided', 'narrow', '_reshape_alias',
            'diagonal', 'expand_as', 'resolve_conj', 'resolve_neg', '_record_function_enter_new',
            '_record_function_exit', 'set_', '_local_scalar_dense', 'is_same_size', 'sym_size', 'sym_stride'}
# Matrix products (GEMMs); everything else that is not a view counts as a non-GEMM operator.
GEMM_OPS = {'convolution', 'convolution_backward', 'mm', 'bmm', 'addmm', 'baddbmm', 'addbmm', 'matmul',
            'mkldnn_convolution', '_convolution', 'cudnn_convolution'}

# ----------------------------------------------------------------------------
# CUDA autocast's policy for group_norm on CPU tensors (see the module docstring).

@contextlib.contextmanager
def cuda_autocast_policy():
    orig = F.group_norm
    def group_norm(input, num_groups, weight=None, bias=None, eps=1e-5):
        if torch.is_autocast_enabled('cpu'):
            def cast(t):
                return t.float() if t is not None and t.is_floating_point() and t.dtype != torch.float64 else t
            with torch.autocast('cpu', enabled=False):
                return orig(cast(input), num_groups, cast(weight), cast(bias), eps)
        return orig(input, num_groups, weight, bias, eps)
    F.group_norm = group_norm
    try:
        yield
    finally:
        F.group_norm = orig

# ----------------------------------------------------------------------------
# Counting modes.

def _nbytes(x):
    return x.numel() * x.element_size() if isinstance(x, torch.Tensor) else 0

class OpCount(TorchDispatchMode):
    """Operators below autograd (not views), by phase; bytes of the non-GEMM ones; dtype casts."""
    def __init__(self):
        super().__init__()
        self.phase = 'fwd'
        self.ops = Counter()            # phase -> operators
        self.by_name = Counter()        # (phase, name) -> operators
        self.non_gemm_bytes = Counter() # phase -> bytes of tensor arguments + results
        self.cast_bytes = Counter()     # phase -> bytes of dtype casts
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = func.overloadpacket.__name__ if hasattr(func, 'overloadpacket') else str(func)
        if name in VIEW_OPS or getattr(func, 'namespace', 'aten') != 'aten':     # e.g. prim::device
            return out
        phase = self.phase + ('-nograd' if self.phase == 'fwd' and not torch.is_grad_enabled() else '')
        self.ops[phase] += 1
        self.by_name[(phase, name)] += 1
        if name not in GEMM_OPS:
            leaves = torch.utils._pytree.tree_leaves((args, kwargs, out))
            self.non_gemm_bytes[phase] += sum(_nbytes(x) for x in leaves)
        if name in ('_to_copy', 'copy_'):
            src, dst = (args[1], args[0]) if name == 'copy_' else (args[0], out)
            if isinstance(src, torch.Tensor) and isinstance(dst, torch.Tensor) and src.dtype != dst.dtype:
                self.cast_bytes[phase] += _nbytes(src) + _nbytes(dst)
        return out

class SavedBytes:
    """Storages autograd saves for backward (unique, parameters and buffers excluded), by dtype."""
    def __init__(self, exclude):
        self.exclude = exclude
        self.seen = {}
        self.keep = []
    def pack(self, t):
        st = t.untyped_storage()
        key = st._cdata
        if key not in self.seen and key not in self.exclude:
            self.seen[key] = (st.nbytes(), str(t.dtype).removeprefix('torch.'))
            self.keep.append(t)
        return t
    def hooks(self):
        return torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t)
    def by_dtype(self):
        out = Counter()
        for nbytes, dtype in self.seen.values():
            out[dtype] += nbytes
        return dict(out)

# ----------------------------------------------------------------------------
# The steps. Each builder returns dict(net, fwd(), bwd(loss), opt, info) for fake tensors, and
# update_ops() counts the update on real tensors.

def build_ours(net_name, precision, batch):
    sys.path.insert(0, ROOT)
    from training.loss import DDNLoss
    from training.networks import DDNGenerator
    from training.training_step import ADAM_IMPLEMENTATIONS, TrainingStep
    kwargs = NETS[net_name]
    torch.manual_seed(0)
    net = DDNGenerator(**kwargs).train()
    opt = torch.optim.Adam(net.parameters(), lr=1e-3, betas=(0.9, 0.999), eps=1e-8, **ADAM_IMPLEMENTATIONS['foreach'])
    step = TrainingStep(net, net, DDNLoss(), opt, batch_size=batch, precision=precision)
    C, R = kwargs['img_channels'], kwargs['img_resolution']
    images = torch.rand(batch, C, R, R) * 2 - 1
    def fwd():     # TrainingStep.accumulate(), in its forward and backward halves.
        return step.round_forward(images, None)
    def bwd(loss):
        step.round_backward(loss)
    def update():
        step.update(lr=1e-3, ema_beta=0)
    info = dict(layers=net.num_layers, params=sum(p.numel() for p in net.parameters()))
    return dict(net=net, fwd=fwd, bwd=bwd, update=update, opt=opt, info=info)

def build_author(author_repo, precision, batch, fake):
    import random  # noqa: F401  (the author's code expects it importable)
    import numpy as np
    author_repo = os.path.abspath(author_repo)
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or '.') not in (HERE, ROOT)]
    sys.path.insert(0, author_repo)
    torch.Tensor.cuda = lambda self, *args, **kwargs: self     # Its code hard-codes .cuda().
    import boxx
    import sddn
    fp16 = precision == 'fp16'
    boxx.cf.kwargs = dict(max_blockn=32, max_outputk=64, fp16=fp16, learn_res=True, chain_dropout=0.05, start_size=1,
                          blockn_times=1, refinern=0, condition=None, diverge_shaping=0, dropout=0.0)
    boxx.cf.debug = False
    sddn.DiscreteDistributionOutput.learn_residual = True
    sddn.DiscreteDistributionOutput.chain_dropout = 0.05
    if fake:
        # No host copy of fake distances: random codes instead; chain dropout (host codes) off;
        # its pickle check of every module (fake tensors do not pickle) skipped.
        sddn.SplitableDiscreteDistribution.add_loss_matrix = \
            lambda self, lm: dict(i_nears=np.random.randint(0, self.k, lm.shape[0]))
        sddn.DiscreteDistributionOutput.chain_dropout = 0
        from torch_utils import persistence
        persistence._check_pickleable = lambda obj: None
    from training import loss as author_loss
    from training import networks as author_networks
    sddn.DiscreteDistributionOutput.inits.clear()     # Its registry of layers: only this net's.
    torch.manual_seed(0)
    net = author_networks.DDNPrecond(img_resolution=32, img_channels=3, label_dim=0, use_fp16=fp16,
                                     model_type='PHDDN', dropout=0.0)
    net.train().requires_grad_(True)
    loss_fn = author_loss.DDNLoss()
    opt = torch.optim.Adam(net.parameters(), lr=1e-3, betas=(0.9, 0.999), eps=1e-8, foreach=True)
    images = torch.rand(batch, 3, 32, 32) * 2 - 1
    def fwd():
        return loss_fn(net=net, images=images, labels=None)
    def bwd(loss):
        loss.sum().mul(1 / batch).backward()
    def update():   # As its training loop (bench/author_speed.py).
        for param in net.parameters():
            if param.grad is not None:
                torch.nan_to_num(param.grad, nan=0, posinf=1e5, neginf=-1e5, out=param.grad)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sddn.DiscreteDistributionOutput.try_split_all(opt)
    info = dict(layers=len(sddn.DiscreteDistributionOutput.inits), params=sum(p.numel() for p in net.parameters()))
    return dict(net=net, fwd=fwd, bwd=bwd, update=update, opt=opt, info=info)

# ----------------------------------------------------------------------------

def measure_fake(build, batch, precision, peak):
    """FLOPs, operators, non-GEMM bytes, saved bytes and (optionally) the peak, on fake tensors."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils.flop_counter import FlopCounterMode
    res = {}
    policy = cuda_autocast_policy() if precision != 'fp32' else contextlib.nullcontext()
    with FakeTensorMode(), policy:
        S = build()
        res['info'] = S['info']
        loss = S['fwd']()           # One step first: lazy state (statistics buffers) is made once.
        S['bwd'](loss)
        del loss
        S['opt'].zero_grad(set_to_none=True)
        # Pass A: FLOPs and operators.
        fc_fwd, fc_bwd, oc = FlopCounterMode(display=False), FlopCounterMode(display=False), OpCount()
        with fc_fwd, oc:
            loss = S['fwd']()
        oc.phase = 'bwd'
        with fc_bwd, oc:
            S['bwd'](loss)
        del loss
        S['opt'].zero_grad(set_to_none=True)
        res['gflop_per_img'] = dict(fwd=fc_fwd.get_total_flops() / batch / 1e9, bwd=fc_bwd.get_total_flops() / batch / 1e9)
        res['ops'] = dict(oc.ops)
        res['ops_by_name'] = {f'{ph}:{n}': v for (ph, n), v in sorted(oc.by_name.items())}
        res['non_gemm_mib_per_img'] = {ph: v / batch / 2**20 for ph, v in oc.non_gemm_bytes.items()}
        res['cast_mib_per_img'] = {ph: v / batch / 2**20 for ph, v in oc.cast_bytes.items()}
        # Pass B: saved tensors.
        net = S['net']
        exclude = {t.untyped_storage()._cdata for t in list(net.parameters()) + list(net.buffers())}
        sv = SavedBytes(exclude)
        with sv.hooks():
            loss = S['fwd']()
        S['bwd'](loss)
        del loss
        S['opt'].zero_grad(set_to_none=True)
        res['saved_mib_per_img'] = {k: v / batch / 2**20 for k, v in sv.by_dtype().items()}
        del sv
        # Pass D: the peak of live bytes over forward + backward, Adam's moments allocated.
        if peak:
            from torch.distributed._tools.mem_tracker import MemTracker
            moments = [torch.zeros_like(p) for p in net.parameters() for _ in range(2)]
            mt = MemTracker()
            mt.track_external(net, *moments)
            with mt:
                loss = S['fwd']()
                S['bwd'](loss)
                del loss
            snap = mt.get_tracker_snapshot('peak')
            res['peak_gib'] = max(d['Total'] for d in snap.values()) / 2**30
            S['opt'].zero_grad(set_to_none=True)
    return res

def measure_update(build):
    """Operators of the update on real tensors (zero gradients; the second update, Adam's state made)."""
    S = build()
    oc = OpCount()
    oc.phase = 'update'
    for i in range(2):
        for p in S['net'].parameters():
            if p.requires_grad:
                p.grad = torch.zeros_like(p)
        if i == 0:
            S['update']()
        else:
            with oc:
                S['update']()
    return dict(oc.ops).get('update', 0), {n: v for (_, n), v in sorted(oc.by_name.items())}

def measure(impl, net_name, precision, batch, peak, author_repo=None):
    t0 = time.time()
    torch.set_num_threads(1)
    if impl == 'ours':
        def build(b=batch):
            return build_ours(net_name, precision, b)
    else:
        def build(b=batch, fake=True):
            return build_author(author_repo, precision, b, fake)
    res = measure_fake(build, batch, precision, peak)
    if impl == 'ours':
        res['ops']['update'], res['update_ops_by_name'] = measure_update(lambda: build_ours(net_name, precision, 2))
    else:
        os.environ.setdefault('MASTER_ADDR', '127.0.0.1')
        os.environ.setdefault('MASTER_PORT', str(29500 + os.getpid() % 1000))
        torch.distributed.init_process_group('gloo', rank=0, world_size=1)    # Its Split-and-Prune broadcasts.
        res['ops']['update'], res['update_ops_by_name'] = measure_update(lambda: build_author(author_repo, precision, 2, False))
    res['ops']['total'] = sum(v for k, v in res['ops'].items() if k != 'total')
    res.update(impl=impl, net=net_name, precision=precision, batch=batch, seconds=time.time() - t0)
    return res

# ----------------------------------------------------------------------------

# Measure one implementation and net in a process of its own (fake-tensor modes and the author's
# packages do not mix with another measurement's). Returns its result, or None with the reason printed.
def in_subprocess(impl, net_name, precision, batch, peak, author_repo=None):
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, 'result.json')
        cmd = [sys.executable, os.path.abspath(__file__), f'--impl={impl}', f'--net={net_name}', f'--precision={precision}',
               f'--batch={batch}', f'--peak={peak}', f'--json={path}'] + ([f'--author-repo={author_repo}'] if author_repo else [])
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0 or not os.path.isfile(path):
            print(f'{impl} {net_name} {precision} could not be measured (exit {proc.returncode}):\n{proc.stderr[-3000:]}',
                  file=sys.stderr)
            return None
        with open(path) as f:
            return json.load(f)['results'][0]

def print_table(results):
    cols = [('impl', lambda r: r['impl']), ('net', lambda r: r['net']), ('prec', lambda r: r['precision']),
            ('batch', lambda r: str(r['batch'])),
            ('GFLOP/img fwd+bwd', lambda r: f'{r["gflop_per_img"]["fwd"]:.3f}+{r["gflop_per_img"]["bwd"]:.3f}'),
            ('saved MiB/img', lambda r: f'{sum(r["saved_mib_per_img"].values()):.2f}'),
            ('by dtype', lambda r: ' '.join(f'{k}:{v:.1f}' for k, v in sorted(r['saved_mib_per_img'].items()))),
            ('ops fwd/nograd/bwd/upd', lambda r: '/'.join(str(r['ops'].get(k, 0)) for k in ('fwd', 'fwd-nograd', 'bwd', 'update'))),
            ('ops/step', lambda r: str(r['ops']['total'])),
            ('non-GEMM MiB/img', lambda r: f'{sum(r["non_gemm_mib_per_img"].values()):.1f}'),
            ('casts MiB/img', lambda r: f'{sum(r["cast_mib_per_img"].values()):.1f}'),
            ('peak GiB', lambda r: f'{r["peak_gib"]:.2f}' if 'peak_gib' in r else '-')]
    rows = [[name for name, _ in cols]] + [[fn(r) for _, fn in cols] for r in results]
    widths = [max(len(row[i]) for row in rows) for i in range(len(cols))]
    for row in rows:
        print('  '.join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)))

@click.command(context_settings=dict(show_default=True))
@click.option('--net', 'nets', help='Nets to measure', type=click.Choice(['ref', 'digits', 'all']), default='all')
@click.option('--precision', help='Our training precision (the author: fp16 beside bf16/fp16, fp32 beside fp32)', type=click.Choice(['fp32', 'bf16', 'fp16']), default='bf16')
@click.option('--batch',     help='Images per step (fake tensors: any size costs the same)', metavar='INT', type=click.IntRange(min=1), default=256)
@click.option('--peak',      help='Also model the peak memory (MemTracker)', metavar='BOOL', type=bool, default=True)
@click.option('--author-repo', help='Checkout of the author\'s repository  [default: $DDN_AUTHOR_DIR/ddn if set]', metavar='DIR', type=str)
@click.option('--impl',      help='Measure one implementation in this process (internal)', type=click.Choice(['ours', 'author']), hidden=True)
@click.option('--json', 'json_path', help='Write every figure to this JSON file', metavar='FILE', type=str)
def main(nets, precision, batch, peak, author_repo, impl, json_path):
    """FLOPs, saved bytes, operators and non-GEMM bytes per training step, ours vs the author's."""
    if author_repo is None and os.environ.get('DDN_AUTHOR_DIR'):
        author_repo = os.path.join(os.environ['DDN_AUTHOR_DIR'], 'ddn')
    if author_repo is not None and not os.path.isfile(os.path.join(author_repo, 'training', 'networks.py')):
        raise click.BadParameter(f'{author_repo} does not hold the author\'s repository (no training/networks.py)',
                                 param_hint='--author-repo')
    if impl is not None and nets == 'all':
        raise click.BadParameter('--impl measures one net: give --net=ref or --net=digits', param_hint='--net')
    if impl is not None:    # One measurement, in this (sub)process.
        results = [measure(impl, nets, precision, batch, peak, author_repo)]
    else:
        results = []
        for net_name in (['ref', 'digits'] if nets == 'all' else [nets]):
            res = in_subprocess('ours', net_name, precision, batch, peak)
            if res is not None:
                results.append(res)
                print(f'ours {net_name} {precision}: {res["seconds"]:.0f} s', file=sys.stderr, flush=True)
        if nets in ('ref', 'all'):
            if author_repo is None:
                print('the author\'s code is not measured: no --author-repo (or $DDN_AUTHOR_DIR); ours alone',
                      file=sys.stderr)
            else:
                res = in_subprocess('author', 'ref', 'fp32' if precision == 'fp32' else 'fp16', batch, peak, author_repo)
                if res is not None:
                    results.append(res)
        print_table(results)
        ref = {r['impl']: r for r in results if r['net'] == 'ref'}
        if len(ref) == 2:
            ratio = sum(ref['ours']['saved_mib_per_img'].values()) / sum(ref['author']['saved_mib_per_img'].values())
            print(f'saved_bytes_ratio_vs_author={ratio:.3f}  (ours {precision} / the author\'s {ref["author"]["precision"]})')
    if json_path:
        sys.path.insert(0, ROOT)
        payload = dict(torch=torch.__version__, results=results)
        if impl == 'author':
            with open(json_path, 'w') as f:     # The author's process cannot import ours (same package names).
                json.dump(payload, f, indent=1)
        else:
            from torch_utils.checkpoint import write_json
            write_json(json_path, payload)

# ----------------------------------------------------------------------------

if __name__ == '__main__':
    main()

# ----------------------------------------------------------------------------
