"""Using what a run trained: ``celeba-dist export`` (safetensors, config.json, a model card) and
:func:`load`, which opens an export, a checkpoint or a run folder as a ready classifier."""
