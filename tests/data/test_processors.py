"""pmod.processors: Qwen2-VL processors without torchvision (frame video processor, save / load)."""

import json
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

import pmod
from pmod.errors import PModInputError
from pmod.loading import load_processor
from pmod.processors import Qwen2VLFrameVideoProcessor, has_torchvision
from pmod.tiny import tiny_qwen2_vl, tiny_qwen2_vl_processor

MEAN, STD = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]


def frames(n, height=28, width=56, seed=0):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)) for _ in range(n)]


def reference_patches(video, p, tp, m):
    """The documented Qwen2-VL video layout, element by element: groups of tp frames in time; in each group the
    patches by merged cell (row, col) then by position inside the cell; each patch row = (C, tp, p, p)."""
    x = [(np.asarray(f, dtype=np.float64) / 255 - MEAN) / STD for f in video]  # (H, W, C) each, normalised
    x += [x[-1]] * (-len(x) % tp)  # the last frame repeated to fill the last group
    height, width = x[0].shape[:2]
    gh, gw = height // p, width // p
    rows = []
    for g in range(len(x) // tp):
        for bh in range(gh // m):
            for bw in range(gw // m):
                for mh in range(m):
                    for mw in range(m):
                        y, xx = (bh * m + mh) * p, (bw * m + mw) * p
                        row = [x[g * tp + t][y + py, xx + px, c] for c in range(3) for t in range(tp)
                               for py in range(p) for px in range(p)]
                        rows.append(row)
    return np.array(rows), [len(x) // tp, gh, gw]


@pytest.mark.parametrize("n_frames", [4, 3, 1])
def test_frame_video_processor_matches_the_reference_layout(n_frames):
    proc = Qwen2VLFrameVideoProcessor(patch_size=7, temporal_patch_size=2, merge_size=2, image_mean=MEAN, image_std=STD,
                                      size={"shortest_edge": 28 * 56, "longest_edge": 28 * 56})
    videos = [frames(n_frames, seed=1), frames(2, seed=2)]
    out = proc(videos, return_tensors="pt")
    expected = [reference_patches(v, 7, 2, 2) for v in videos]
    np.testing.assert_allclose(out["pixel_values_videos"].numpy(), np.concatenate([e[0] for e in expected]),
                               rtol=1e-5, atol=1e-5)
    assert out["video_grid_thw"].tolist() == [e[1] for e in expected]
    assert [m.total_num_frames for m in out["video_metadata"]] == [n_frames, 2]
    patches = proc.get_num_of_video_patches(n_frames, 28, 56)
    assert patches == int(out["video_grid_thw"][0].prod())


def test_frames_are_resized_as_qwen2_vl_resizes_them():
    """Frames off the patch grid: smart resize to multiples of patch * merge within the pixel bounds (30 x 61 ->
    28 x 56 here), PIL bicubic, then the same layout; nested per-sample lists read as transformers reads them."""
    proc = Qwen2VLFrameVideoProcessor(patch_size=7, temporal_patch_size=2, merge_size=2, image_mean=MEAN, image_std=STD,
                                      size={"shortest_edge": 14 * 14, "longest_edge": 28 * 56})
    video = frames(3, height=30, width=61, seed=3)
    out = proc([video], return_tensors="pt")
    resized = [f.resize((56, 28), Image.Resampling.BICUBIC) for f in video]
    expected, grid = reference_patches(resized, 7, 2, 2)
    np.testing.assert_allclose(out["pixel_values_videos"].numpy(), expected, rtol=1e-5, atol=1e-5)
    assert out["video_grid_thw"].tolist() == [grid] == [[2, 4, 8]]
    assert proc.get_num_of_video_patches(3, 30, 61) == 2 * 4 * 8
    nested = proc([[np.stack([np.asarray(f) for f in video])]], return_tensors="pt")  # one sample, one video
    torch.testing.assert_close(nested["pixel_values_videos"], out["pixel_values_videos"])
    bigger = proc([video], return_tensors="pt", size={"shortest_edge": 56 * 112, "longest_edge": 56 * 112})
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

    h, w = smart_resize(30, 61, 14, min_pixels=56 * 112, max_pixels=56 * 112)  # a call's size is honoured
    assert bigger["video_grid_thw"].tolist() == [[2, h // 7, w // 7]] and (h, w) != (28, 56)


def test_a_still_video_equals_the_image():
    """Two identical frames give exactly the image processor's patches (it repeats an image over time)."""
    model = tiny_qwen2_vl(patch_size=7)
    processor = tiny_qwen2_vl_processor(model, image_size=28)
    image = frames(1, 28, 28)[0]
    as_video = processor.video_processor([[image, image]], return_tensors="pt")
    as_image = processor.image_processor([image], return_tensors="pt")
    torch.testing.assert_close(as_video["pixel_values_videos"], as_image["pixel_values"])
    assert as_video["video_grid_thw"].tolist() == as_image["image_grid_thw"].tolist()


def test_bad_videos_and_unsupported_settings_are_explained():
    proc = Qwen2VLFrameVideoProcessor(patch_size=7, size={"shortest_edge": 28 * 28, "longest_edge": 28 * 56})
    with pytest.raises(PModInputError, match="one size"):
        proc([frames(1, 28, 28) + frames(1, 28, 56)])
    with pytest.raises(PModInputError, match="not paths"):
        proc("clip.mp4")
    with pytest.raises(PModInputError, match="uint8"):
        proc([np.zeros((2, 28, 28, 3), dtype=np.float32)])
    with pytest.raises(PModInputError, match="already sampled"):
        proc([frames(2)], do_sample_frames=True, num_frames=2)
    with pytest.raises(PModInputError, match="do_normalize"):
        proc([frames(2)], do_normalize=False)


@pytest.mark.parametrize("version", ["2", "2.5"])
def test_processor_expands_placeholders_and_round_trips(tmp_path, version):
    model = pmod.apply_pmod(tiny_qwen2_vl(version=version, patch_size=7),
                            pmod.PModConfig(schedule=[1.0, 1.0, 0.5, 0.5]))
    processor = tiny_qwen2_vl_processor(model, image_size=28)
    if not has_torchvision():
        assert type(processor).__module__ == "pmod.processors"
    image = frames(1, 28, 28)[0]
    text = ["what is <|vision_start|><|image_pad|><|vision_end|> ?", "<|vision_start|><|video_pad|><|vision_end|> what"]
    out = processor(text=text, images=[image], videos=[frames(3, 28, 28)], return_tensors="pt", padding=True)
    ids, types = out["input_ids"], out["mm_token_type_ids"]
    assert int((ids[0] == model.config.image_token_id).sum()) == 4  # 4 x 4 patches, 2 x 2 merge
    assert int((ids[1] == model.config.video_token_id).sum()) == 8  # 3 frames -> 2 time steps x 4
    assert torch.equal(types == 1, ids == model.config.image_token_id)
    assert torch.equal(types == 2, ids == model.config.video_token_id)
    if version == "2.5":
        # frames without a rate: transformers' own default, 24 per second (2 frames per time step: 1/12 s)
        assert out["second_per_grid_ts"].tolist() == [pytest.approx(2 / 24)]
        for fps, seconds in ((2.0, 1.0), (0.5, 4.0)):  # the frames' own rate, when given
            timed = processor(text=text, images=[image], videos=[frames(3, 28, 28)], return_tensors="pt", padding=True,
                              video_metadata=[{"fps": fps, "total_num_frames": 3}])
            assert timed["second_per_grid_ts"].tolist() == [seconds]

    processor.save_pretrained(tmp_path)
    loaded = load_processor(tmp_path)
    assert type(loaded).__name__ == type(processor).__name__
    assert type(loaded.video_processor) is type(processor.video_processor)
    assert loaded.video_processor.to_dict() == processor.video_processor.to_dict()
    assert pickle.loads(pickle.dumps(loaded)).video_processor.to_dict() == processor.video_processor.to_dict()
    again = loaded(text=text, images=[image], videos=[frames(3, 28, 28)], return_tensors="pt", padding=True)
    for key, value in out.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(again[key], value), key
    assert loaded.chat_template == processor.chat_template
    inputs = {k: v for k, v in out.items() if k != "video_metadata"}
    with torch.no_grad():
        logits = model(**inputs).logits
    assert logits.shape[:2] == ids.shape and torch.isfinite(logits).all()
    r = model.routing()[2]
    assert int(r.target.sum()) == 12 and int(r.selected[1].sum()) == 4


def test_settings_are_saved_and_read_in_transformers_format(tmp_path):
    from pmod.processors import LlavaOnevisionFrameVideoProcessor

    processor = tiny_qwen2_vl_processor(tiny_qwen2_vl(patch_size=7), image_size=28)
    processor.save_pretrained(tmp_path / "saved")
    saved = json.loads((tmp_path / "saved/processor_config.json").read_text())["video_processor"]
    assert saved["video_processor_type"] == "Qwen2VLVideoProcessor"  # transformers' class, not ours
    assert saved["size"] == {"shortest_edge": 28 * 28, "longest_edge": 28 * 28} and saved["patch_size"] == 7
    assert "fps" not in saved  # transformers would read it as a sampling rate and refuse num_frames with it
    # a hub folder written by transformers' own (torchvision) video processor
    hub = tmp_path / "hub"
    hub.mkdir()
    (hub / "video_preprocessor_config.json").write_text(json.dumps({
        "video_processor_type": "Qwen2VLVideoProcessor", "size": {"shortest_edge": 3136, "longest_edge": 12845056},
        "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2, "min_frames": 4, "max_frames": 768,
        "image_mean": MEAN, "image_std": STD, "do_sample_frames": False, "resample": 3}))
    video = Qwen2VLFrameVideoProcessor.from_pretrained(hub)
    assert video.size == {"shortest_edge": 3136, "longest_edge": 12845056} and video.image_mean == MEAN
    onevision = LlavaOnevisionFrameVideoProcessor.from_dict(
        {"video_processor_type": "LlavaOnevisionVideoProcessor", "size": {"height": 384, "width": 384}, "resample": 3})
    assert onevision.to_dict()["size"] == {"height": 384, "width": 384}
    with pytest.raises(PModInputError, match="no video processor settings"):
        Qwen2VLFrameVideoProcessor.from_pretrained(tmp_path)


def test_a_hub_folder_without_a_video_config_loads(tmp_path):
    """Qwen2-VL folders written before video processors existed hold only preprocessor_config.json."""
    processor = tiny_qwen2_vl_processor(tiny_qwen2_vl(patch_size=7), image_size=28)
    processor.tokenizer.save_pretrained(tmp_path)
    (tmp_path / "chat_template.jinja").write_text(processor.chat_template)
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({
        "processor_class": "Qwen2VLProcessor", "image_processor_type": "Qwen2VLImageProcessor",
        "min_pixels": 28 * 28, "max_pixels": 28 * 28, "patch_size": 7, "temporal_patch_size": 2, "merge_size": 2,
        "image_mean": MEAN, "image_std": STD}))
    loaded = load_processor(tmp_path)
    assert loaded.video_processor.size == {"shortest_edge": 28 * 28, "longest_edge": 28 * 28}
    assert loaded.video_processor.patch_size == 7 and list(loaded.video_processor.image_mean) == MEAN
    out = loaded(text=["<|vision_start|><|video_pad|><|vision_end|> what"], videos=[frames(2, 28, 28)],
                 return_tensors="pt")
    assert out["video_grid_thw"].tolist() == [[1, 4, 4]]


def test_onevision_frames_are_resized_and_normalised():
    from pmod.processors import LlavaOnevisionFrameVideoProcessor

    proc = LlavaOnevisionFrameVideoProcessor(size={"height": 14, "width": 21}, image_mean=MEAN, image_std=STD)
    video = frames(3, height=14, width=21, seed=4)  # already at the size: no resampling in the comparison
    out = proc([video], return_tensors="pt")["pixel_values_videos"]
    assert out.shape == (1, 3, 3, 14, 21)
    expected = np.stack([((np.asarray(f, dtype=np.float64) / 255 - MEAN) / STD).transpose(2, 0, 1) for f in video])
    np.testing.assert_allclose(out[0].numpy(), expected, rtol=1e-5, atol=1e-5)
    resized = proc([frames(2, height=30, width=40)], return_tensors="pt")["pixel_values_videos"]
    assert resized.shape == (1, 2, 3, 14, 21)
    with pytest.raises(PModInputError, match="same number of frames"):
        proc([frames(2, 14, 21), frames(3, 14, 21)])


@pytest.mark.skipif(not has_torchvision(), reason="compares with transformers' video processors (torchvision code)")
@pytest.mark.parametrize("height, width", [(28, 56), (30, 40)])
def test_frame_video_processors_equal_transformers_own(height, width):
    """Where torchvision is installed transformers' own video processors are used; pmod's frame video processors,
    which stand in for them elsewhere, give the same grids and the same pixels for frames that need no resizing,
    and pixels within PIL-vs-torchvision resampling differences for frames that do."""
    import transformers

    from pmod.processors import LlavaOnevisionFrameVideoProcessor

    videos = [frames(3, height, width, seed=1), frames(4, height, width, seed=2)]
    exact = (height, width) == (28, 56)
    qwen = Qwen2VLFrameVideoProcessor(size={"shortest_edge": 28 * 56, "longest_edge": 28 * 56}, patch_size=7,
                                      temporal_patch_size=2, merge_size=2, image_mean=MEAN, image_std=STD)
    onevision = LlavaOnevisionFrameVideoProcessor(size={"height": 28, "width": 28}, image_mean=MEAN, image_std=STD)
    for frame, videos_in in ((qwen, videos), (onevision, [videos[0], videos[1][:3]])):
        own = getattr(transformers, frame.stands_in_for)(
            **{k: v for k, v in frame.to_dict().items() if k != "video_processor_type"})
        meta = [{"fps": 2.0, "total_num_frames": len(v)} for v in videos_in]
        ours, theirs = frame(videos_in, return_tensors="pt", video_metadata=meta), own(videos_in, return_tensors="pt",
                                                                                        video_metadata=meta)
        assert (ours.keys() >= {"pixel_values_videos"}
                and theirs["pixel_values_videos"].shape == ours["pixel_values_videos"].shape)
        if "video_grid_thw" in theirs:
            assert torch.equal(ours["video_grid_thw"], theirs["video_grid_thw"])
        gap = (ours["pixel_values_videos"] - theirs["pixel_values_videos"]).abs().max().item()
        # resized frames: PIL and torchvision round some resampled values to neighbouring 8-bit steps, so at most one
        # 1/255 step, divided by the smallest std (measured: exactly that, 0.0196)
        assert gap < (1e-5 if exact and frame is qwen else 1 / 255 / min(STD) + 1e-5), (frame.stands_in_for, gap)
