"""The training engine (accelerate + DeepSpeed), data collation, checkpoints, launch."""
