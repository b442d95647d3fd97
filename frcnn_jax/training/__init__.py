"""Training: the optax train step, optimiser, loop, checkpoints, sharding, metrics (the model owns its losses)."""
