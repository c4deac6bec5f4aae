"""pmod.processors: video-model processors without torchvision (Qwen2-VL, Qwen2.5-VL, LLaVA-OneVision, Qwen3-VL,
InternVL, LLaVA-NeXT-Video, SmolVLM: frame video processors, save / load), compared with transformers' own where
torchvision is installed."""

import json
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

import pmod
from pmod.errors import PModInputError
from pmod.loading import load_processor
from pmod.processors import Qwen2VLFrameVideoProcessor, has_torchvision
from pmod.tiny import (
    CHATML_WORDS,
    tiny_internvl,
    tiny_internvl_processor,
    tiny_llava_next_video,
    tiny_llava_next_video_processor,
    tiny_qwen2_vl,
    tiny_qwen2_vl_processor,
    tiny_qwen3_vl,
    tiny_qwen3_vl_processor,
    tiny_smolvlm,
    tiny_smolvlm_processor,
)

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


# Qwen3-VL, InternVL and LLaVA-NeXT-Video: pmod's frame video processors stand in for transformers' torchvision ones

FAMILY_WORDS = [*CHATML_WORDS, "it", "<", ">", ".", ":", "seconds", *"0123456789", *(f"Frame{i}" for i in range(1, 9))]
# family -> model, processor builder, processor class, image and video placeholders of its chat template
FAMILIES = {
    "qwen3_vl": (lambda: tiny_qwen3_vl(patch_size=7), tiny_qwen3_vl_processor, "Qwen3VLProcessor"),
    "internvl": (tiny_internvl, tiny_internvl_processor, "InternVLProcessor"),
    "llava_next_video": (tiny_llava_next_video, tiny_llava_next_video_processor, "LlavaNextVideoProcessor"),
}
# written by transformers 5.25 with torchvision: FAMILIES' processors (FAMILY_WORDS), with transformers' own video
# processors, .save_pretrained(FIXTURES / family)
FIXTURES = Path(__file__).parents[1] / "fixtures" / "transformers_video_processors"
# 8 frames of a 4-fps clip, every other one kept: Qwen3-VL's timestamps come from these indices and this rate
METADATA = [{"fps": 4.0, "total_num_frames": 8, "frames_indices": [0, 2, 4, 6]}]


def conversation_inputs(processor: Any) -> dict[str, Any]:
    """An image and a video conversation through ``processor`` (its chat template, one 32 x 32 image, four frames)."""
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": " what is in the image ?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "a red circle"}]},
        {"role": "user", "content": [{"type": "video"}, {"type": "text", "text": " is it red ?"}]},
    ]
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return processor(text=[text], images=[frames(1, 32, 32, seed=5)[0]], videos=[frames(4, 32, 32, seed=6)],
                     video_metadata=METADATA, return_tensors="pt")


