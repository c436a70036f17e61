"""evaluation: measuring generated images (the top library floor; only the scripts sit above it).

- `metrics.py`: FID, KID, sFID, IS, precision/recall; image sources, reference statistics, and the
  training loop's per-snapshot evaluator (named in its options, so `training/` never imports it).
- `detectors.py`: the feature networks of those metrics (Inception, DINOv2, CLIP), loaded safely.
- `inception.py`: our FID Inception-v3, filled from the official TorchScript files without running them.
"""
