"""LLaVA-format data: label masking, images, truncation, skipped records, batching."""

import logging

import numpy as np
import pytest
import torch
from PIL import Image

import pmod
from pmod.data.conversation import VICUNA_V1_TEMPLATE, to_messages
from pmod.data.images import load_image
from pmod.data.records import (
    IGNORE_INDEX,
    SKIP_KEY,
    Encoder,
    LlavaCollator,
    LlavaDataset,
    load_records,
    padding_image_processor,
)
from pmod.errors import PModInputError
from pmod.tiny import randomize_routers, tiny_llava, tiny_llava_next, tiny_llava_processor
from tests.helpers.llava_data import colour_records, write_records

WORDS = "USER ASSISTANT : what is in the image ? a red blue green circle square triangle yes no and".split()


@pytest.fixture(scope="module")
def model():
    return tiny_llava(num_layers=4)


@pytest.fixture(scope="module")
def processor(model):
    return tiny_llava_processor(model, WORDS)


def _trained(processor, item):
    return [processor.tokenizer.convert_ids_to_tokens(int(t)) for t in item["labels"] if t != IGNORE_INDEX]


def _image(folder, name="a.png", size=(28, 28), colour=(200, 20, 20)):
    Image.new("RGB", size, colour).save(folder / name)
    return name


def test_single_turn_labels_cover_only_the_reply(processor, tmp_path):
    record = {"id": "1", "image": _image(tmp_path), "conversations": [
        {"from": "human", "value": "<image>\nwhat is in the image ?"}, {"from": "gpt", "value": "a red circle"}]}
    item = Encoder(processor, tmp_path).encode(record)
    tokens = processor.tokenizer.convert_ids_to_tokens(item["input_ids"].tolist())
    assert tokens[:2] == ["USER", ":"] and tokens[2:18] == ["<image>"] * 16
    assert tokens[18:] == "what is in the image ? ASSISTANT : a red circle </s>".split()
    assert _trained(processor, item) == ["a", "red", "circle", "</s>"]
    # labels are the input ids at the trained positions (the model shifts them itself)
    trained = item["labels"] != IGNORE_INDEX
    assert torch.equal(item["labels"][trained], item["input_ids"][trained])
    assert item["pixel_values"].shape == (1, 3, 28, 28)


def test_multi_turn_with_image_trains_every_reply(processor, tmp_path):
    record = {"id": "2", "image": _image(tmp_path), "conversations": [
        {"from": "human", "value": "<image>\nwhat is in the image ?"}, {"from": "gpt", "value": "a circle"},
        {"from": "human", "value": "is the circle red ?"}, {"from": "gpt", "value": "yes"},
        {"from": "human", "value": "is the circle blue ?"}, {"from": "gpt", "value": "no"}]}
    item = Encoder(processor, tmp_path).encode(record)
    assert _trained(processor, item) == ["a", "circle", "</s>", "yes", "</s>", "no", "</s>"]
    tokens = processor.tokenizer.convert_ids_to_tokens(item["input_ids"].tolist())
    # the questions of later turns are not trained on
    labels = item["labels"].tolist()
    assert all(labels[i] == IGNORE_INDEX for i, t in enumerate(tokens) if t in ("USER", "is", "?", "<image>"))


def test_text_only_record(processor):
    record = {"id": "3", "conversations": [
        {"from": "human", "value": "what is a circle ?"}, {"from": "gpt", "value": "a circle"},
        {"from": "human", "value": "and a square ?"}, {"from": "gpt", "value": "a square"}]}
    item = Encoder(processor).encode(record)
    assert "pixel_values" not in item
    assert _trained(processor, item) == ["a", "circle", "</s>", "a", "square", "</s>"]


def test_vicuna_v1_template_keeps_the_system_prompt_out_of_the_labels(model, tmp_path):
    words = WORDS + VICUNA_V1_TEMPLATE.split("{%")[1].split("%}")[1].replace(".", " . ").replace(",", " , ").split()
    proc = tiny_llava_processor(model, words)
    proc.chat_template = VICUNA_V1_TEMPLATE
    record = {"id": "4", "image": _image(tmp_path), "conversations": [
        {"from": "human", "value": "<image>\nwhat is in the image ?"}, {"from": "gpt", "value": "a red circle"}]}
    item = Encoder(proc, tmp_path).encode(record)
    tokens = proc.tokenizer.convert_ids_to_tokens(item["input_ids"].tolist())
    assert tokens[:3] == ["A", "chat", "between"] and "USER" in tokens
    assert _trained(proc, item) == ["a", "red", "circle", "</s>"]


