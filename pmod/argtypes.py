"""argparse value types shared by the `pmod` commands: a bad flag is refused by argparse itself, with the flag
named and exit code 2, before anything is loaded."""

from __future__ import annotations

import argparse
import math


def positive_int(value: str) -> int:
    number = _parse(int, value, "an integer")
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return number


MAX_LAYERS = 4096  # far above any decoder's depth; a typo of 10^8 layers would print for minutes


def layer_count(value: str) -> int:
    number = positive_int(value)
    if number > MAX_LAYERS:
        raise argparse.ArgumentTypeError(f"must be at most {MAX_LAYERS} decoder layers, got {value}")
    return number


def nonnegative_int(value: str) -> int:
    number = _parse(int, value, "an integer")
    if number < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return number


def nonnegative_float(value: str) -> float:
    number = _parse(float, value, "a number")
    if not math.isfinite(number) or number < 0:
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {value}")
    return number


def positive_float(value: str) -> float:
    number = nonnegative_float(value)
    if number == 0:
        raise argparse.ArgumentTypeError(f"must be a number > 0, got {value}")
    return number


def port(value: str) -> int:
    number = _parse(int, value, "an integer")
    if not 0 < number < 65536:
        raise argparse.ArgumentTypeError(f"must be a TCP port, 1 to 65535, got {value}")
    return number


MAX_TEMPERATURE = 100.0  # beyond this sampling is uniform noise, and past ~1e300 the probabilities stop being numbers


def temperature(value: str) -> float:
    """A sampling temperature: 0 (greedy) up to `MAX_TEMPERATURE`."""
    number = nonnegative_float(value)
    if number > MAX_TEMPERATURE:
        raise argparse.ArgumentTypeError(f"must be at most {MAX_TEMPERATURE:g} (0 = greedy), got {value}")
    return number


def ratio(value: str) -> float:
    """A keep ratio, in (0, 1]."""
    number = _parse(float, value, "a number")
    if not 0 < number <= 1:  # NaN fails this too
        raise argparse.ArgumentTypeError(f"must be a keep ratio in (0, 1], got {value}")
    return number


def integer(value: str) -> int:
    return _parse(int, value, "an integer")


def optional_int(value: str) -> int | None:
    """An integer, or ``none``."""
    return None if value.strip().lower() == "none" else integer(value)


def finite_float(value: str) -> float:
    number = _parse(float, value, "a number")
    if not math.isfinite(number):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {value}")
    return number


def int_list(value: str) -> list[int]:
    """Comma-separated integers (``1,3,5``)."""
    return [integer(part) for part in value.split(",") if part.strip()]


def schedule_value(value: str) -> str | list[float]:
    """A schedule: its name, or one keep ratio per layer, comma-separated (``1,1,0.5,0.25``)."""
    from .schedules import NAMES

    if value in NAMES:
        return value
    if "," not in value and not value.replace(".", "", 1).isdigit():
        raise argparse.ArgumentTypeError(f"invalid choice: {value!r} (choose from {', '.join(NAMES)}, or give "
                                         "one keep ratio per layer, comma-separated)")
    return [ratio(part) for part in value.split(",") if part.strip()]


def _parse(kind: type, value: str, what: str):
    try:
        return kind(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be {what}, got {value!r}") from None
