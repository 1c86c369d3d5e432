"""Training: ``main(config)`` and the engine, checkpoints, metrics, losses, optimizers, TensorBoard,
processes, signals and the run lock. Submodules are imported explicitly: this package imports nothing.
"""
