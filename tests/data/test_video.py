"""pmod.data.video: the one frame-sampling rule (records, `pmod eval`, lmms-eval), transformers' spread as its base,
the [start, end] window, and decoding video files with transformers' video loader."""

import numpy as np
import pytest
from transformers import video_utils

import pmod.data.video
from pmod.data.video import decode_video, load_video_file, require_video_backend, sample_frame_indices
from pmod.errors import PModInputError
from tests.helpers.videos import COLOURS, frame_index, write_clip


def test_sampling_at_the_record_rate():
    assert sample_frame_indices(8, 2.0, 4.0) == ([0, 2, 4, 6], 2.0)  # 8 frames at 4 fps, taken at 2 fps
    assert sample_frame_indices(8, 1.0, 4.0) == ([0, 4], 1.0)
    assert sample_frame_indices(8, 3.0, 4.0) == ([0, 1, 2, 4, 5, 6], 3.0)  # transformers' spread: i * 8 // 6
    assert sample_frame_indices(8, 8.0, 4.0) == (list(range(8)), 4.0)  # no faster than the video: every frame
    assert sample_frame_indices(8, 2.0, 4.0, max_frames=3) == ([0, 2, 5], 1.5)  # capped: the rate scales down
    assert sample_frame_indices(4, 2.0, max_frames=2) == ([0, 2], 1.0)  # frames given at 2 fps, capped
    assert sample_frame_indices(3, 2.0, 30.0) == ([0], 10.0)  # shorter than a sampling step: one frame for 0.1 s
    with pytest.raises(ValueError, match="no frames"):
        sample_frame_indices(0, 2.0, 4.0)


# transformers 5.17 spread frames as np.arange(0, n, n / count) (7 frames, 5 kept: 0, 1, 2, 3, 4, the last frames never
# reached) and divided by zero below one frame; pmod follows the rule of newer releases (0, 1, 2, 4, 5)
_THEIRS = video_utils.default_sample_indices_fn(video_utils.VideoMetadata(total_num_frames=7, fps=7.0), num_frames=5)
OLDER_SPREAD = _THEIRS.tolist() != [0, 1, 2, 4, 5]


@pytest.mark.skipif(OLDER_SPREAD, reason="this transformers spreads frames by its older rule")
@pytest.mark.parametrize("total", [1, 2, 3, 7, 8, 20, 31, 100])
@pytest.mark.parametrize("rate", [4.0, 10.0, 29.97])
def test_the_spread_is_transformers_own(total, rate):
    """Without a window the rule is transformers' `default_sample_indices_fn` (its video processors' sampling), at a
    rate to sample at and for a frame count."""
    meta = video_utils.VideoMetadata(total_num_frames=total, fps=rate)
    for fps in (0.5, 1.0, 2.0, 3.0):
        if fps < rate:
            theirs = video_utils.default_sample_indices_fn(meta, fps=fps).tolist()
            assert sample_frame_indices(total, fps, rate)[0] == theirs, fps
    for count in range(1, total + 1):
        theirs = video_utils.default_sample_indices_fn(meta, num_frames=count).tolist()
        assert sample_frame_indices(total, None, rate, max_frames=count)[0] == theirs, count


def test_every_frame_and_the_window():
    # fps None: every frame is a candidate (lmms-eval), spread down to max_frames
    assert sample_frame_indices(20, None, 10.0, 4) == ([0, 5, 10, 15], 2.0)
    assert sample_frame_indices(20, None, 10.0) == (list(range(20)), 10.0)
    # the window: frames int(start * rate) to int(end * rate), both kept, then the same rule within it
    assert sample_frame_indices(20, None, 10.0, 3, start=1.0, end=1.5) == ([10, 12, 14], 5.0)
    assert sample_frame_indices(20, None, 10.0, 10, start=1.0, end=1.5) == ([10, 11, 12, 13, 14, 15], 10.0)
    assert sample_frame_indices(20, 2.0, 10.0, start=1.0) == ([10, 15], 2.0)  # at 2 fps from 1 s to the end
    assert sample_frame_indices(8, 2.0, start=1.0, end=2.0) == ([2, 3, 4], 2.0)  # frames given at 2 fps
    # clamped to the video: a start past the end keeps the last frame, an end before the start the first
    assert sample_frame_indices(20, None, 10.0, start=5.0) == ([19], 10.0)
    assert sample_frame_indices(20, None, 10.0, start=-1.0, end=0.2) == ([0, 1, 2], 10.0)
    assert sample_frame_indices(20, None, 10.0, start=1.0, end=0.5) == ([10], 10.0)
    with pytest.raises(ValueError, match="frame rate"):
        sample_frame_indices(8, None)
    with pytest.raises(ValueError, match="max_frames"):
        sample_frame_indices(8, None, 4.0, max_frames=0)


def test_a_video_file_is_sampled_in_its_window(tmp_path):
    clip = tmp_path / write_clip(tmp_path)  # 8 frames at 4 fps

    def taken(*args, **kwargs):
        frames, rate = load_video_file(clip, *args, **kwargs)
        return [frame_index(f) for f in frames], rate

    assert taken(2.0) == ([0, 2, 4, 6], 2.0)
    assert taken(None, 3) == ([0, 2, 5], 1.5)
    assert taken(None, 3, start=0.5, end=1.5) == ([2, 3, 5], 2.4)  # frames 2..6
    assert taken(None, backend="pyav", start=1.25) == ([5, 6, 7], 4.0)


def test_a_header_without_a_rate_takes_the_default_rate(tmp_path, monkeypatch):
    meta = video_utils.VideoMetadata(total_num_frames=8, fps=None, width=28, height=28)
    frames = np.stack([np.full((28, 28, 3), c, np.uint8) for c in COLOURS])

    def no_rate(path, backend=None, sample_indices_fn=None, **kwargs):
        return frames[sample_indices_fn(meta)], meta

    monkeypatch.setattr(video_utils, "load_video", no_rate)
    path = tmp_path / "clip.mp4"
    assert load_video_file(path, 2.0, backend="pyav")[1] == 2.0  # taken as the sampling rate: every frame
    images, rate = load_video_file(path, None, 4, backend="pyav", default_rate=8.0, start=0.5)
    assert [frame_index(f) for f in images] == [4, 5, 6, 7] and rate == 8.0


def test_no_decoder_names_the_file(monkeypatch):
    monkeypatch.setattr(pmod.data.video, "video_backend", lambda: None)
    with pytest.raises(PModInputError, match=r"^task 't': cannot read the video file a\.mp4: no video decoder"):
        require_video_backend("a.mp4", "task 't'")
    with pytest.raises(PModInputError, match="no video decoder"):
        load_video_file("a.mp4", 2.0)


def test_channels_first_decoders_give_the_same_frames(tmp_path, monkeypatch):
    """torchcodec and torchvision return (T, C, H, W) frames; decode_video turns them into the same images."""
    frames = np.stack([np.full((28, 28, 3), c, np.uint8) for c in COLOURS[:4]])  # (T, H, W, C)
    meta = video_utils.VideoMetadata(total_num_frames=4, fps=4.0, width=28, height=28, duration=1.0)

    def channels_first(path, backend=None, sample_indices_fn=None, **kwargs):
        chosen = sample_indices_fn(meta)
        return frames[chosen].transpose(0, 3, 1, 2), meta  # (T, C, H, W)

    monkeypatch.setattr(video_utils, "load_video", channels_first)
    images = decode_video(tmp_path / "clip.mp4", "torchcodec", lambda total, rate: list(range(total)))
    assert [im.getpixel((0, 0)) for im in images] == COLOURS[:4]
