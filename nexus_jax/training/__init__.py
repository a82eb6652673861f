"""Training: optimiser, train state, Orbax checkpoints, AR and decoder loops, metrics, CLI."""
