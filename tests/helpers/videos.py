"""Small lossless video clips and frame folders whose frame i is one solid colour, `COLOURS[i]`, so that a decoded
frame tells which frame it is (`frame_index`)."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

COLOURS = [(30 * i, 255 - 30 * i, 100) for i in range(8)]  # frame i of the clips: one solid colour


def write_clip(folder: Path, name: str = "clip.avi", codec: str = "png", pix_fmt: str = "rgb24", n: int = 8,
               fps: int = 4, size: int = 28) -> str:
    """A lossless clip of ``n`` solid-colour frames at ``fps`` (.avi headers give the frame count, .mkv ones do not);
    skips the test without PyAV."""
    av = pytest.importorskip("av")
    with av.open(str(folder / name), "w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width = stream.height = size
        stream.pix_fmt = pix_fmt
        for colour in COLOURS[:n]:
            frame = np.full((size, size, 3), colour, np.uint8)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    return name


def write_frames(folder: Path, name: str, indices, size: int = 28) -> str:
    """The clip's frames ``indices`` as a folder of PNGs."""
    (folder / name).mkdir()
    for k, i in enumerate(indices):
        Image.new("RGB", (size, size), COLOURS[i]).save(folder / name / f"{k:03d}.png")
    return name


def frame_index(frame: Image.Image) -> int:
    """Which of the clip's frames ``frame`` is."""
    return COLOURS.index(frame.getpixel((5, 5)))
