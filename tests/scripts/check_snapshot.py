"""Load a network snapshot with plain `pickle` in a fresh interpreter and generate images from it.

Usage: python tests/scripts/check_snapshot.py network-snapshot-NNNNNN.pkl
Prints one JSON line describing the snapshot and the generated images (for tests/test_train.py).
The repository root must be importable (PYTHONPATH), as for any user loading a snapshot.
"""

import json
import pickle
import sys

with open(sys.argv[1], 'rb') as f:
    data = pickle.load(f)

import torch  # Imported after unpickling on purpose: the pickle must not need it first.

ema = data['ema']
with torch.no_grad():
    images = ema(seeds=[0, 1, 2, 3]).images
    again = ema(seeds=[2]).images
print(json.dumps(dict(
    keys=sorted(data),
    class_name=f'{type(ema).__module__}.{type(ema).__qualname__}',
    training=ema.training,
    requires_grad=any(p.requires_grad for p in ema.parameters()),
    shape=list(images.shape),
    finite=bool(torch.isfinite(images).all()),
    std=float(images.std()),
    per_seed_max_diff=float((images[2:3] - again).abs().max()),
    num_layers=ema.num_layers,
    network_kwargs=data['network_kwargs'],
)))
