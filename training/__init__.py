"""training: the DDN model and its training (below `sampling/`, above `torch_utils/`).

What snapshots pickle (their module names are part of every pickle: keep them):
- `networks.py`: the single-shot generator (DDNGenerator) and the recurrence-iteration one (DDNRecurrent).
- `ddl.py`: the Discrete Distribution Layer: K candidates, selection, chain dropout, leak features.
- `split_prune.py`: Split-and-Prune (paper §3.3) and node balancing, with the node statistics;
  `split_prune_plan.py`: the batching plan that keeps a pass a fixed number of tensor operations.
- `loss.py`: the training loss (DDNLoss). `conditions.py`: conditions of conditional training.
- `image_ops.py`: grayscale, edge map, quantisation (conditions and guidance share them).

The training loop, in parts:
- `training_loop.py`: the loop itself, `training_loop(**c)` as train.py calls it: setup, resume, steps, ticks.
- `training_step.py`: one optimisation step (TrainingStep: accumulation, DDP, Adam, balancing, EMA) and
  the learning-rate and EMA schedules.
- `run_files.py`: the files of a run (snapshots, training states, stats.jsonl, file tags) and reading
  them back for resume and transfer.
- `tick_report.py`: the statistics and the progress line of each tick, and the progress bar.
- `pictures.py`: the sample grid and node-usage plot written with every snapshot.

Data and file formats:
- `dataset.py`: image folders / zips in EDM's format and the built-in digits.
- `images.py`: pixels (uint8 <-> [-1, 1]), grids and PNG files.
- `snapshot.py`: network files (safetensors, restricted pickles), training states, run-folder file names.
  `checked_build.py`: what a network file may build (allowed classes, argument bounds, shapes checked on
  the meta device) and the pickle layouts read without running code.
- `latent.py`: the codes of images as bit strings and latents.npz files.
- `author.py`: the author's released networks, read without running their code.

Priors over the codes (k_1..k_L) and entropy coding:
- `prior.py`: the frequency baseline and the causal-transformer prior (prior files name these classes);
  `prior_rule.py`: drawing codes from a prior (temperature, top-k, top-p); `prior_files.py`: prior files;
  `prior_training.py`: fitting a prior to a network's codes of a dataset, and train.py --prior.
- `entropy_coding.py`: arithmetic coding of latents with a prior over the codes (compress.py).
"""
