"""pmod: p-MoD (Mixture-of-Depths with TanhNorm, STRing and progressive ratio decay) for transformers models."""

import logging

from .cache import PModCache
from .config import PModConfig
from .errors import CheckpointError, PModConfigError, PModError, PModInputError, PModTrainingError, UnsupportedModelError
from .models import apply_pmod, get_routing, load_model
from .routing import LayerRouting

__version__ = "0.1.0"
__all__ = [
    "CheckpointError",
    "LayerRouting",
    "PModCache",
    "PModConfig",
    "PModConfigError",
    "PModError",
    "PModInputError",
    "PModTrainingError",
    "UnsupportedModelError",
    "apply_pmod",
    "get_routing",
    "load_model",
]

logging.getLogger(__name__).addHandler(logging.NullHandler())
