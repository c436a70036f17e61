"""Run in a checkout of commit 4aa7b5a (PYTHONPATH=.): writes a tiny DDN snapshot and its samples for seeds 0-7 to argv[1]."""
import os, sys
import numpy as np
import torch
from training.dataset import DigitsDataset
from training.networks import DDNGenerator
from training.split_prune import split_and_prune
from training.snapshot import save_network_safe
from training.generation import generate_batches
from training.loss import DDNLoss
from torch_utils import checkpoint

out = sys.argv[1]
torch.manual_seed(0)
net = DDNGenerator(8, 1, max_outputk=4, max_blockn=1, max_channels=8)
images = np.stack([DigitsDataset(resolution=8)[i][0] for i in range(16)])
x = torch.from_numpy(images).float() / 127.5 - 1
opt = torch.optim.Adam(net.parameters(), lr=2e-3)
net.train()
for _ in range(2):
    loss = net(target=x).losses.mean()
    opt.zero_grad(); loss.backward(); opt.step()
    split_and_prune(net, opt)
net.eval().requires_grad_(False)
# As the training loop of 4aa7b5a writes a snapshot (Run.write_snapshot).
opts = dict(note='tests/data/old_snapshot: tiny network written by the code of commit 4aa7b5a')
network_kwargs = dict(class_name='training.networks.DDNGenerator', max_outputk=4, max_blockn=1, max_channels=8)
data = dict(ema=net.cpu(), loss_fn=DDNLoss(), dataset_kwargs=dict(class_name='training.dataset.DigitsDataset', resolution=8),
            network_kwargs=network_kwargs, training_options=opts)
checkpoint.save_atomic(data, os.path.join(out, 'network-snapshot-000000.pkl'), mode='pickle')
save_network_safe(data['ema'], os.path.join(out, 'network-snapshot-000000.safetensors'), extra_metadata=dict(training_options=opts))
imgs = torch.cat([b.images for b in generate_batches(net, list(range(8)), batch=8)]).cpu().numpy()
codes = torch.cat([b.codes for b in generate_batches(net, list(range(8)), batch=8)]).cpu().numpy()
np.save(os.path.join(out, 'images-seeds0-7.npy'), imgs)
print(imgs.shape, imgs.dtype, codes[:2])
