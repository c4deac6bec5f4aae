"""Exceptions raised by pmod. All derive from ValueError so callers that catch ValueError keep working."""


class PModError(ValueError):
    """Base class for pmod errors."""


class PModConfigError(PModError):
    """A p-MoD setting is invalid (ratios out of range, a schedule that routes no layer, ...)."""


class PModInputError(PModError):
    """A forward call got inputs that p-MoD cannot route correctly."""


class UnsupportedModelError(PModError):
    """The model family or attention backend is not supported by p-MoD."""


class PModTrainingError(PModError):
    """Training went wrong in a way that would give a broken model (a non-finite loss, gradient or weights)."""


class CheckpointError(PModError):
    """A checkpoint cannot be used as it is: a missing or unreadable file, a malformed config.json, or weights that
    do not match the model (missing, unexpected or wrongly shaped tensors)."""