def assert_same_inputs(ours: dict[str, Any], theirs: dict[str, Any], pixel_step: float = 0.0) -> None:
    """Equal token ids and grids; pixels equal up to ``pixel_step`` (one resampled 8-bit step / std)."""
    tensors = sorted(k for k, v in theirs.items() if isinstance(v, torch.Tensor))
    assert sorted(k for k, v in ours.items() if isinstance(v, torch.Tensor)) == tensors
    for key in tensors:
        if ours[key].is_floating_point():
            assert ours[key].shape == theirs[key].shape, key
            gap = (ours[key] - theirs[key]).abs().max().item()
            assert gap <= pixel_step + 1e-5, (key, gap)
        else:
            assert torch.equal(ours[key], theirs[key]), key


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_processors_take_videos_and_round_trip(family, tmp_path):
    """Without torchvision these processors are transformers' classes with pmod's frame video processor; an image and
    video conversation expands to the model's tokens (Qwen3-VL: a timestamp before each time step) and runs through
    the model; saved, the folder loads back (pmod.loading.load_processor) to the same inputs, and pickles."""
    from pmod.processors import FRAME_VIDEO_PROCESSORS

    build, processor_of, name = FAMILIES[family]
    model = build()
    processor = processor_of(model, FAMILY_WORDS)
    frame_cls = FRAME_VIDEO_PROCESSORS[name]
    if not has_torchvision():
        assert type(processor).__module__ == "pmod.processors" and type(processor).__name__ == name
        assert type(processor.video_processor) is frame_cls
    out = conversation_inputs(processor)
    tokens = processor.tokenizer.convert_ids_to_tokens(out["input_ids"][0].tolist())
    if family == "qwen3_vl":  # 28 x 28 frames: 2 time steps of 2 x 2 merged patches, each after its timestamp
        assert tokens.count("<|video_pad|>") == 8 and tokens.count("seconds") == 2
        assert " ".join(tokens).count("< 0 . 2 seconds > <|vision_start|>") == 1  # frames 0 and 2 at 4 fps: 0.25 s
    elif family == "internvl":  # one tile for the image, one per frame; 4 tokens each
        assert tokens.count("<IMG_CONTEXT>") == 4 + 4 * 4 and tokens.count("Frame4") == 1
        assert out["pixel_values"].shape == (1 + 4, 3, 32, 32)  # the image's tile, then the frames
    else:  # frames cropped to 28 x 28: 4 x 4 patches pooled 2 x 2, 4 tokens a frame
        assert tokens.count("<video>") == 4 * 4 and out["pixel_values_videos"].shape == (1, 4, 3, 28, 28)
    with torch.no_grad():
        logits = model(**{k: v for k, v in out.items() if isinstance(v, torch.Tensor)}).logits
    assert logits.shape[:2] == out["input_ids"].shape and torch.isfinite(logits).all()

    processor.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "processor_config.json").read_text())["video_processor"]
    assert saved["video_processor_type"] == frame_cls.stands_in_for  # transformers' class, loadable by it
    loaded = load_processor(tmp_path)
    assert type(loaded).__name__ == name and type(loaded.video_processor) is type(processor.video_processor)
    assert loaded.video_processor.to_dict() == processor.video_processor.to_dict()
    assert_same_inputs(conversation_inputs(loaded), out)
    unpickled = pickle.loads(pickle.dumps(loaded))
    assert unpickled.video_processor.to_dict() == processor.video_processor.to_dict()


@pytest.mark.parametrize("family", list(FAMILIES))
def test_a_folder_saved_by_transformers_own_classes_loads(family):
    """A processor folder that transformers saved with its own (torchvision) video processor loads here (pmod's
    stand-in without torchvision, transformers' class with it), with the saved settings, to the same inputs as the
    processor built here."""
    from pmod.processors import FRAME_VIDEO_PROCESSORS

    build, processor_of, name = FAMILIES[family]
    saved = json.loads((FIXTURES / family / "processor_config.json").read_text())["video_processor"]
    loaded = load_processor(FIXTURES / family)
    built = processor_of(build(), FAMILY_WORDS)
    assert type(loaded).__name__ == name and type(loaded.video_processor) is type(built.video_processor)
    settings = loaded.video_processor.to_dict()
    for setting in FRAME_VIDEO_PROCESSORS[name].settings:
        if setting in saved:
            assert json.loads(json.dumps(settings[setting])) == saved[setting], setting  # tuples as lists
    assert_same_inputs(conversation_inputs(loaded), conversation_inputs(built))


def test_qwen3_vl_videos_are_sized_as_a_whole():
    """Qwen3-VL sizes a video by its frames' total pixels: more frames, smaller frames; fewer frames than the
    temporal patch are refused, as transformers refuses them."""
    from pmod.processors import Qwen3VLFrameVideoProcessor

    proc = Qwen3VLFrameVideoProcessor(size={"shortest_edge": 28 * 28, "longest_edge": 4 * 56 * 56}, patch_size=7)
    grids = [proc([frames(n, 56, 56)], return_tensors="pt")["video_grid_thw"].tolist()[0] for n in (2, 4, 8)]
    assert grids == [[1, 8, 8], [2, 8, 8], [4, 4, 4]]
    assert [proc.get_num_of_video_patches(n, 56, 56) for n in (2, 4, 8)] == [64, 128, 64]
    assert proc.get_number_of_video_patches(8, 56, 56) == 64  # the name transformers 5.17's processor calls
    with pytest.raises(PModInputError, match="1 frames"):
        proc([frames(1, 56, 56)])


