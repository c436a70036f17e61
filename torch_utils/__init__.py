"""torch_utils: PyTorch infrastructure shared by ddn's scripts (distributed setup, persistence of
networks in pickles, training statistics, checkpoints, samplers and small helpers; `limits`: bounded
reading of received images, JSON and zip members)."""
