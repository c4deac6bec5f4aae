"""Video files in training and evaluation records: decoded with transformers' video loader (PyAV here), sampled at
the record's rate, and given to the processor exactly as the same frames from a folder are."""

import pytest
import torch

import pmod
import pmod.data.video
import pmod.pipelines.evaluate
from pmod.data.records import Encoder, LlavaDataset, check_records
from pmod.errors import PModInputError
from pmod.tiny import randomize_routers, tiny_qwen2_vl, tiny_qwen2_vl_processor
from tests.helpers.qwen_words import WORDS
from tests.helpers.videos import frame_index, write_clip, write_frames

QUESTION = [{"from": "human", "value": "<video>\nwhat colour is the circle ?"}, {"from": "gpt", "value": "red"}]


@pytest.mark.parametrize("container", ["avi", "mkv"])
def test_video_files_are_sampled_at_the_record_rate(container, tmp_path):
    codec = {"avi": ("png", "rgb24"), "mkv": ("ffv1", "bgr0")}[container]  # mkv: the frame count is counted
    clip = write_clip(tmp_path, f"clip.{container}", *codec)
    write_frames(tmp_path, "four", range(4))
    encoder = Encoder(tiny_qwen2_vl_processor(tiny_qwen2_vl(patch_size=7), WORDS, image_size=28), tmp_path)

    def taken(**fields):
        (frames,), (rate,) = encoder.video_frames({"id": "v", "video": clip, **fields})
        return [frame_index(f) for f in frames], rate

    assert taken(fps=2) == taken() == ([0, 2, 4, 6], 2.0)  # default: pmod.data.video.DEFAULT_VIDEO_FPS
    assert taken(fps=1) == ([0, 4], 1.0)
    assert taken(fps=30) == (list(range(8)), 4.0)
    assert taken(fps=2, max_frames=3) == ([0, 2, 5], 1.5)
    (frames,), (rate,) = encoder.video_frames({"id": "d", "video": "four", "fps": 2, "max_frames": 2})
    assert [frame_index(f) for f in frames] == [0, 2] and rate == 1.0  # frame folders too
    with pytest.raises(PModInputError, match="'max_frames' must be a positive integer"):
        encoder.video_frames({"id": "v", "video": clip, "max_frames": 0})


