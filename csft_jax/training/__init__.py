"""Training pieces assembled by `csft_jax.train`: loss, optimizer, step, metrics."""
