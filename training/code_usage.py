"""How a network's codes use its nodes on data: per layer, how many of the K nodes the encoded images
select and the entropy of those selections.

Split-and-Prune's statistics (`NodeStatistics.count`) say how often each node was the nearest during
training, summed over the whole run and redistributed at every split. They are not what the snapshot
(the EMA network) does on data now: a node may be balanced in the statistics yet chosen by no
training image, and sampling picks it 1/K of the time all the same. This file measures the latter:
encode a fixed batch of images with the network (L2-guided selection, no gradients) and count the
codes of every layer.
"""

import math

import torch

# ----------------------------------------------------------------------------
# Usage of codes (N, L) of layers with `ks` (L,) nodes: per layer the number of distinct nodes
# chosen (`used`), the entropy in bits of the empirical node frequencies (`entropy`; log2(K) bits =
# uniform usage) and the frequencies themselves (`freq`, L lists of K floats).

def code_usage(codes, ks):
    codes = torch.as_tensor(codes).long()
    ks = [int(k) for k in ks]
    if codes.ndim != 2 or codes.shape[1] != len(ks):
        raise ValueError(f'codes must have shape (N, {len(ks)}), got {tuple(codes.shape)}')
    used, entropy, freq = [], [], []
    for l, K in enumerate(ks):
        count = torch.bincount(codes[:, l].cpu(), minlength=K).double()
        p = count / count.sum().clamp(min=1)
        used.append(int((count > 0).sum()))
        entropy.append(float(-(p[p > 0] * p[p > 0].log2()).sum()))
        freq.append(p.tolist())
    return dict(used=used, entropy=entropy, ks=ks, freq=freq)

# Per-layer usage on data of `net` (a DDN with `encode`): images (N, C, H, W) in [-1, 1] are encoded
# in batches of `batch` under no_grad, in evaluation mode (the mode is restored). Returns the dict of
# `code_usage` plus the mean squared error of the reconstructions (`recon_mse`, in [-1, 1] units).
@torch.no_grad()
def usage_on_data(net, images, batch=500, condition=None):
    codes, sq = [], 0.0
    for i in range(0, images.shape[0], batch):
        part = images[i : i + batch]
        c, recon = net.encode(part, condition=None if condition is None else condition[i : i + batch])
        codes.append(c.cpu())
        sq += float((recon.float() - part.to(recon.device).float()).square().sum())
    usage = code_usage(torch.cat(codes), net.ks)
    usage['recon_mse'] = sq / max(images.numel(), 1)
    return usage

# A one-line summary of `code_usage`: the least used layer (fewest nodes) and the mean entropy as a
# share of log2(K), e.g. 'used 30/64@0 H 0.91'.
def usage_line(usage):
    used, ks, entropy = usage['used'], usage['ks'], usage['entropy']
    l = min(range(len(used)), key=lambda i: used[i] / ks[i])
    share = sum(h / math.log2(k) for h, k in zip(entropy, ks) if k > 1) / max(sum(k > 1 for k in ks), 1)
    return f'used {used[l]}/{ks[l]}@{l} H {share:.2f}'

# ----------------------------------------------------------------------------
# The fixed batch the training loop measures its snapshots on: the first `num` images of the
# training set (all of them if fewer), as float images in [-1, 1] and float labels, on the CPU.
# Fixed, so that the figures of successive ticks differ only by the network.

USAGE_IMAGES = 512

def usage_batch(dataset_obj, num=USAGE_IMAGES):
    items = [dataset_obj[i] for i in range(min(num, len(dataset_obj)))]
    images = torch.stack([torch.as_tensor(x) for x, _ in items]).float() / 127.5 - 1
    labels = torch.stack([torch.as_tensor(y) for _, y in items]).float()
    return images, labels

# Usage on data of a (snapshot) network on `usage_batch`'s images, with the conditions a
# conditional network needs made from the same images and labels (in evaluation mode).
@torch.no_grad()
def snapshot_usage(net, images, labels=None):
    device = next(net.parameters()).device
    images = images.to(device)
    condition = None
    if getattr(net, 'condition', None):
        with net.evaluating():
            condition = net.make_condition(images, None if labels is None else labels.to(device))
    return usage_on_data(net, images, condition=condition)