def test_multi_image_record(model, processor, tmp_path):
    record = {"id": "5", "image": [_image(tmp_path, "a.png"), _image(tmp_path, "b.png", colour=(0, 0, 200))],
              "conversations": [{"from": "human", "value": "<image>\n<image>\nwhat is in the image ?"},
                                {"from": "gpt", "value": "a red and a blue square"}]}
    item = Encoder(processor, tmp_path).encode(record)
    assert (item["input_ids"] == model.config.image_token_id).sum() == 32
    assert item["pixel_values"].shape[0] == 2
    batch = LlavaCollator(pad_token_id=0)([item])
    with torch.no_grad():
        assert torch.isfinite(model(**batch).loss)


def test_placeholder_count_must_match_images(processor, tmp_path):
    bad = {"id": "6", "image": ["a.png", "b.png"], "conversations": [
        {"from": "human", "value": "<image>\nwhat ?"}, {"from": "gpt", "value": "a"}]}
    with pytest.raises(PModInputError, match="1 '<image>' placeholders but 2 images"):
        LlavaDataset([bad], processor, tmp_path)
    # a record with one image and no placeholder gets it at the start of its first human turn (as LLaVA does)
    implicit = {"id": "7", "image": "a.png", "conversations": [{"from": "human", "value": "what ?"},
                                                              {"from": "gpt", "value": "a"}]}
    assert to_messages(implicit)[0]["content"][0] == {"type": "image"}
    with pytest.raises(PModInputError, match="alternate"):
        to_messages({"id": "8", "conversations": [{"from": "gpt", "value": "a"}]})


