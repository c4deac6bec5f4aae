"""Families added through the family table, through the pipeline with transformers' own processors: labels cover only
the replies, a saved dense folder trains through `pmod train`'s entry point and learns, and its evaluation batched
equals one by one. Mistral 3's processor (PixtralProcessor) needs torchvision, so its cases run where torchvision is
installed (CI's torchvision venv, GPU machines); the others run everywhere (pmod's frame video processors stand in for
the torchvision ones). SmolVLM and Idefics3 split a 64-pixel image into 2 x 2 crops and a global image and keep a
32-pixel one whole."""

import json
from functools import partial

import pytest
import torch
from PIL import Image

from pmod.data.records import IGNORE_INDEX, Encoder, LlavaCollator
from pmod.processors import has_torchvision
from pmod.tiny import (
    tiny_gemma3,
    tiny_gemma3_processor,
    tiny_idefics3_processor,
    tiny_internvl,
    tiny_internvl_processor,
    tiny_llava_next_video,
    tiny_llava_next_video_processor,
    tiny_mistral3,
    tiny_mistral3_processor,
    tiny_smolvlm,
    tiny_smolvlm_processor,
)
from tests.helpers.llava_data import colour_records, write_records

WORDS = "user assistant what is in the image ? a red blue green circle colour yes no".split()
FAMILIES = {
    "gemma3": (tiny_gemma3, tiny_gemma3_processor, "pmod_gemma3"),
    "mistral3": (tiny_mistral3, tiny_mistral3_processor, "pmod_mistral3"),
    "internvl": (tiny_internvl, tiny_internvl_processor, "pmod_internvl"),
    "llava_next_video": (tiny_llava_next_video, tiny_llava_next_video_processor, "pmod_llava_next_video"),
    "smolvlm": (tiny_smolvlm, tiny_smolvlm_processor, "pmod_smolvlm"),
    "idefics3": (partial(tiny_smolvlm, version="idefics3"), tiny_idefics3_processor, "pmod_idefics3"),
}
NEED_TORCHVISION = {"mistral3"}
VIDEO = {"internvl", "llava_next_video"}  # families whose processors take videos
# processors that keep an image's size and cut one larger than the model's 32-pixel crop into crops and a global image
SPLIT = {"smolvlm", "idefics3"}
CASES = [pytest.param(name, marks=pytest.mark.skipif(name in NEED_TORCHVISION and not has_torchvision(),
                                                       reason="its processor needs torchvision")) for name in FAMILIES]


@pytest.mark.parametrize("family", CASES)
def test_labels_cover_only_the_replies_and_batches_equal_items(family, tmp_path):
    build, processor_of, _ = FAMILIES[family]
    model = build()
    processor = processor_of(model, WORDS)
    Image.new("RGB", (64, 64) if family in SPLIT else (32, 32), (200, 20, 20)).save(tmp_path / "a.png")
    Image.new("RGB", (32, 24), (20, 200, 20)).save(tmp_path / "b.png")
    records = [
        {"id": "1", "image": "a.png", "conversations": [
            {"from": "human", "value": "<image>\nwhat is in the image ?"}, {"from": "gpt", "value": "a red circle"},
            {"from": "human", "value": "is it blue ?"}, {"from": "gpt", "value": "no , red"}]},
        {"id": "2", "image": "b.png", "conversations": [
            {"from": "human", "value": "<image>\nwhat colour ?"}, {"from": "gpt", "value": "green"}]},
        {"id": "3", "conversations": [
            {"from": "human", "value": "what is a circle ?"}, {"from": "gpt", "value": "a colour"}]},
    ]
    encoder = Encoder(processor, tmp_path)
    items = [encoder.encode(r) for r in records]
    trained = processor.tokenizer.convert_ids_to_tokens(items[0]["labels"][items[0]["labels"] != IGNORE_INDEX].tolist())
    # a word outside the vocabulary (",") is trained as the unknown token, not taken for a placeholder
    assert trained == ["a", "red", "circle", "<|im_end|>", "no", "<unk>", "red", "<|im_end|>"]
    n_image = int((items[0]["input_ids"] == model.config.image_token_id).sum())
    # Gemma 3: 4 pooled tokens; Pixtral: 4 x 4 merged patches; InternVL: 4 a tile, one tile (a square image)
    # LLaVA-NeXT-Video: the base grid and the anyres tiles of its best pinpoint, with newlines
    # SmolVLM / Idefics3: 4 a crop, 2 x 2 crops (a 64-pixel image; the 32 x 24 one is not split) and the global image
    assert n_image == {"gemma3": 4, "mistral3": 16, "internvl": 4, "smolvlm": 20, "idefics3": 20}.get(
        family, n_image) and n_image > 0
    collator = LlavaCollator(pad_token_id=0)
    with torch.no_grad():
        batch_loss = model(**collator(items)).loss
        per_item = [model(**collator([item])).loss for item in items]
    counts = [int((item["labels"][1:] != IGNORE_INDEX).sum()) for item in items]
    weighted = sum(loss * n for loss, n in zip(per_item, counts)) / sum(counts)
    torch.testing.assert_close(batch_loss, weighted, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", CASES)
def test_training_a_saved_dense_folder_learns_and_evaluates(family, tmp_path):
    from pmod.loading import load_pretrained, load_processor
    from pmod.pipelines.evaluate import evaluate
    from pmod.pipelines.recipe import TrainConfig
    from pmod.pipelines.train import train

    build, processor_of, model_type = FAMILIES[family]
    dense = build()
    dense.save_pretrained(tmp_path / "dense")
    processor_of(dense, WORDS).save_pretrained(tmp_path / "dense")
    path = write_records(tmp_path, colour_records(tmp_path, n=48, size=32))
    if family in SPLIT:  # every third image twice the crop's size: split into 2 x 2 crops, the others not
        for i in range(0, 48, 3):
            image = tmp_path / f"img/{i}.png"
            Image.open(image).resize((64, 64)).save(image)
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
    assert model.config.model_type == model_type
    processor = load_processor(tmp_path / "out")
    records = json.loads(path.read_text())[:7] + [
        {"id": "t", "conversations": [{"from": "human", "value": "what is a circle ?"}, {"from": "gpt", "value": "a"}]}]
    if family in VIDEO:  # a video record too: four frames of a circle fading
        (tmp_path / "clip").mkdir()
        for i in range(4):
            Image.new("RGB", (32, 32), (200 - 30 * i, 20, 20)).save(tmp_path / "clip" / f"{i:03d}.png")
        records.insert(3, {"id": "v", "video": "clip", "fps": 2.0, "conversations": [
            {"from": "human", "value": "<video>\nwhat colour is the circle ?"}, {"from": "gpt", "value": "red"}]})
    batched = evaluate(model, processor, records, tmp_path, batch_size=5, max_new_tokens=3, progress=False)
    alone = evaluate(model, processor, records, tmp_path, batch_size=1, max_new_tokens=3, progress=False)
    assert [q.prediction for q in batched.records] == [q.prediction for q in alone.records]
    assert batched.flops_ratio < 1.0 and batched.records[-1].flops_ratio == pytest.approx(1.0, abs=0.02)
    if family in VIDEO:
        assert batched.records[3].id == "v" and batched.records[3].flops_ratio < 0.95  # the video's tokens are routed
