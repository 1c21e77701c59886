"""dtrain: plain data-parallel training on PyTorch DDP, launched any way you launch."""

__version__ = "0.1.0"
