"""sampling: making images with a trained DDN (below `evaluation/`, above `training/`).

- `generation.py`: the generation stream (sample, decode, reconstruct) in batches, and its run files.
- `guidance.py`: zero-shot conditional generation: scorers that rank a layer's K candidates, choosers.
- `prior_sampling.py`: sampling through a prior over the codes (training/prior.py), unguided or guided.
- `guide_spec.py`: guides by name ('inpaint:1,color:0.5'), guide files, the choice rule (`make_chooser`).
- `interactive.py`: the web demo's request logic (strokes and uploads -> guides -> guided samples).
"""
