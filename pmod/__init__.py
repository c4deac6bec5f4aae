"""pmod: p-MoD (Mixture-of-Depths with TanhNorm, STRing and progressive ratio decay) for transformers models.

``import pmod`` registers the p-MoD model types with transformers' Auto classes, so that saved p-MoD folders load
with ``AutoModelForImageTextToText.from_pretrained`` too. The `pmod` command skips that (it would import torch and
transformers before ``pmod --help`` could answer); its commands import what they need when they run.
"""

import importlib
import logging
import os
import sys
from typing import Any

from .config import PModConfig
from .errors import (
    CheckpointError,
    PModConfigError,
    PModError,
    PModInputError,
    PModTrainingError,
    UnsupportedModelError,
)

__version__ = "0.1.0"
_LAZY = {
    "PModCache": "cache",
    "PModStaticCache": "cache",
    "LayerRouting": "routing",
    "apply_pmod": "models",
    "get_routing": "models",
    "load_model": "loading",
}
__all__ = [
    "CheckpointError",
    "LayerRouting",
    "PModCache",
    "PModConfig",
    "PModConfigError",
    "PModError",
    "PModInputError",
    "PModStaticCache",
    "PModTrainingError",
    "UnsupportedModelError",
    "apply_pmod",
    "get_routing",
    "load_model",
]

logging.getLogger(__name__).addHandler(logging.NullHandler())


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _is_the_pmod_command() -> bool:
    # `pmod ...`, or `python -m pmod ...` (while the package is imported for -m, argv[0] is "-m")
    return bool(sys.argv) and (os.path.basename(sys.argv[0]) in ("pmod", "pmod.exe") or sys.argv[0] == "-m")


if _is_the_pmod_command():
    # OpenMP threads that spin while waiting at a barrier degrade badly when the machine is busy: a tiny training step
    # on 2 threads took 46 ms with another torch process running against 22 ms waiting passively (13 / 27 ms idle;
    # benchmarks/results/threads_cpu.md). Passive waiting bounds the loss; set before torch is imported, and only for
    # the command: a library import leaves the process's settings alone
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
else:
    from . import families  # noqa: F401  (registers the p-MoD model types with transformers)
    from .cache import PModCache, PModStaticCache
    from .loading import load_model
    from .models import apply_pmod, get_routing
    from .routing import LayerRouting
