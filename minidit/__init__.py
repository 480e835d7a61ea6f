"""minidit: the Diffusion Transformer (DiT) from scratch in NumPy/CuPy, every backward pass by hand."""
from .model import DiT, DiTConfig, VARIANTS, forward_macs, get_config, param_shapes

__all__ = ["DiT", "DiTConfig", "VARIANTS", "forward_macs", "get_config", "param_shapes"]
__version__ = "0.1.0"