STAND_IN_CASES = [  # family, settings, frame size, exact (no resampling)
    ("qwen3_vl", {"size": {"shortest_edge": 28 * 28, "longest_edge": 4 * 28 * 56}, "patch_size": 7}, (28, 56), True),
    ("qwen3_vl", {"size": {"shortest_edge": 28 * 28, "longest_edge": 4 * 28 * 56}, "patch_size": 7}, (30, 40), False),
    ("qwen3_vl", {"size": {"shortest_edge": 28 * 28, "longest_edge": 4 * 28 * 56}, "patch_size": 7,
                  "cap_pixels_per_frame": True, "max_video_tokens": 4}, (56, 56), False),  # capped: 28 x 28 frames
    ("internvl", {"size": {"height": 28, "width": 28}}, (28, 28), True),
    ("internvl", {"size": {"height": 28, "width": 28}}, (37, 29), False),
    ("llava_next_video", {"size": {"shortest_edge": 28}, "crop_size": {"height": 28, "width": 28}}, (28, 56), True),
    ("llava_next_video", {"size": {"shortest_edge": 28}, "crop_size": {"height": 28, "width": 28}}, (37, 29), False),
    ("llava_next_video", {"size": {"shortest_edge": 28}, "crop_size": {"height": 32, "width": 32}}, (30, 40), False),
]


@pytest.mark.skipif(not has_torchvision(), reason="compares with transformers' video processors (torchvision code)")
@pytest.mark.parametrize("family, settings, size, exact", STAND_IN_CASES)
def test_new_frame_video_processors_equal_transformers_own(family, settings, size, exact):
    """pmod's stand-ins and transformers' own video processors on the same frames: the same grids and patch counts,
    the same pixels where no resizing is needed, within one 8-bit step (over the smallest std) where PIL and
    torchvision resample (measured: exactly one step, 0.0196)."""
    import transformers

    from pmod.processors import FRAME_VIDEO_PROCESSORS

    frame = FRAME_VIDEO_PROCESSORS[FAMILIES[family][2]](image_mean=MEAN, image_std=STD, **settings)
    own = getattr(transformers, frame.stands_in_for)(
        **{k: v for k, v in frame.to_dict().items() if k != "video_processor_type"})
    videos = [frames(4, *size, seed=1), frames(4, *size, seed=2)]
    meta = METADATA * 2
    ours, theirs = frame(videos, return_tensors="pt", video_metadata=meta), own(videos, return_tensors="pt",
                                                                              video_metadata=meta)
    assert_same_inputs(ours, theirs, 0.0 if exact else 1 / 255 / min(STD))
    if family == "qwen3_vl":
        assert ours["video_grid_thw"].tolist() == theirs["video_grid_thw"].tolist()
        assert frame.get_num_of_video_patches(4, *size) == own.get_num_of_video_patches(4, *size)
        if settings.get("cap_pixels_per_frame"):
            assert ours["video_grid_thw"].tolist() == [[2, 4, 4]] * 2
    if family == "llava_next_video" and size == (30, 40):  # a crop larger than the resized frame: zero padding
        assert ours["pixel_values_videos"].shape[-2:] == (32, 32)


@pytest.mark.skipif(not has_torchvision(), reason="compares with transformers' video processors (torchvision code)")
@pytest.mark.parametrize("family", list(FAMILIES))
def test_processors_with_the_stand_ins_give_transformers_inputs(family, tmp_path):
    """The whole processor (text, image, video) with pmod's frame video processor in place of transformers' own:
    the same input_ids (Qwen3-VL's timestamps included) and pixels within one resampled step; saved with the stand-in,
    the folder loads with transformers' own classes, with the same settings, to transformers' inputs exactly."""
    from pmod.processors import FRAME_VIDEO_PROCESSORS

    build, processor_of, name = FAMILIES[family]
    processor = processor_of(build(), FAMILY_WORDS)
    own = processor.video_processor
    theirs = conversation_inputs(processor)
    processor.video_processor = FRAME_VIDEO_PROCESSORS[name].from_dict(own.to_dict())
    ours = conversation_inputs(processor)
    assert_same_inputs(ours, theirs, 1 / 255 / min(processor.video_processor.image_std))
    tokens = processor.tokenizer.convert_ids_to_tokens(ours["input_ids"][0].tolist())
    inserted = {"qwen3_vl": "seconds", "internvl": "Frame4"}.get(family)
    assert inserted is None or inserted in tokens  # the timestamps / frame labels are words: compared word by word
    processor.save_pretrained(tmp_path)
    loaded = load_processor(tmp_path)
    assert type(loaded.video_processor) is type(own)
    assert {k: v for k, v in loaded.video_processor.to_dict().items() if k in processor.video_processor.settings} == \
        {k: v for k, v in own.to_dict().items() if k in processor.video_processor.settings}
    assert_same_inputs(conversation_inputs(loaded), theirs)


