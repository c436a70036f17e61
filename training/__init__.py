"""training: the DDN model, its loss, the dataset readers and the training loop."""
