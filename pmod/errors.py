"""Exceptions raised by pmod (all derive from ValueError, so callers that catch ValueError keep working), and the
helpers that keep their messages to one readable line."""

from __future__ import annotations

from collections.abc import Iterable


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


def one_line(exc: BaseException, limit: int | None = None) -> str:
    """An exception's message on one line (some libraries' messages span several), cut after ``limit`` characters."""
    text = " ".join(str(exc).split())
    return text if limit is None or len(text) <= limit else text[:limit] + " ..."


def describe_names(names: Iterable[str], limit: int = 5) -> str:
    """The first ``limit`` names and how many more: error messages stay one readable line."""
    names = sorted(names)
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "") + f" ({len(names)} in all)"


class ConversionError(CheckpointError):
    """A checkpoint could not be converted (missing files, mismatched weights, existing output)."""
