"""LLaVA-OneVision through the pipeline with its own processor (anyres images, frame videos) and a ChatML
template: the processor's token counts match the model's features, labels, batches, training."""

import json

import pytest
import torch
from PIL import Image

import pmod
from pmod.data.records import IGNORE_INDEX, Encoder, LlavaCollator, LlavaDataset
from pmod.errors import PModInputError
from pmod.loading import load_processor
from pmod.tiny import randomize_routers, tiny_llava_onevision, tiny_llava_onevision_processor
from tests.helpers.llava_data import colour_records, write_records

WORDS = "user assistant what is in the image video ? a red blue green circle colour yes no".split()


@pytest.fixture(scope="module")
def setup():
    model = pmod.apply_pmod(tiny_llava_onevision(), pmod.PModConfig(schedule=[1.0, 1.0, 0.5, 0.5]))
    randomize_routers(model)
    return model, tiny_llava_onevision_processor(model, WORDS)


def _frames(folder, name, n):
    (folder / name).mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.new("RGB", (40, 30), (200 - 30 * i, 20, 20)).save(folder / name / f"{i:03d}.png")
    return name


def test_processor_token_counts_match_the_model_and_round_trip(setup, tmp_path):
    """The forward itself checks that placeholders equal features: anyres images of several sizes and a video."""
    model, processor = setup
    images = [Image.new("RGB", size, (10, 200, 10)) for size in ((28, 28), (56, 28), (50, 61))]
    texts = ["<|im_start|>user\n<image>\nwhat is in the image ?<|im_end|>\n" for _ in images]
    texts.append("<|im_start|>user\n<video>\nwhat is in the video ?<|im_end|>\n")
    video = [Image.new("RGB", (40, 30), (200, 20, 20 * i)) for i in range(4)]
    inputs = processor(text=texts, images=images, videos=[video], return_tensors="pt", padding=True)
    assert inputs["pixel_values_videos"].shape == (1, 4, 3, 28, 28)
    with torch.no_grad():
        out = model(**{k: v for k, v in inputs.items() if k != "batch_num_images"})
    assert torch.isfinite(out.logits).all()
    r = model.routing()[2]
    n_video = int((inputs["input_ids"][3] == model.config.video_token_id).sum())
    assert n_video == 4 * 2 * 2 + 1  # 4 frames of 4 x 4 features pooled to 2 x 2, one newline
    assert int(r.target[3].sum()) == n_video and int(r.selected[3].sum()) == n_video // 2
    processor.save_pretrained(tmp_path)
    again = load_processor(tmp_path)(text=texts, images=images, videos=[video], return_tensors="pt", padding=True)
    for key, value in inputs.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(again[key], value), key


def test_image_and_video_records_train_on_replies_and_batch_exactly(setup, tmp_path):
    model, processor = setup
    Image.new("RGB", (56, 28), (20, 20, 200)).save(tmp_path / "wide.png")
    records = [
        {"id": "i", "image": "wide.png", "conversations": [
            {"from": "human", "value": "<image>\nwhat colour is the circle ?"}, {"from": "gpt", "value": "blue"}]},
        {"id": "v", "video": _frames(tmp_path, "clip", 4), "conversations": [
            {"from": "human", "value": "<video>\nwhat colour is the circle ?"},
            {"from": "gpt", "value": "red circle"}]},
        {"id": "t", "conversations": [
            {"from": "human", "value": "what is a circle ?"}, {"from": "gpt", "value": "a colour"}]},
    ]
    item = Encoder(processor, tmp_path).encode(records[1])
    trained = processor.tokenizer.convert_ids_to_tokens(item["labels"][item["labels"] != IGNORE_INDEX].tolist())
    assert trained == ["red", "circle", "<|im_end|>"]
    dataset = LlavaDataset(records, processor, tmp_path)
    items = [dataset[i] for i in range(3)]
    collator = LlavaCollator(pad_token_id=processor.tokenizer.pad_token_id)
    with torch.no_grad():
        loss = model(**collator(items)).loss
        per_item = [model(**collator([it])) for it in items]
    counts = [int((it["labels"][1:] != IGNORE_INDEX).sum()) for it in items]
    torch.testing.assert_close(loss, sum(o.loss * c for o, c in zip(per_item, counts)) / sum(counts), rtol=1e-5,
                               atol=1e-5)
    short = Encoder(processor, tmp_path).encode({**records[1], "id": "v3",
                                                 "video": [f"clip/{i:03d}.png" for i in range(3)]})
    with pytest.raises(PModInputError, match="same number of frames"):
        collator([items[1], short])