def _reference_pad(image, mean):
    """LLaVA's expand2square: centre the image on a square of the mean colour."""
    w, h = image.size
    side = max(w, h)
    canvas = Image.new("RGB", (side, side), tuple(int(c * 255) for c in mean))
    canvas.paste(image, ((side - w) // 2, (side - h) // 2))
    return canvas


@pytest.mark.parametrize("size", [(60, 28), (28, 60), (28, 28)])
def test_padding_image_processor_equals_llava_expand2square(processor, size):
    image = Image.new("RGB", size, (250, 10, 10))
    image.paste((10, 200, 10), (0, 0, size[0] // 3, size[1] // 3))
    padded = padding_image_processor(processor.image_processor)
    assert padded.do_pad and padded.crop_size == processor.image_processor.crop_size
    got = padded(images=image, return_tensors="pt")["pixel_values"]
    want = processor.image_processor(images=_reference_pad(image, processor.image_processor.image_mean),
                                     return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(got, want, atol=2e-2, rtol=0)  # rounding of the pad colour to 8 bits
    with pytest.raises(pmod.PModConfigError, match="LLaVA-NeXT"):
        padding_image_processor(type("NextLike", (), {"image_grid_pinpoints": [[28, 56]]})())


def test_truncation_keeps_images_whole(processor, tmp_path):
    long = {"id": "9", "image": _image(tmp_path), "conversations": [
        {"from": "human", "value": "<image>\nwhat is in the image ?"}, {"from": "gpt", "value": "a red circle " * 10}]}
    item = Encoder(processor, tmp_path, model_max_length=30).encode(long)
    assert item["input_ids"].shape[0] == 30 and (item["labels"] != IGNORE_INDEX).sum() > 0
    with pytest.raises(PModInputError, match="inside or before an image"):
        Encoder(processor, tmp_path, model_max_length=10).encode(long)


def test_bad_images_are_skipped_and_counted(processor, tmp_path, caplog):
    records = colour_records(tmp_path, n=6)
    (tmp_path / "img/1.png").write_bytes(b"not a png")
    (tmp_path / "img/2.png").write_bytes((tmp_path / "img/3.png").read_bytes()[:60])  # truncated file
    records[4]["image"] = "img/missing.png"
    dataset = LlavaDataset(records, processor, tmp_path)
    collator = LlavaCollator(pad_token_id=0, count_in_batch=True)
    with caplog.at_level(logging.WARNING, logger="pmod.data.records"):
        batch = collator([dataset[i] for i in range(6)])
    assert batch[SKIP_KEY].item() == 3 and sorted(collator.skipped) == ["s1", "s2", "s4"]
    assert batch["input_ids"].shape[0] == 6  # replaced by the next usable record, not dropped
    assert sum("skipping record" in r.message for r in caplog.records) == 3


def test_an_image_over_the_bomb_limit_is_skipped_and_counted(processor, tmp_path, monkeypatch):
    """PIL's DecompressionBombError stopped `pmod train` with an "unexpected" error: it is an unreadable image now."""
    from PIL import Image

    records = colour_records(tmp_path, n=3)
    Image.new("RGB", (300, 300), (1, 2, 3)).save(tmp_path / "img/1.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 20_000)  # 300 x 300 is over twice the limit
    with pytest.raises(pmod.PModInputError, match=r"img/1\.png is larger than PIL's decompression-bomb limit"):
        load_image(tmp_path / "img/1.png")
    collator = LlavaCollator(pad_token_id=0, count_in_batch=True)
    dataset = LlavaDataset(records, processor, tmp_path)
    batch = collator([dataset[i] for i in range(3)])
    assert batch[SKIP_KEY].item() == 1 and collator.skipped == ["s1"]


@pytest.mark.parametrize("mode", ["I;16", "I", "F"])
def test_high_bit_depth_images_are_scaled_not_clipped(tmp_path, mode):
    """A 16-bit PNG became a white image (PIL clips on a plain RGB conversion): the range is scaled to 8 bits."""
    from PIL import Image

    ramp = np.linspace(0, 65535 if mode != "F" else 1.0, 64 * 32).reshape(32, 64)
    img = Image.fromarray(ramp.astype(np.uint16 if mode == "I;16" else np.int32 if mode == "I" else np.float32))
    if mode == "I;16":
        assert img.mode == "I;16"
    path = tmp_path / ("img.png" if mode == "I;16" else "img.tiff")
    img.save(path)
    loaded = np.asarray(load_image(path))
    assert loaded.shape == (32, 64, 3) and loaded[0, 0, 0] == 0 and loaded[-1, -1, 0] == 255
    assert 100 < loaded[16, :, 0].mean() < 155  # mid-grey in the middle, not white


def test_collated_loss_equals_per_example_losses(tmp_path):
    """A right-padded batch through a p-MoD model gives the token-weighted mean of the one-by-one losses."""
    model = pmod.apply_pmod(tiny_llava(num_layers=6), pmod.PModConfig())
    randomize_routers(model)
    proc = tiny_llava_processor(model, WORDS)
    records = colour_records(tmp_path, n=3)
    records[1]["conversations"][1]["value"] = "a red circle and a blue square"
    records.append({"id": "t", "conversations": [{"from": "human", "value": "what is red ?"},
                                                  {"from": "gpt", "value": "a circle"}]})
    dataset = LlavaDataset(records, proc, tmp_path)
    items = [dataset[i] for i in range(len(records))]
    collator = LlavaCollator(pad_token_id=proc.tokenizer.pad_token_id)
    with torch.no_grad():
        batch_loss = model(**collator(items)).loss
        total, count = 0.0, 0
        for item in items:
            n = int((item["labels"][1:] != IGNORE_INDEX).sum())
            total += model(**collator([item])).loss * n
            count += n
    torch.testing.assert_close(batch_loss, total / count, rtol=1e-5, atol=1e-5)


def test_llava_next_items_pad_tiles(tmp_path):
    from transformers import LlavaNextProcessor

    try:
        from transformers import LlavaNextImageProcessorPil as ImageProcessor
    except ImportError:
        from transformers import LlavaNextImageProcessor as ImageProcessor
    model = pmod.apply_pmod(tiny_llava_next(num_layers=4), pmod.PModConfig())
    randomize_routers(model)
    base = tiny_llava_processor(tiny_llava(num_layers=1), WORDS)
    size = model.config.vision_config.image_size
    proc = LlavaNextProcessor(
        image_processor=ImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size},
                                       image_grid_pinpoints=model.config.image_grid_pinpoints),
        tokenizer=base.tokenizer, patch_size=7, vision_feature_select_strategy="default",
        chat_template=base.chat_template, num_additional_image_tokens=1)
    records = []
    for i, shape in enumerate([(28, 28), (56, 28), (30, 80)]):
        records.append({"id": str(i), "image": _image(tmp_path, f"{i}.png", size=shape), "conversations": [
            {"from": "human", "value": "<image>\nwhat is in the image ?"}, {"from": "gpt", "value": "a red square"}]})
    dataset = LlavaDataset(records, proc, tmp_path)
    items = [dataset[i] for i in range(3)]
    tiles = [item["pixel_values"].shape[1] for item in items]
    assert len(set(tiles)) > 1
    collator = LlavaCollator(pad_token_id=0)
    batch = collator(items)
    assert batch["pixel_values"].shape[:2] == (3, max(tiles)) and batch["image_sizes"].shape == (3, 2)
    with torch.no_grad():
        batch_loss = model(**batch).loss
        n = [int((item["labels"][1:] != IGNORE_INDEX).sum()) for item in items]
        alone = sum(model(**collator([item])).loss * k for item, k in zip(items, n)) / sum(n)
    torch.testing.assert_close(batch_loss, alone, rtol=1e-5, atol=1e-5)


def test_load_records_errors(tmp_path):
    with pytest.raises(PModInputError, match="data file not found"):
        load_records(tmp_path / "nope.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(PModInputError, match="not valid JSON"):
        load_records(tmp_path / "bad.json")
    path = write_records(tmp_path, [{"conversations": []}])
    assert load_records(path)[0]["id"] == "0"
    (tmp_path / "d.jsonl").write_text('{"id": "a", "conversations": []}\n{"id": "b", "conversations": []}\n')
    assert [r["id"] for r in load_records(tmp_path / "d.jsonl")] == ["a", "b"]


def _metaspace_processor(model, template):
    """A LlavaProcessor whose tokenizer, like Llama's, puts the leading space into tokens ("▁red")."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlavaProcessor, PreTrainedTokenizerFast

    base = tiny_llava_processor(model, WORDS)
    words = ["<pad>", "<unk>", "<s>", "</s>"] + ["▁" + w for w in WORDS] + ["▁"]
    vocab = {w: i for i, w in enumerate(words)}
    vocab["<image>"] = model.config.text_config.vocab_size - 1
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>", additional_special_tokens=["<image>"])
    return LlavaProcessor(image_processor=base.image_processor, tokenizer=fast, patch_size=7,
                          vision_feature_select_strategy="default", num_additional_image_tokens=1,
                          chat_template=template)


def test_leading_space_tokens_and_templates_without_eos(model, tmp_path):
    # the llava-hf template ends assistant turns with a space, not </s>: pmod appends </s> so the model learns to stop
    template = (
        "{% for m in messages %}{% if m['role'] == 'user' %}USER : {% for c in m['content'] %}"
        "{% if c['type'] == 'image' %}<image> {% else %}{{ c['text'] }}{% endif %}{% endfor %} "
        "{% else %}ASSISTANT : {% for c in m['content'] %}{{ c['text'] }}{% endfor %} {% endif %}{% endfor %}"
        "{% if add_generation_prompt %}ASSISTANT :{% endif %}"
    )
    proc = _metaspace_processor(model, template)
    record = {"id": "m", "image": _image(tmp_path), "conversations": [
        {"from": "human", "value": "<image>\nwhat is in the image ?"}, {"from": "gpt", "value": "red"},
        {"from": "human", "value": "yes ?"}, {"from": "gpt", "value": "a circle"}]}
    item = Encoder(proc, tmp_path).encode(record)
    trained = [proc.tokenizer.convert_ids_to_tokens(int(t)) for t in item["labels"] if t != IGNORE_INDEX]
    assert trained == ["▁red", "</s>", "▁a", "▁circle", "</s>"]


def test_bad_data_files_and_records_are_named(processor, tmp_path):
    from pmod.data.records import check_records

    latin1 = tmp_path / "latin1.json"
    latin1.write_bytes('[{"conversations": "caf\xe9"}]'.encode("latin-1"))
    with pytest.raises(PModInputError, match="latin1.json is not UTF-8 text"):
        load_records(latin1)
    lines = tmp_path / "d.jsonl"
    lines.write_text('{"id": "a"}\n\n{"id": \n')
    with pytest.raises(PModInputError, match=r"d.jsonl, line 3 is not valid JSON"):
        load_records(lines)
    with pytest.raises(PModInputError, match="train.json holds no records"):
        check_records([], "train.json")
    with pytest.raises(PModInputError,
                       match=r"x.json: record 'q': 'conversations' must be .*\(the record at index 1\)"):
        check_records([{"id": "p", "conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}]},
                       {"id": "q", "conversations": "what ?"}], "x.json")
    with pytest.raises(PModInputError, match="the dataset holds no records"):
        LlavaDataset([], processor, tmp_path)


def test_all_unusable_records_are_counted_as_they_are(processor, tmp_path):
    records = [{"id": str(i), "image": "gone.png", "conversations": [
        {"from": "human", "value": "<image>\nwhat ?"}, {"from": "gpt", "value": "a"}]} for i in range(2)]
    with pytest.raises(PModInputError, match=r"records 0, 1 \(2 in a row from index 0\) are all unusable"):
        LlavaDataset(records, processor, tmp_path)[0]