# SmolVLM: pmod's frame video processor stands in for transformers' torchvision one. The processor writes each frame as
# one global image after its timestamp ("Frame from 00:01:"), and a call with images and a video returns the video's
# pixel_values (it merges its parts' outputs by name; transformers' own video processor gives the same)

SMOLVLM_WORDS = [*CHATML_WORDS, "it", ":", "Frame", "from", "00", "01", "four", "frames", "video"]
# written by transformers 5.25 with torchvision: tiny_smolvlm_processor(tiny_smolvlm(), SMOLVLM_WORDS) with
# transformers' own SmolVLMVideoProcessor given hub-style video_sampling (8 frames at 2 fps), .save_pretrained(...)
SMOLVLM_FIXTURE = FIXTURES / "smolvlm"


def smolvlm_inputs(processor: Any, image: bool = True, metadata: bool = True) -> dict[str, Any]:
    """A conversation through SmolVLM's ``processor``: (``image``) a 32 x 32 image, then a video of four 37 x 29
    frames (resized twice: to a longest edge of 32, 32 x 26, then to the 32-pixel square), taken at 0, 0.5, 1 and 1.5
    seconds (METADATA; without ``metadata``, transformers' 24 frames per second)."""
    video_turn = {"role": "user", "content": [{"type": "video"}, {"type": "text", "text": " is it red ?"}]}
    messages = [video_turn] if not image else [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": " what is in the image ?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "a red circle"}]},
        video_turn,
    ]
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    # one sample holding one video (and one image): the nesting transformers 5.17's SmolVLM processor counts
    return processor(text=[text], images=[[frames(1, 32, 32, seed=5)[0]]] if image else None,
                     videos=[[frames(4, 37, 29, seed=6)]], video_metadata=METADATA if metadata else None,
                     return_tensors="pt")


def test_smolvlm_processor_takes_videos_and_round_trips(tmp_path):
    """Without torchvision SmolVLM's processor is transformers' class with pmod's frame video processor: each frame
    is one global image after its timestamp, videos of one call are padded to one length, a video runs through the
    model; saved, the folder loads back (pmod.loading.load_processor) to the same inputs, and pickles."""
    from pmod.processors import SmolVLMFrameVideoProcessor

    model = tiny_smolvlm()
    processor = tiny_smolvlm_processor(model, SMOLVLM_WORDS)
    if not has_torchvision():
        assert type(processor).__module__ == "pmod.processors" and type(processor).__name__ == "SmolVLMProcessor"
        assert type(processor.video_processor) is SmolVLMFrameVideoProcessor
    out = smolvlm_inputs(processor)
    words = " ".join(processor.tokenizer.convert_ids_to_tokens(out["input_ids"][0].tolist()))
    assert words.count("<image>") == 4 + 4 * 4 and words.count("<global-img>") == 1 + 4  # 4 tokens an image / frame
    frame = "<fake_token_around_image> <global-img> <image> <image> <image> <image> <fake_token_around_image>"
    assert words.count(f"Frame from 00 : 00 : {frame}") == 2 and words.count(f"Frame from 00 : 01 : {frame}") == 2
    assert out["pixel_values"].shape == (1, 4, 3, 32, 32) and out["pixel_attention_mask"].all()
    video = smolvlm_inputs(processor, image=False)
    with torch.no_grad():
        logits = model(**{k: v for k, v in video.items() if isinstance(v, torch.Tensor)}).logits
    assert logits.shape[:2] == video["input_ids"].shape and torch.isfinite(logits).all()
    padded = processor.video_processor([frames(4, 32, 32, seed=1), frames(2, 32, 32, seed=2)], return_tensors="pt")
    assert padded["pixel_values"].shape == (2, 4, 3, 32, 32) and not padded["pixel_values"][1, 2:].any()

    processor.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "processor_config.json").read_text())["video_processor"]
    assert saved["video_processor_type"] == "SmolVLMVideoProcessor"  # transformers' class, loadable by it
    loaded = load_processor(tmp_path)
    assert type(loaded).__name__ == "SmolVLMProcessor"
    assert type(loaded.video_processor) is type(processor.video_processor)
    assert loaded.video_processor.to_dict() == processor.video_processor.to_dict()
    assert_same_inputs(smolvlm_inputs(loaded), out)
    assert pickle.loads(pickle.dumps(loaded)).video_processor.to_dict() == processor.video_processor.to_dict()