def test_a_video_file_gives_the_processor_inputs_of_its_frames_as_a_folder(setup, tmp_path):
    _, processor = setup
    clip = write_clip(tmp_path)
    encoder = Encoder(processor, tmp_path)
    for fps, indices in ((2, (0, 2, 4, 6)), (1, (0, 4))):
        folder = write_frames(tmp_path, f"at{fps}", indices)
        from_file = encoder.encode({"id": "f", "video": clip, "fps": fps, "conversations": QUESTION})
        from_folder = encoder.encode({"id": "d", "video": folder, "fps": fps, "conversations": QUESTION})
        assert from_file.keys() == from_folder.keys() and "pixel_values_videos" in from_file
        for key in from_file:
            assert torch.equal(from_file[key], from_folder[key]), key
        assert from_file["video_grid_thw"].tolist() == [[len(indices) // 2, 4, 4]]
        if "second_per_grid_ts" in from_file:  # Qwen2.5-VL: two frames per time step, at the sampled rate
            assert from_file["second_per_grid_ts"].tolist() == [2 / fps]
    # in the training dataset, among other videos: the same
    two = {"id": "2", "video": [clip, "at1"], "fps": 1, "conversations": [
        {"from": "human", "value": "<video> and <video> ?"}, {"from": "gpt", "value": "yes"}]}
    item = LlavaDataset([two], processor, tmp_path)[0]
    assert item["video_grid_thw"].tolist() == [[1, 4, 4], [1, 4, 4]]
    assert torch.equal(item["pixel_values_videos"][:16], item["pixel_values_videos"][16:])


def test_no_decoder_names_the_file_and_frame_videos_still_work(setup, tmp_path, monkeypatch):
    _, processor = setup
    (tmp_path / "clip.avi").write_bytes(b"\0")  # never decoded: no PyAV needed
    write_frames(tmp_path, "frames", (0, 2, 4, 6))
    from_file = {"id": "f", "video": "clip.avi", "conversations": QUESTION}
    from_folder = {"id": "d", "video": "frames", "conversations": QUESTION}
    monkeypatch.setattr(pmod.data.video, "video_backend", lambda: None)
    no_decoder = r"record 'f': cannot read the video file .*clip\.avi: no video decoder is installed; pip install av"
    with pytest.raises(PModInputError, match=no_decoder):
        check_records([from_folder, from_file], "train.json")  # before any model is loaded
    with pytest.raises(PModInputError, match=no_decoder):
        LlavaDataset([from_folder, from_file], processor, tmp_path)
    with pytest.raises(PModInputError, match=no_decoder):
        Encoder(processor, tmp_path).encode(from_file)
    check_records([from_folder])
    assert Encoder(processor, tmp_path).encode(from_folder)["video_grid_thw"].tolist() == [[2, 4, 4]]


def test_evaluation_answers_a_video_file_as_its_frame_folder(setup, tmp_path, monkeypatch):
    model, processor = setup
    clip = write_clip(tmp_path)
    write_frames(tmp_path, "frames", (0, 2, 4, 6))
    write_frames(tmp_path, "pair", (1, 7))
    records = [
        {"id": "f", "video": clip, "conversations": QUESTION},
        {"id": "d", "video": "frames", "conversations": QUESTION},
        # 3 of the clip's frames at 1.5 fps, and both frames of the pair at 2 fps: a rate per video
        {"id": "2", "video": [clip, "pair"], "max_frames": 3, "conversations": [
            {"from": "human", "value": "<video> and <video> ?"}, {"from": "gpt", "value": "yes"}]},
    ]
    suppress = list(range(5))  # <pad> <unk> <s> <|im_end|> <|im_start|>: every answer has its full length
    seen = []
    hook = model.register_forward_pre_hook(lambda m, a, kw: seen.append(kw.get("second_per_grid_ts")), with_kwargs=True)
    try:
        result = pmod.pipelines.evaluate.evaluate(model, processor, records, tmp_path, batch_size=3, max_new_tokens=3,
                                        progress=False, suppress_tokens=suppress)
    finally:
        hook.remove()
    file_answer, folder_answer, _ = result.records
    assert file_answer.prediction == folder_answer.prediction and len(file_answer.prediction.split()) == 3
    assert file_answer.flops_ratio == pytest.approx(folder_answer.flops_ratio) and file_answer.flops_ratio < 0.95
    if model.config.model_type.endswith("2_5_vl"):
        assert seen[0].tolist() == pytest.approx([1.0, 1.0, 2 / 1.5, 1.0])
    alone = pmod.pipelines.evaluate.evaluate(model, processor, records[2:], tmp_path, batch_size=1, max_new_tokens=3,
                                   progress=False, suppress_tokens=suppress)
    assert alone.records[0].prediction == result.records[2].prediction

    def no_generation(*args, **kwargs):
        raise AssertionError("generation started")

    monkeypatch.setattr(pmod.pipelines.evaluate, "generate_batch", no_generation)
    with pytest.raises(PModInputError, match=r"record 'f': video not found: .*missing\.mp4"):
        pmod.pipelines.evaluate.evaluate(model, processor, [records[1], {**records[0], "video": "missing.mp4"}],
                                         tmp_path)
    monkeypatch.setattr(pmod.data.video, "video_backend", lambda: None)
    with pytest.raises(PModInputError, match=r"record 'f': cannot read the video file .*clip\.avi: .*pip install av"):
        pmod.pipelines.evaluate.evaluate(model, processor, records, tmp_path)


def test_llava_onevision_answers_video_files_of_different_lengths_in_groups(tmp_path, monkeypatch):
    """LLaVA-OneVision stacks the videos of a call: a batch whose decoded videos differ in frame count is
    answered in groups of one count, as one by one."""
    from pmod.tiny import tiny_llava_onevision, tiny_llava_onevision_processor

    model = pmod.apply_pmod(tiny_llava_onevision(), pmod.PModConfig(schedule=[1.0, 1.0, 0.5, 0.5]))
    randomize_routers(model)
    processor = tiny_llava_onevision_processor(model, [*WORDS, "w1000", "w1001"])  # 2 placeholders: 2 more words
    records = [{"id": "long", "video": write_clip(tmp_path), "conversations": QUESTION},  # 4 frames at 2 fps
               {"id": "short", "video": write_clip(tmp_path, "short.avi", n=4), "conversations": QUESTION},  # 2 frames
               {"id": "long2", "video": "clip.avi", "conversations": QUESTION},
               {"id": "t", "conversations": [{"from": "human", "value": "what ?"}, {"from": "gpt", "value": "red"}]}]
    calls = []
    generate = model.generate
    monkeypatch.setattr(model, "generate", lambda **k: (calls.append(len(k["input_ids"])), generate(**k))[1])
    kwargs = {"max_new_tokens": 3, "progress": False, "suppress_tokens": list(range(5))}  # answers of 3 words
    batched = pmod.pipelines.evaluate.evaluate(model, processor, records, tmp_path, batch_size=4, **kwargs)
    assert calls == [2, 1, 1]  # long and long2; short; the text question
    alone = pmod.pipelines.evaluate.evaluate(model, processor, records, tmp_path, batch_size=1, **kwargs)
    assert [q.prediction for q in batched.records] == [q.prediction for q in alone.records]
    assert all(len(q.prediction.split()) == 3 for q in batched.records)
    assert [q.flops_ratio for q in batched.records] == pytest.approx([q.flops_ratio for q in alone.records])
