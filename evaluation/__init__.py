"""evaluation: measuring generated images (the top library floor; only the scripts sit above it).

- `metrics.py`: `calc_metrics` (FID, KID, sFID, IS, precision/recall of images against reference
  statistics), statistics accumulated over ranks, reference statistics files, printing results.
- `feature_metrics.py`: the formulas on features and probabilities (Frechet distance, KID, IS, P/R).
- `image_sources.py`: the images a metric reads: folders, zips, datasets, batches, samples of a DDN.
- `detectors.py`: the feature networks of those metrics (Inception, DINOv2, CLIP), loaded safely, and
  calling them (features, spatial features, class probabilities).
- `snapshot_metrics.py`: the training loop's per-snapshot evaluator (SnapshotMetrics, named in its
  options, so `training/` never imports it) and the cached reference statistics of the training data.
- `inception.py`: our FID Inception-v3, filled from the official TorchScript files without running them.
"""
