"""Offline training: turn interaction logs into the model artifact served from ``code/``.

Data sources live in :mod:`training.datasets`, the temporal split in :mod:`training.split` and
the id <-> index mapping in :mod:`training.indexing`. This is the only package that imports torch.
"""
