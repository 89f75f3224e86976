"""vitok_core: the pure-PyTorch ViTok-v2 library (configs, NaFlex, models, losses, checkpoints).

Imports no Ray or Prefect; the distributed stages in `jobs/` build on it.
"""

__version__ = "0.1.0"
