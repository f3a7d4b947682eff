"""Replication suite for five papers on concept-based interpretability of CNNs.

Layers, each importing only from the ones before it:
data -> models -> training -> analysis -> methods -> reporting.
Importing the package first makes torchvision usable on a CPU-only torch (see `_torchvision_compat`).
"""
from replication import _torchvision_compat  # noqa: F401  (must run before any torchvision import)

__version__ = "0.1.0"
