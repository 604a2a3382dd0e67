"""From a typed run config to a Composer Trainer: the model wrapper, parallelism, optimizers,
clipping and the trainer builder."""
