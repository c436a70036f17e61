"""torch_utils: PyTorch infrastructure shared by ddn's scripts and packages (below `training/`).

- `distributed.py`: process groups, device choice, collectives (all-reduce, gather, host flags).
- `checkpoint.py`: atomic writes, JSON files and lines, loading checkpoints, the newest file of a run.
- `persistence.py`: EDM's persistent classes (a pickle records each network's constructor call).
- `safe_pickle.py`: a restricted unpickler that resolves only allowlisted globals.
- `training_stats.py`: statistics reported anywhere, synced across ranks once per tick.
- `misc.py`: samplers, per-step seeding, parameter copies, consistency checks, module summaries.
- `limits.py`: bounded reading of received images, JSON and zip members (pixel, size and depth caps).
- `script_archive.py`: the tensors of a TorchScript archive, read without running it.
"""