def test_smolvlm_settings_are_read_as_transformers_reads_them():
    """SmolVLM2's hub configs give the video size and the sampling in ``video_sampling``: read as transformers reads
    it (a given size first), saved under transformers' names. The sampling settings come back from the processor's
    chat template and are ignored, as transformers ignores them without do_sample_frames; what the stand-in cannot
    do is refused."""
    from pmod.processors import SmolVLMFrameVideoProcessor

    hub = {"video_processor_type": "SmolVLMVideoProcessor", "resample": 1, "max_image_size": {"longest_edge": 384},
           "video_sampling": {"fps": 1, "max_frames": 64, "video_size": {"longest_edge": 1536}},
           "do_image_splitting": True, "image_mean": MEAN, "image_std": STD}
    video = SmolVLMFrameVideoProcessor.from_dict(hub)
    assert video.to_dict() == {
        "video_processor_type": "SmolVLMVideoProcessor", "size": {"longest_edge": 1536},
        "max_image_size": {"longest_edge": 384}, "resample": 1, "do_resize": True, "do_pad": True, "image_mean": MEAN,
        "image_std": STD, "do_sample_frames": False, "num_frames": 64, "fps": 1}
    assert SmolVLMFrameVideoProcessor.from_dict({**hub, "size": {"longest_edge": 768}}).size == {"longest_edge": 768}
    if has_torchvision():
        import transformers

        own = transformers.SmolVLMVideoProcessor(**{k: v for k, v in hub.items() if k != "video_processor_type"})
        assert (own.size, own.num_frames, own.fps) == (video.size, video.num_frames, video.fps)
    small = SmolVLMFrameVideoProcessor(size={"longest_edge": 32}, max_image_size={"longest_edge": 32})
    clip = [frames(3, 37, 29)]
    torch.testing.assert_close(small(clip, return_tensors="pt", num_frames=8, fps=2.0)["pixel_values"],
                               small(clip, return_tensors="pt")["pixel_values"], rtol=0, atol=0)
    bilinear = SmolVLMFrameVideoProcessor(size={"longest_edge": 32}, max_image_size={"longest_edge": 32}, resample=2)
    assert bilinear(clip)["pixel_values"].shape == (1, 3, 3, 32, 32)  # a filter torch's uint8 kernel lacks: PIL's
    with pytest.raises(PModInputError, match="already sampled"):
        small(clip, do_sample_frames=True, num_frames=2)
    with pytest.raises(PModInputError, match="max_image_size"):  # transformers' own would ignore it
        small(clip, max_image_size={"longest_edge": 64})
    with pytest.raises(PModInputError, match="same number of frames"):
        small([frames(3, 32, 32), frames(2, 32, 32)], do_pad=False)


def test_a_folder_saved_by_transformers_smolvlm_processor_loads():
    """A SmolVLM processor folder that transformers saved with its own (torchvision) video processor, hub-style
    video_sampling included, loads here (pmod's stand-in without torchvision, transformers' class with it) with the
    saved settings, to the same inputs as the processor built here."""
    from pmod.processors import SmolVLMFrameVideoProcessor

    saved = json.loads((SMOLVLM_FIXTURE / "processor_config.json").read_text())["video_processor"]
    loaded = load_processor(SMOLVLM_FIXTURE)
    built = tiny_smolvlm_processor(tiny_smolvlm(), SMOLVLM_WORDS)
    assert type(loaded).__name__ == "SmolVLMProcessor" and type(loaded.video_processor) is type(built.video_processor)
    settings = loaded.video_processor.to_dict()
    for setting in SmolVLMFrameVideoProcessor.settings:
        if setting in saved:
            assert json.loads(json.dumps(settings[setting])) == saved[setting], setting  # tuples as lists
    assert (loaded.video_processor.num_frames, loaded.video_processor.fps) == (8, 2)
    assert_same_inputs(smolvlm_inputs(loaded), smolvlm_inputs(built))


