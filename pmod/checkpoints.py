"""What a checkpoint folder holds, read without trusting it: its weight files and shards (a shard index is checked
before it is followed), and each tensor's dtype, from safetensors headers or a torch zip file's listing (never
unpickled). Used by loading (`pmod.loading`) and conversion (`pmod.integrations.convert`).
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path
from typing import Any

from .errors import CheckpointError, ConversionError, describe_names, one_line

DEFAULT_ADVICE = "download or save it again"  # what a message about a damaged file ends with, unless told otherwise
_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


def check_weight_files(src: Path, error: type[CheckpointError] = ConversionError) -> list[str]:
    """Names of the weight files of a checkpoint directory, each checked to be readable (the header of a
    .safetensors file, the container of a .bin file); raises ``error`` naming the file and the problem."""
    return list(inspect_weight_files(src, error))


def inspect_weight_files(src: Path, error: type[CheckpointError] = ConversionError,
                         advice: str = DEFAULT_ADVICE) -> dict[str, dict[str, str]]:
    """Weight file name -> {tensor name: safetensors dtype} (empty for .bin files, whose dtypes need a full read).

    Checks the shard index (a JSON object whose ``weight_map`` maps tensor names to file names in ``src``), that
    every listed shard exists, that each .safetensors header is complete (a truncated file is caught here) and
    names no tensor twice, and that each .bin file is a PyTorch checkpoint.
    """
    src = Path(src)
    names = _weight_file_names(src, error)
    files: dict[str, dict[str, str]] = {}
    seen: dict[str, str] = {}
    for name in names:
        path = src / name
        dtypes = check_weight_file(path, error, advice)
        twice = sorted(k for k in dtypes if k in seen)
        if twice:
            raise error(f"{path}: tensors also stored in {seen[twice[0]]}: {describe_names(twice)}.")
        seen.update(dict.fromkeys(dtypes, name))
        files[name] = dtypes
    return files


def check_weight_file(path: Path, error: type[CheckpointError] = CheckpointError,
                      advice: str = DEFAULT_ADVICE) -> dict[str, str]:
    """One file checked readable without loading it: a .safetensors header that covers the file ({tensor name:
    dtype}), any other file a complete torch.save archive ({}); raises ``error`` naming the file."""
    if path.name.endswith(".safetensors"):
        return _safetensors_dtypes(path, error, advice)
    return _check_torch_file(path, error, advice)


def _weight_file_names(src: Path, error: type[CheckpointError]) -> list[str]:
    for index_name in _INDEXES:
        index = src / index_name
        if not index.exists():
            continue
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as exc:  # unreadable, not JSON (or not UTF-8), no weight_map
            raise error(f"{index} is not a valid shard index ({type(exc).__name__}: {one_line(exc)}); expected "
                        '{"weight_map": {"tensor name": "shard file name", ...}}.') from exc
        if not isinstance(weight_map, dict) or not weight_map:
            raise error(f"{index}: weight_map must be a non-empty mapping of tensor names to shard file names, "
                        f"got {preview(weight_map)}.")
        bad = sorted({preview(v) for v in weight_map.values() if not _plain_file_name(v, index_name)})
        if bad:
            raise error(f"{index}: weight_map names invalid shard files: {', '.join(bad[:5])} (expected names of files "
                        f"in {src} ending in {'.safetensors' if index_name.startswith('model') else '.bin'}).")
        shards = sorted(set(weight_map.values()))
        missing = [s for s in shards if not (src / s).is_file()]
        if missing:
            raise error(f"{src} is missing weight shards listed in {index_name}: {missing}.")
        return shards
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (src / name).is_file():
            return [name]
    raise error(f"No weights in {src}: expected model.safetensors (or a sharded index).")


def _plain_file_name(value: Any, index_name: str) -> bool:
    suffix = ".safetensors" if index_name.startswith("model") else ".bin"
    return (
        isinstance(value, str) and value.endswith(suffix) and "/" not in value and "\\" not in value
        and value not in (".", "..") and not value.startswith(".")
    )


def preview(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _safetensors_dtypes(path: Path, error: type[CheckpointError], advice: str) -> dict[str, str]:
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as f:
            return {key: f.get_slice(key).get_dtype() for key in f.keys()}  # noqa: SIM118 (not iterable)
    except Exception as exc:  # SafetensorError (truncated, corrupt header), OSError: many types
        raise error(f"Cannot read weights from {path}: not a valid .safetensors file ({one_line(exc)}); it may be "
                    f"truncated or corrupt: {advice}.") from exc


def _check_torch_file(path: Path, error: type[CheckpointError], advice: str) -> dict[str, str]:
    """A .bin file must be a torch.save zip archive (or the legacy pickle format); its tensors are not read here."""
    try:
        with path.open("rb") as f:
            head = f.read(4)
        if head.startswith(b"PK"):
            zipfile.ZipFile(path).close()  # reads the central directory at the end: catches truncation
        elif not head.startswith(b"\x80"):
            raise ValueError("neither a zip archive nor a pickle")
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise error(f"Cannot read weights from {path}: not a PyTorch checkpoint ({one_line(exc)}); it may be "
                    f"truncated or corrupt: {advice}.") from exc
    return {}


def non_floating_tensors(files: dict[str, dict[str, str]]) -> list[str]:
    """Tensors of `inspect_weight_files` whose dtype is not floating point (F64, F32, F16, BF16, F8_*)."""
    return sorted(k for dtypes in files.values() for k, d in dtypes.items() if not d.startswith(("F", "BF")))
