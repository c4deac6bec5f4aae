"""Exceptions raised by pmod. All derive from ValueError so callers that catch ValueError keep working."""


class PModError(ValueError):
    """Base class for pmod errors."""


class PModConfigError(PModError):
    """A p-MoD setting is invalid (ratios out of range, a schedule that routes no layer, ...)."""


class PModInputError(PModError):
    """A forward call got inputs that p-MoD cannot route correctly."""


class UnsupportedModelError(PModError):
    """The model family or attention backend is not supported by p-MoD."""
