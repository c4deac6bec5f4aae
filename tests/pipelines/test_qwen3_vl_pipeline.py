"""Qwen3-VL through the pipeline with its processor (transformers' own where torchvision is installed, with pmod's frame
video processor where it is not): labels, training a saved dense folder, evaluation of image, video and text records
batched = one by one. A processor that needs torchvision where it is missing is refused with what to install."""

import json

import pytest
import torch
import transformers
from PIL import Image

import pmod
from pmod.data.records import IGNORE_INDEX, Encoder, LlavaCollator
from pmod.errors import PModInputError
from pmod.tiny import randomize_routers, tiny_qwen3_vl
from tests.helpers.llava_data import colour_records, write_records

WORDS = "user assistant what is in the image video ? a red blue green circle colour moves yes no".split()
WORDS += [f"w{i}" for i in range(128 - 4 - 5 - len(WORDS))]  # every id decodes to a word (4 placeholders, 5 specials)
# transformers' Qwen3VLProcessor without get_text_with_replacements (5.17) keeps the chat template's own
# <|vision_start|> ... <|vision_end|> around a video's frames, which it wraps again one by one: a start more than frames
wraps_frames_twice = pytest.mark.skipif(
    "get_text_with_replacements" not in vars(transformers.Qwen3VLProcessor),
    reason="this transformers' Qwen3VLProcessor wraps a video's frames in one more <|vision_start|> (3 for 2 frames)")


def _processor(model):
    from pmod.tiny import tiny_qwen3_vl_processor

    return tiny_qwen3_vl_processor(model, WORDS, image_size=28)


def _frames(folder, name, n, colour=(200, 20, 20)):
    (folder / name).mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.new("RGB", (28, 28), tuple(max(0, c - 20 * i) for c in colour)).save(folder / name / f"{i:03d}.png")
    return name


@wraps_frames_twice
def test_labels_cover_only_the_replies_and_batches_equal_items(tmp_path):
    model = pmod.apply_pmod(tiny_qwen3_vl(patch_size=7), pmod.PModConfig(schedule=[1.0, 1.0, 0.5, 0.5]))
    randomize_routers(model)
    processor = _processor(model)
    Image.new("RGB", (28, 28), (200, 20, 20)).save(tmp_path / "a.png")
    records = [
        {"id": "1", "image": "a.png", "conversations": [
            {"from": "human", "value": "<image>\nwhat is in the image ?"}, {"from": "gpt", "value": "a red circle"},
            {"from": "human", "value": "is it blue ?"}, {"from": "gpt", "value": "no"}]},
        {"id": "2", "video": _frames(tmp_path, "clip", 4), "fps": 2.0, "conversations": [
            {"from": "human", "value": "<video>\nwhat colour is the circle ?"}, {"from": "gpt", "value": "red"}]},
        {"id": "3", "conversations": [
            {"from": "human", "value": "what is a circle ?"}, {"from": "gpt", "value": "a colour"}]},
    ]
    encoder = Encoder(processor, tmp_path)
    items = [encoder.encode(r) for r in records]
    tokens = processor.tokenizer.convert_ids_to_tokens(items[0]["labels"][items[0]["labels"] != IGNORE_INDEX].tolist())
    assert tokens == ["a", "red", "circle", "<|im_end|>", "no", "<|im_end|>"]
    ids = items[1]["input_ids"]
    starts = (ids == model.config.vision_start_token_id).sum()
    assert starts == 2 and (ids == model.config.video_token_id).sum() == 8  # two frames (4 / temporal 2), 4 tokens each
    collator = LlavaCollator(pad_token_id=0)
    with torch.no_grad():
        batch_loss = model(**collator(items)).loss
        per_item = [model(**collator([item])).loss for item in items]
    counts = [int((item["labels"][1:] != IGNORE_INDEX).sum()) for item in items]  # the loss averages over tokens
    weighted = sum(loss * n for loss, n in zip(per_item, counts)) / sum(counts)
    torch.testing.assert_close(batch_loss, weighted, rtol=1e-5, atol=1e-5)


def test_training_a_saved_dense_folder_learns_and_evaluates(tmp_path):
    from pmod.loading import load_pretrained, load_processor
    from pmod.pipelines.evaluate import evaluate
    from pmod.pipelines.recipe import TrainConfig
    from pmod.pipelines.train import train

    dense = tiny_qwen3_vl(patch_size=7)
    dense.save_pretrained(tmp_path / "dense")
    _processor(dense).save_pretrained(tmp_path / "dense")
    path = write_records(tmp_path, colour_records(tmp_path, n=48))
    result = train(TrainConfig(
        output_dir=str(tmp_path / "out"), model_name_or_path=str(tmp_path / "dense"), pmod={}, data_path=str(path),
        image_folder=str(tmp_path), freeze_vision_tower=False,
        trainer={"learning_rate": 5e-3, "per_device_train_batch_size": 8, "max_steps": 24, "logging_steps": 1,
                 "save_steps": 100, "warmup_steps": 0, "report_to": []},
    ))
    first, last = sum(result.losses[:3]) / 3, sum(result.losses[-3:]) / 3
    assert last < 0.6 * first, result.losses
    assert {"language_model", "vision_tower", "projector", "router"} <= set(result.trainable_parameters)
    model = load_pretrained(tmp_path / "out")
    assert model.config.model_type == "pmod_qwen3_vl"
    processor = load_processor(tmp_path / "out")
    _frames(tmp_path, "clip", 4)
    records = json.loads(path.read_text())[:6] + [
        {"id": "v", "video": "clip", "fps": 2.0, "conversations": [
            {"from": "human", "value": "<video>\nwhat colour is the circle ?"}, {"from": "gpt", "value": "red"}]},
        {"id": "t", "conversations": [{"from": "human", "value": "what is a circle ?"}, {"from": "gpt", "value": "a"}]},
    ]
    batched = evaluate(model, processor, records, tmp_path, batch_size=5, max_new_tokens=3, progress=False)
    alone = evaluate(model, processor, records, tmp_path, batch_size=1, max_new_tokens=3, progress=False)
    assert [q.prediction for q in batched.records] == [q.prediction for q in alone.records]
    assert batched.flops_ratio < 1.0 and batched.records[6].flops_ratio < 0.95


def test_without_torchvision_the_processor_is_refused_with_what_to_install(tmp_path, monkeypatch):
    import transformers

    from pmod.loading import load_processor

    def missing(*args, **kwargs):
        raise ImportError("\nQwen3VLVideoProcessor requires the Torchvision library but it was not found in your "
                          "environment.")

    monkeypatch.setattr(transformers.AutoProcessor, "from_pretrained", missing)
    monkeypatch.setattr("pmod.processors.load_video_model_processor", lambda path: None)
    with pytest.raises(PModInputError, match=r"needs torchvision \(Qwen3VLVideoProcessor is torchvision code\): "
                                             r"pip install torchvision"):
        load_processor(tmp_path)


def test_a_processor_missing_another_package_says_which(tmp_path, monkeypatch):
    import transformers

    from pmod.loading import load_processor

    def missing(*args, **kwargs):  # SmolVLM's processor spells numbers with num2words
        raise ImportError("Package `num2words` is required to run SmolVLM processor. Install it with "
                          "`pip install num2words`.")

    monkeypatch.setattr(transformers.AutoProcessor, "from_pretrained", missing)
    monkeypatch.setattr("pmod.processors.load_video_model_processor", lambda path: None)
    with pytest.raises(PModInputError, match="needs a package that is not installed: .*pip install num2words"):
        load_processor(tmp_path)
