"""metarun: a command-line experiment runner for meta-learning in PyTorch."""

__version__ = "0.1.0"
