"""sampling: making images with a trained DDN (below `evaluation/`, above `training/`).

- `generation.py`: the generation stream (sample, decode, reconstruct) in batches, and its run files
  (which files an earlier run recorded, so that --force removes only those).
- `guidance.py`: zero-shot conditional generation: the scorer and chooser contracts, the pixel-space
  scorers (l2, superres, inpaint, color, lowbit, edge), CombinedScorer and final_distance.
- `network_scorers.py`: scorers that run a network on the candidates (classifier, CLIP, style).
- `choosers.py`: the choice rules among scored candidates (temperature, top-k).
- `prior_sampling.py`: sampling through a prior over the codes (training/prior.py), unguided or guided.
- `guide_spec.py`: guides by name ('inpaint:1,color:0.5'), guide files, the choice rule (`make_chooser`).
- `interactive.py`: the web demo's request logic (strokes and uploads -> guides -> guided samples), and
  the bounded loading of a network named in the page.
"""
