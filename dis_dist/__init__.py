"""dis_dist: distributed training of DiS, diffusion models with a bidirectional Mamba backbone."""

__version__ = "0.1.0"
