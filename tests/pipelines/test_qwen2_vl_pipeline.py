"""Qwen2-VL / Qwen2.5-VL through the pipeline with their own processor and ChatML template: labels, video
records, training, evaluation, kept-token maps."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from pmod.data.records import IGNORE_INDEX, Encoder, LlavaCollator, LlavaDataset
from pmod.errors import PModInputError
from pmod.tiny import tiny_qwen2_vl, tiny_qwen2_vl_processor
from tests.helpers.llava_data import colour_records, write_records
from tests.helpers.qwen_words import WORDS


def _tokens(processor, ids):
    return processor.tokenizer.convert_ids_to_tokens([int(t) for t in ids])


def _frames(folder, name, n, colour=(200, 20, 20)):
    (folder / name).mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.new("RGB", (28, 28), tuple(max(0, c - 20 * i) for c in colour)).save(folder / name / f"{i:03d}.png")
    return name


def test_labels_cover_only_the_replies_with_the_chatml_template(setup, tmp_path):
    model, processor = setup
    Image.new("RGB", (28, 28), (200, 20, 20)).save(tmp_path / "a.png")
    record = {"id": "1", "image": "a.png", "conversations": [
        {"from": "human", "value": "<image>\nwhat is in the image ?"}, {"from": "gpt", "value": "a red circle"},
        {"from": "human", "value": "is it blue ?"}, {"from": "gpt", "value": "no"}]}
    item = Encoder(processor, tmp_path).encode(record)
    tokens = _tokens(processor, item["input_ids"])
    start = tokens.index("<|vision_start|>")
    assert tokens[start + 1 : start + 5] == ["<|image_pad|>"] * 4 and tokens[start + 5] == "<|vision_end|>"
    trained = _tokens(processor, item["labels"][item["labels"] != IGNORE_INDEX])
    assert trained == ["a", "red", "circle", "<|im_end|>", "no", "<|im_end|>"]  # the template's own end token
    assert torch.equal(item["mm_token_type_ids"] == 1, item["input_ids"] == model.config.image_token_id)
    assert item["pixel_values"].shape == (16, 3 * 2 * 7 * 7) and item["image_grid_thw"].tolist() == [[1, 4, 4]]


def test_video_records_from_frame_folders_and_lists(setup, tmp_path):
    model, processor = setup
    records = [
        {"id": "v1", "video": _frames(tmp_path, "clip", 4), "conversations": [
            {"from": "human", "value": "<video>\nwhat colour is the circle ?"}, {"from": "gpt", "value": "red"}]},
        {"id": "v2", "video": [f"clip/{i:03d}.png" for i in range(3)], "conversations": [  # no placeholder: added
            {"from": "human", "value": "what colour is the circle ?"}, {"from": "gpt", "value": "red"}]},
    ]
    encoder = Encoder(processor, tmp_path)
    a, b = encoder.encode(records[0]), encoder.encode(records[1])
    for item, steps in ((a, 2), (b, 2)):  # 4 frames -> 2 time steps; 3 frames -> the last repeated -> 2
        assert int((item["input_ids"] == model.config.video_token_id).sum()) == steps * 4
        assert item["video_grid_thw"].tolist() == [[steps, 4, 4]]
        assert _tokens(processor, item["labels"][item["labels"] != IGNORE_INDEX]) == ["red", "<|im_end|>"]
    # the listed first three frames are the folder's first three: the same first time step
    torch.testing.assert_close(a["pixel_values_videos"][:16], b["pixel_values_videos"][:16])
    with pytest.raises(PModInputError, match=r"video not found: .*clip\.mp4 \(a video file or a folder of frames\)"):
        encoder.encode({**records[0], "video": "clip.mp4"})  # video files: tests/data/test_video_files.py
    with pytest.raises(PModInputError, match="placeholders but 1 videos"):
        encoder.encode({**records[0], "conversations": [{"from": "human", "value": "<video><video> ?"},
                                                        {"from": "gpt", "value": "red"}]})


def test_mixed_batch_loss_equals_one_by_one(setup, tmp_path):
    """Image, video and text-only records collated (right padding, modality types padded): loss == per item."""
    model, processor = setup
    Image.new("RGB", (28, 56), (20, 20, 200)).save(tmp_path / "wide.png")
    records = [
        {"id": "i", "image": "wide.png", "conversations": [
            {"from": "human", "value": "<image>\nwhat colour is the circle ?"}, {"from": "gpt", "value": "blue"}]},
        {"id": "v", "video": _frames(tmp_path, "clip", 3), "conversations": [
            {"from": "human", "value": "<video>\nwhat colour is the circle ?"},
            {"from": "gpt", "value": "red circle"}]},
        {"id": "t", "conversations": [
            {"from": "human", "value": "what is a circle ?"}, {"from": "gpt", "value": "a colour"}]},
    ]
    dataset = LlavaDataset(records, processor, tmp_path)
    items = [dataset[i] for i in range(3)]
    collator = LlavaCollator(pad_token_id=processor.tokenizer.pad_token_id)
    batch = collator(items)
    with torch.no_grad():
        loss = model(**batch).loss
        per_item = [model(**collator([item])) for item in items]
    counts = [int((item["labels"][1:] != IGNORE_INDEX).sum()) for item in items]
    expected = sum(o.loss * c for o, c in zip(per_item, counts)) / sum(counts)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("qdata")
    return write_records(folder, colour_records(folder, n=48)), folder


def _config(data, out, version="2", **overrides):
    from pmod.pipelines.recipe import TrainConfig

    path, folder = data
    values = dict(
        output_dir=str(out), tiny_model={"arch": f"qwen{version}-vl", "num_layers": 4, "hidden_size": 64,
                                         "patch_size": 7, "image_size": 28},
        pmod={}, data_path=str(path), image_folder=str(folder), freeze_vision_tower=False,
        trainer={"learning_rate": 5e-3, "per_device_train_batch_size": 8, "max_steps": 24, "logging_steps": 1,
                 "save_steps": 100, "warmup_steps": 0, "report_to": []},
    )
    values.update(overrides)
    return TrainConfig(**values)


@pytest.mark.parametrize("version", ["2", "2.5"])
def test_training_learns_saves_and_evaluates(data, tmp_path, version):
    from pmod.loading import load_pretrained, load_processor
    from pmod.pipelines.evaluate import evaluate
    from pmod.pipelines.train import train

    result = train(_config(data, tmp_path, version))
    first, last = sum(result.losses[:3]) / 3, sum(result.losses[-3:]) / 3
    assert last < 0.6 * first, result.losses
    assert {"language_model", "vision_tower", "projector", "router"} <= set(result.trainable_parameters)
    model = load_pretrained(tmp_path)
    assert model.config.model_type == ("pmod_qwen2_vl" if version == "2" else "pmod_qwen2_5_vl")
    processor = load_processor(tmp_path)
    records = json.loads(data[0].read_text())[:12]
    batched = evaluate(model, processor, records, data[1], batch_size=5, max_new_tokens=3)
    alone = evaluate(model, processor, records, data[1], batch_size=1, max_new_tokens=3)
    assert [q.prediction for q in batched.records] == [q.prediction for q in alone.records]
    assert batched.accuracy == alone.accuracy and batched.flops_ratio < 1.0


def test_stages_freeze_qwen_parts(data, tmp_path):
    from pmod.pipelines.train import build_model, set_trainable

    model, _ = build_model(_config(data, tmp_path), json.loads(data[0].read_text()))
    assert set(set_trainable(model, "pretrain")) == {"projector"}
    assert all(p.requires_grad == (".visual.merger." in n) for n, p in model.named_parameters())
    counts = set_trainable(model, "finetune", freeze_vision_tower=True)
    assert "vision_tower" not in counts and {"language_model", "projector", "router"} <= set(counts)
    assert not any(p.requires_grad for n, p in model.named_parameters() if ".visual.blocks." in n)


def test_kept_token_maps_follow_the_merged_grid(setup):
    """The layout claim behind the maps: the processor orders an image's patches by merged cell in raster order.
    Decoded from an image whose pixels encode their own row and column."""
    from pmod.pipelines.viz import kept_token_maps, vision_layout

    model, processor = setup
    h, w = 28, 56
    rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    picture = np.stack([rows * 4, cols * 4, np.zeros_like(rows)], -1).astype(np.uint8)
    image = Image.fromarray(picture)
    processor.image_processor.size = {"shortest_edge": h * w, "longest_edge": h * w}  # keep 28 x 56
    try:
        text = "<|vision_start|><|image_pad|><|vision_end|> what is in the image ?"
        inputs = processor(text=[text], images=[image], return_tensors="pt")
    finally:
        processor.image_processor.size = {"shortest_edge": 28 * 28, "longest_edge": 28 * 28}
    layout = vision_layout(model.config, grid_thw=inputs["image_grid_thw"][0])
    assert layout.base == (2, 4) and layout.num_tokens == 8
    ip = processor.image_processor
    mean, std = np.array(ip.image_mean), np.array(ip.image_std)
    patches = inputs["pixel_values"].numpy().reshape(8, 4, 3, 2, 7, 7)  # (token, 2x2 cell, C, t, p, p)
    red = (patches[:, :, 0] * std[0] + mean[0]) * 255 / 4  # back to pixel rows
    green = (patches[:, :, 1] * std[1] + mean[1]) * 255 / 4
    for token in range(8):  # token k covers rows 14 * (k // 4) ..., columns 14 * (k % 4) ...
        assert 14 * (token // 4) <= red[token].mean() < 14 * (token // 4 + 1)
        assert 14 * (token % 4) <= green[token].mean() < 14 * (token % 4 + 1)
    with torch.no_grad():
        model(**inputs)
    maps = kept_token_maps(model, input_ids=inputs["input_ids"], image_grid_thw=inputs["image_grid_thw"])
    selected = model.routing()[2].selected[0][inputs["input_ids"][0] == model.config.image_token_id]
    assert maps[2].base.shape == (2, 4) and np.array_equal(maps[2].base.ravel(), selected.numpy())
    assert maps[2].kept == 4
    with pytest.raises(PModInputError, match="image_grid_thw"):
        kept_token_maps(model, input_ids=inputs["input_ids"])


def test_video_record_forms_frame_order_and_literal_video_text(setup, tmp_path):
    from pmod.data.conversation import to_messages, video_sources

    model, processor = setup
    (tmp_path / "ff").mkdir()
    for i, shade in ((1, 10), (2, 120), (10, 250)):  # ffmpeg's %d.png names: 10 must come last
        Image.new("RGB", (28, 28), (shade, shade, shade)).save(tmp_path / "ff" / f"{i}.png")
    encoder = Encoder(processor, tmp_path)
    frames = encoder.videos({"id": "n", "video": "ff"})[0]
    assert [f.getpixel((0, 0))[0] for f in frames] == [10, 120, 250]
    _frames(tmp_path, "clip", 2)
    two = {"id": "2", "video": ["ff", "clip"], "conversations": [
        {"from": "human", "value": "<video> and <video> ?"}, {"from": "gpt", "value": "yes"}]}
    assert video_sources(two) == ["ff", "clip"]  # folders, one per video
    item = encoder.encode(two)
    assert item["video_grid_thw"].tolist() == [[2, 4, 4], [1, 4, 4]]
    assert video_sources({"video": ["ff/1.png", "ff/2.png"]}) == [["ff/1.png", "ff/2.png"]]  # frames of one video
    with pytest.raises(PModInputError, match="list of frame files"):
        video_sources({"id": "m", "video": ["ff", "ff/1.png"]})
    # in a record without videos "<video>" is text (e.g. about HTML), not a placeholder
    text = {"id": "t", "conversations": [
        {"from": "human", "value": "what is <video> ?"}, {"from": "gpt", "value": "a tag"}]}
    assert to_messages(text)[0]["content"] == [{"type": "text", "text": "what is <video> ?"}]


def test_qwen2_5_vl_temporal_step_follows_the_record_fps(tmp_path):
    """The record's frame rate reaches Qwen2.5-VL's temporal positions (second_per_grid_ts), default 2 fps."""
    model = tiny_qwen2_vl(version="2.5", patch_size=7)
    processor = tiny_qwen2_vl_processor(model, WORDS, image_size=28)
    record = {"id": "v", "video": _frames(tmp_path, "clip", 4), "conversations": [
        {"from": "human", "value": "<video>\nwhat colour is the circle ?"}, {"from": "gpt", "value": "red"}]}
    encoder = Encoder(processor, tmp_path)
    assert encoder.encode(record)["second_per_grid_ts"].tolist() == [1.0]
    assert encoder.encode({**record, "fps": 0.5})["second_per_grid_ts"].tolist() == [4.0]


def test_evaluation_of_video_image_and_text_records_batched_equals_one_by_one(setup, tmp_path):
    from pmod.pipelines.evaluate import evaluate

    model, processor = setup
    Image.new("RGB", (28, 28), (20, 200, 20)).save(tmp_path / "g.png")
    _frames(tmp_path, "clip", 4)
    records = [
        {"id": "v", "video": "clip", "fps": 1.0, "conversations": [
            {"from": "human", "value": "<video>\nwhat colour is the circle ?"}, {"from": "gpt", "value": "red"}]},
        {"id": "i", "image": "g.png", "conversations": [
            {"from": "human", "value": "<image>\nwhat colour is the circle ?"}, {"from": "gpt", "value": "green"}]},
        {"id": "w", "video": [f"clip/{i:03d}.png" for i in (3, 2)], "fps": 4.0, "conversations": [  # 2 frames
            {"from": "human", "value": "what is in the video ?"}, {"from": "gpt", "value": "a circle"}]},
        {"id": "t", "conversations": [
            {"from": "human", "value": "what is a circle ?"}, {"from": "gpt", "value": "a colour"}]},
    ]
    suppress = list(range(5))  # <pad> <unk> <s> <|im_end|> <|im_start|>: every answer has its full length
    seen = []
    hook = model.register_forward_pre_hook(lambda m, a, kw: seen.append(kw.get("second_per_grid_ts")), with_kwargs=True)
    try:
        batched = evaluate(model, processor, records, tmp_path, batch_size=4, max_new_tokens=3, progress=False,
                           suppress_tokens=suppress)
    finally:
        hook.remove()
    alone = evaluate(model, processor, records, tmp_path, batch_size=1, max_new_tokens=3, progress=False,
                     suppress_tokens=suppress)
    assert all(len(q.prediction.split()) == 3 for q in batched.records)
    assert [q.prediction for q in batched.records] == [q.prediction for q in alone.records]
    assert [q.flops_ratio for q in batched.records] == pytest.approx([q.flops_ratio for q in alone.records])
    # the video row skips tokens; the text-only row skips none (the router's own FLOPs put it a hair above 1)
    assert batched.records[0].flops_ratio < 0.95 and batched.records[3].flops_ratio == pytest.approx(1.0, abs=0.01)
    if model.config.model_type.endswith("2_5_vl"):  # each video's own rate, in row order: 2 frames / fps
        assert seen[0].tolist() == [2.0, 0.5]
    with pytest.raises(PModInputError, match="record 'v': video not found: .*missing"):
        evaluate(model, processor, [{**records[0], "video": "missing"}], tmp_path)
    Image.new("RGB", (30, 28)).save(tmp_path / "clip" / "004.png")
    with pytest.raises(PModInputError, match="differ in size"):
        evaluate(model, processor, records[:1], tmp_path)


def test_evaluation_refuses_media_the_processor_cannot_take(tmp_path):
    from pmod.pipelines.evaluate import evaluate
    from pmod.tiny import tiny_llava, tiny_llava_processor

    llava = tiny_llava()
    video = {"id": "v", "video": _frames(tmp_path, "clip", 2), "conversations": [
        {"from": "human", "value": "<video>\nwhat colour ?"}, {"from": "gpt", "value": "red"}]}
    with pytest.raises(PModInputError, match="no video processor"):
        evaluate(llava, tiny_llava_processor(llava), [video], tmp_path)
    Image.new("RGB", (28, 28)).save(tmp_path / "a.png")
    image = {"id": "i", "image": "a.png", "conversations": [
        {"from": "human", "value": "<image>\nwhat colour ?"}, {"from": "gpt", "value": "red"}]}
    with pytest.raises(PModInputError, match="no image processor"):
        evaluate(llava, tiny_llava_processor(llava).tokenizer, [image], tmp_path)


def test_the_qwen2_vl_recipe_trains_a_saved_dense_folder(data, tmp_path):
    """configs/pmod-qwen2-vl-7b.yaml on a tiny dense Qwen2-VL folder (paths, steps and precision overridden):
    converted to p-MoD on load, its own processor and template, merger and routers trained, vision blocks frozen."""
    from pathlib import Path

    from pmod.loading import load_pretrained
    from pmod.pipelines.recipe import load_config
    from pmod.pipelines.train import train

    dense = tiny_qwen2_vl(patch_size=7)
    dense.save_pretrained(tmp_path / "dense")
    tiny_qwen2_vl_processor(dense, WORDS, image_size=28).save_pretrained(tmp_path / "dense")
    path, folder = data
    recipe = Path(__file__).resolve().parents[2] / "configs/pmod-qwen2-vl-7b.yaml"
    config = load_config(recipe, [
        f"model_name_or_path={tmp_path / 'dense'}", f"data_path={path}", f"image_folder={folder}",
        f"output_dir={tmp_path / 'out'}", "trainer.max_steps=2", "trainer.per_device_train_batch_size=4",
        "trainer.gradient_accumulation_steps=1", "trainer.bf16=false", "trainer.deepspeed=null",
        "trainer.dataloader_num_workers=0", "trainer.report_to=[]", "trainer.learning_rate=1e-3",
    ])
    checkpointing = config.trainer.get("activation_checkpointing", config.trainer.get("gradient_checkpointing"))
    assert config.chat_template is None and checkpointing and config.freeze_vision_tower
    result = train(config)
    assert result.global_step == 2 and {"projector", "router", "language_model"} <= set(result.trainable_parameters)
    assert "vision_tower" not in result.trainable_parameters
    trained = load_pretrained(tmp_path / "out")
    assert trained.config.model_type == "pmod_qwen2_vl"
    before = dict(dense.named_parameters())
    changed = {n for n, q in trained.named_parameters() if n in before and not torch.equal(q, before[n])}
    assert any(".visual.merger." in n for n in changed) and not any(".visual.blocks." in n for n in changed)