SMOLVLM_CASES = [  # settings over 32-pixel frames, the two videos' frame sizes and lengths
    ({}, [(32, 32), (32, 32)], (4, 4)),  # no resizing
    ({}, [(37, 29), (37, 29)], (4, 2)),  # two resizes (32 x 26, then the square); the shorter video padded
    ({}, [(20, 20), (64, 48)], (3, 3)),  # upscaled; two sizes in one call
    ({"resample": 3}, [(30, 40), (30, 40)], (4, 4)),  # bicubic
    ({"size": {"height": 30, "width": 20}}, [(37, 29), (37, 29)], (2, 2)),
    ({"size": {"longest_edge": 64}, "max_image_size": {"longest_edge": 28}}, [(100, 60), (100, 60)], (3, 3)),
    ({"do_resize": False}, [(20, 28), (24, 16)], (2, 3)),  # frames kept: padded to 24 x 28
    ({"do_pad": False}, [(37, 29), (37, 29)], (2, 2)),  # no mask
]


@pytest.mark.skipif(not has_torchvision(), reason="compares with transformers' video processors (torchvision code)")
@pytest.mark.parametrize("settings, sizes, lengths", SMOLVLM_CASES)
def test_smolvlm_stand_in_equals_transformers_own(settings, sizes, lengths):
    """pmod's SmolVLM stand-in and transformers' own video processor on the same frames: the same pixels bit for bit
    (both resize with torch's antialiased uint8 kernel and normalise in one float32 step) and the same
    pixel_attention_mask (over each video's own frame size, in padded frames too)."""
    import transformers

    from pmod.processors import SmolVLMFrameVideoProcessor

    crop = {"longest_edge": 32}
    frame = SmolVLMFrameVideoProcessor(**{"size": crop, "max_image_size": crop, "image_mean": MEAN, "image_std": STD,
                                          **settings})
    own = transformers.SmolVLMVideoProcessor(
        **{k: v for k, v in frame.to_dict().items() if k != "video_processor_type"})
    videos = [frames(n, *size, seed=i) for i, (n, size) in enumerate(zip(lengths, sizes))]
    ours, theirs = frame(videos, return_tensors="pt", video_metadata=METADATA * 2), own(videos, return_tensors="pt",
                                                                                      video_metadata=METADATA * 2)
    assert sorted(ours) == sorted([*theirs, "video_metadata"])  # transformers' returns metadata when asked
    for key in theirs:
        assert ours[key].dtype == theirs[key].dtype and torch.equal(ours[key], theirs[key]), key


@pytest.mark.skipif(not has_torchvision(), reason="compares with transformers' video processors (torchvision code)")
def test_smolvlm_processor_with_the_stand_in_gives_transformers_inputs(tmp_path):
    """The whole SmolVLM processor (text, image, video) with pmod's frame video processor in place of transformers'
    own: the same input_ids, timestamps included (with and without the frames' rate), the same pixels and mask;
    saved with the stand-in, the folder loads with transformers' own classes, with the same settings, to the same
    inputs."""
    from pmod.processors import SmolVLMFrameVideoProcessor

    processor = tiny_smolvlm_processor(tiny_smolvlm(), SMOLVLM_WORDS)
    own = processor.video_processor
    theirs = [smolvlm_inputs(processor), smolvlm_inputs(processor, metadata=False)]
    processor.video_processor = SmolVLMFrameVideoProcessor.from_dict(own.to_dict())
    ours = [smolvlm_inputs(processor), smolvlm_inputs(processor, metadata=False)]
    for mine, transformers_own in zip(ours, theirs):
        assert_same_inputs(mine, transformers_own)
    tokens = processor.tokenizer.convert_ids_to_tokens(ours[0]["input_ids"][0].tolist())
    assert "01" in tokens and "Frame" in tokens  # the timestamps are words: compared word by word
    processor.save_pretrained(tmp_path)
    loaded = load_processor(tmp_path)
    assert type(loaded.video_processor) is type(own)
    settings = SmolVLMFrameVideoProcessor.settings
    assert {k: v for k, v in loaded.video_processor.to_dict().items() if k in settings} == \
        {k: v for k, v in own.to_dict().items() if k in settings}
    assert_same_inputs(smolvlm_inputs(loaded), theirs[0])
