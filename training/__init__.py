"""training: the DDN model, its loss, the dataset readers and the training loop.

- `entropy_coding.py`: arithmetic coding of latents with a prior over the codes (compress.py).
"""