def test_training_learns_and_the_saved_model_evaluates(tmp_path):
    from pmod.loading import load_pretrained
    from pmod.pipelines.evaluate import evaluate
    from pmod.pipelines.recipe import TrainConfig
    from pmod.pipelines.train import train

    folder = tmp_path / "data"
    path = write_records(folder, colour_records(folder, n=48))
    result = train(TrainConfig(
        output_dir=str(tmp_path / "out"), tiny_model={"arch": "llava-onevision", "num_layers": 4, "hidden_size": 64},
        pmod={}, data_path=str(path), image_folder=str(folder), freeze_vision_tower=False,
        trainer={"learning_rate": 5e-3, "per_device_train_batch_size": 8, "max_steps": 24, "logging_steps": 1,
                 "save_steps": 100, "warmup_steps": 0, "report_to": []},
    ))
    first, last = sum(result.losses[:3]) / 3, sum(result.losses[-3:]) / 3
    assert last < 0.6 * first, result.losses
    model = load_pretrained(tmp_path / "out")
    assert model.config.model_type == "pmod_llava_onevision"
    records = json.loads(path.read_text())[:6]
    _frames(folder, "clip", 4)  # video questions batched with image and text ones (one frame count per batch)
    video = {"video": "clip", "conversations": [
        {"from": "human", "value": "<video>\nwhat colour is the circle ?"}, {"from": "gpt", "value": "red"}]}
    text = {"id": "t", "conversations": [
        {"from": "human", "value": "what is a circle ?"}, {"from": "gpt", "value": "red"}]}
    records[1:1] = [{**video, "id": "v1"}, text]
    records.append({**video, "id": "v2"})
    processor = load_processor(tmp_path / "out")
    batched = evaluate(model, processor, records, folder, batch_size=4, max_new_tokens=3,
                       suppress_tokens=[0, 1, 2, 3, 4])
    alone = evaluate(model, processor, records, folder, batch_size=1, max_new_tokens=3, suppress_tokens=[0, 1, 2, 3, 4])
    assert [q.prediction for q in batched.records] == [q.prediction for q in alone.records]
    assert all(len(q.prediction.split()) == 3 for q in batched.records)
    assert batched.records[1].flops_ratio < 1.0 and batched.records[-1].flops_ratio < 1.0
    # videos of different frame counts in one batch: answered in groups of one count (LLaVA-OneVision stacks the
    # videos of a call), as one by one
    short = {**video, "id": "v3", "video": [f"clip/{i:03d}.png" for i in range(3)]}
    mixed = [records[1], short]
    kwargs = {"max_new_tokens": 3, "suppress_tokens": [0, 1, 2, 3, 4], "progress": False}
    together = evaluate(model, processor, mixed, folder, batch_size=2, **kwargs)
    one_by_one = evaluate(model, processor, mixed, folder, batch_size=1, **kwargs)
    assert [q.prediction for q in together.records] == [q.prediction for q in one_by_one.records]


@pytest.mark.parametrize("aspect", ["anyres_max_9", "anyres_max_1"])
def test_kept_token_maps_match_the_processor_and_the_model(aspect, tmp_path):
    """The layout's token count equals the processor's and the model's for several image sizes, including a
    high-res grid interpolated down (anyres_max_1 caps it at one base grid)."""
    from pmod.pipelines.viz import kept_token_maps, vision_layout, visualize

    dense = tiny_llava_onevision()
    dense.config.vision_aspect_ratio = aspect
    model = pmod.apply_pmod(dense, pmod.PModConfig(schedule=[1.0, 1.0, 0.5, 0.5]))
    randomize_routers(model)
    processor = tiny_llava_onevision_processor(model, WORDS)
    interpolated = False
    for size in ((28, 28), (56, 28), (50, 61), (56, 56)):  # (width, height)
        image = Image.new("RGB", size, (10, 200, 10))
        inputs = processor(text=["<|im_start|>user\n<image>\nwhat is in the image ?<|im_end|>\n"], images=[image],
                           return_tensors="pt")
        with torch.no_grad():
            model(**{k: v for k, v in inputs.items() if k != "batch_num_images"})
        maps = kept_token_maps(model, input_ids=inputs["input_ids"], image_sizes=inputs["image_sizes"])
        layout = vision_layout(model.config, (size[1], size[0]))
        assert maps[2].total == layout.num_tokens == int((inputs["input_ids"] == model.config.image_token_id).sum())
        assert maps[2].highres.shape == layout.highres and maps[2].kept == layout.num_tokens // 2
        interpolated |= layout.highres[0] * layout.highres[1] < (size[1] // 7) * (size[0] // 7) // 2
    assert interpolated == (aspect == "anyres_max_1")
    visualize(model, processor, Image.new("RGB", (50, 61), (200, 10, 10)), "what is in the image ?", tmp_path / "r.png")
    assert (tmp_path / "r.png").stat().st_size > 1000
