"""Training: target assignment (matcher, sampler, targets), optimiser, train step, checkpoints."""
