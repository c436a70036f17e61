"""torch_utils: PyTorch infrastructure shared by ddn's scripts (distributed setup, persistence of
networks in pickles, training statistics, checkpoints, samplers and small helpers).

- `script_archive.py`: the tensors of a TorchScript archive, read without running it.
"""
