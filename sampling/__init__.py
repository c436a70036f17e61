"""sampling: making images with a trained DDN (below `evaluation/`, above `training/`).

- `generation.py`: the generation stream (sample, decode, reconstruct) in batches, and its run files
  (which files an earlier run recorded, so that --force removes only those).
- `guidance.py`: zero-shot conditional generation: scorers that rank a layer's K candidates, choosers.
- `guide_spec.py`: guides by name ('inpaint:1,color:0.5'), guide files, the choice rule (`make_chooser`).
- `interactive.py`: the web demo's request logic (strokes and uploads -> guides -> guided samples), and
  the bounded loading of a network named in the page.
"""
