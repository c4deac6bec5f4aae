"""The families added through the family table (pmod/families.py) hold the core guarantees, each on tiny random
configs with its own image layout: InternVL (tiles of pixel-shuffled tokens between <img> and </img>; Qwen2, Qwen3 and
Llama decoders), Mistral 3 (Pixtral images of different sizes, [IMG_BREAK] after every row of image tokens; Mistral and
Ministral 3 decoders, the latter's attention reading position ids) and LLaVA-NeXT-Video (anyres images and pooled
video frames). Rows with 0, 1 and 2 images (and a video), left padded.

For each: keep ratio 1 = the dense model; random routers = the per-example reference (tests/helpers/reference.py;
eager and sdpa); batched generation = each row alone; cached decoding = recomputation; a dense checkpoint converts and
a p-MoD one round-trips."""

from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch

import pmod
from pmod.compat import output_cache
from pmod.efficiency import kv_cache_report
from pmod.tiny import (
    randomize_routers,
    tiny_gemma3,
    tiny_internvl,
    tiny_llava_next_video,
    tiny_mistral3,
    tiny_smolvlm,
)
from tests.helpers.batches import assert_keep_ratio_one_equals_dense, valid_rows
from tests.helpers.reference import reference_logits

SCHEDULE = [0.5, 1.0, 0.3, 0.6]


def _pad(seqs: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    length = max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), length, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, s in enumerate(seqs):
        ids[b, length - len(s):], mask[b, length - len(s):] = s, 1
    return ids, mask


def _text(gen, n, vocab):
    return torch.randint(5, vocab - 5, (n,), generator=gen)


def internvl_inputs(model, seed=0):
    """Rows of images of 1, 2 + 1 and 0 tiles, and 1 tile; each tile 4 image tokens."""
    gen = torch.Generator().manual_seed(seed)
    cfg = model.config
    vocab, image, start, end = cfg.text_config.vocab_size, cfg.image_token_id, cfg.text_config.vocab_size - 3, \
        cfg.text_config.vocab_size - 4
    rows = [([1], 2, 3), ([2, 1], 1, 1), ([], 5, 2), ([1], 1, 0)]
    seqs, singles, tiles = [], [], []
    for per_image, before, after in rows:
        parts, own = [_text(gen, before, vocab)], []
        for n in per_image:
            parts += [torch.tensor([start]), torch.full((4 * n,), image), torch.tensor([end]), _text(gen, 1, vocab)]
            own.append(torch.randn(n, 3, 32, 32, generator=gen))
        parts.append(_text(gen, after, vocab))
        seqs.append(torch.cat(parts))
        tiles += own
        singles.append({"pixel_values": torch.cat(own)} if own else {})
    ids, mask = _pad(seqs)
    for b, s in enumerate(seqs):
        singles[b]["input_ids"] = s[None]
    return dict(input_ids=ids, attention_mask=mask, pixel_values=torch.cat(tiles)), singles


def mistral3_inputs(model, seed=0):
    """Rows of images of (16, 16), (16, 24) + (8, 8), none, and (24, 16) pixels: Pixtral's layout, a row of [IMG] per 8
    pixels of height followed by [IMG_BREAK], the last one [IMG_END]; pixels zero-padded to the largest image."""
    gen = torch.Generator().manual_seed(seed)
    cfg = model.config
    vocab = cfg.text_config.vocab_size
    image, brk, end = cfg.image_token_id, vocab - 2, vocab - 3
    rows = [([(16, 16)], 2, 3), ([(16, 24), (8, 8)], 1, 1), ([], 5, 2), ([(24, 16)], 1, 0)]

    def padded(images):
        h = max(i.shape[1] for i in images)
        w = max(i.shape[2] for i in images)
        out = torch.zeros(len(images), 3, h, w)
        for k, i in enumerate(images):
            out[k, :, : i.shape[1], : i.shape[2]] = i
        return out

    seqs, singles, all_images, all_sizes = [], [], [], []
    for sizes, before, after in rows:
        parts, own = [_text(gen, before, vocab)], []
        for h, w in sizes:
            tokens = ([image] * (w // 8) + [brk]) * (h // 8)
            tokens[-1] = end
            parts += [torch.tensor(tokens), _text(gen, 1, vocab)]
            own.append(torch.randn(3, h, w, generator=gen))
        parts.append(_text(gen, after, vocab))
        seqs.append(torch.cat(parts))
        all_images += own
        all_sizes += sizes
        singles.append({"pixel_values": padded(own), "image_sizes": torch.tensor(sizes)} if own else {})
    ids, mask = _pad(seqs)
    for b, s in enumerate(seqs):
        singles[b]["input_ids"] = s[None]
    return dict(input_ids=ids, attention_mask=mask, pixel_values=padded(all_images),
                image_sizes=torch.tensor(all_sizes)), singles


def llava_next_video_inputs(model, seed=0):
    """Rows with an anyres image (28 x 56), a 2-frame video, no media, and an image (56 x 56)."""
    gen = torch.Generator().manual_seed(seed)
    cfg = model.config
    vocab = cfg.text_config.vocab_size
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    base = cfg.vision_config.image_size
    rows = [(("image", (28, 56)), 2, 3), (("video", 2), 3, 1), (None, 5, 2), (("image", (56, 56)), 1, 1)]
    sizes = [r[0][1] for r in rows if r[0] is not None and r[0][0] == "image"]
    patches = [image_size_to_num_patches(s, cfg.image_grid_pinpoints, base) for s in sizes]
    pixel_values = torch.zeros(len(sizes), max(patches), 3, base, base)
    for k, n in enumerate(patches):
        pixel_values[k, :n] = torch.randn(n, 3, base, base, generator=gen)
    with torch.no_grad():
        counts = [f.shape[0] for f in model.model.get_image_features(pixel_values, torch.tensor(sizes)).pooler_output]
    per_frame = (base // cfg.vision_config.patch_size // cfg.spatial_pool_stride) ** 2
    seqs, singles, videos, k = [], [], [], 0
    for media, before, after in rows:
        parts, single = [_text(gen, before, vocab)], {}
        if media is not None and media[0] == "image":
            parts.append(torch.full((counts[k],), cfg.image_token_id))
            single = {"pixel_values": pixel_values[k : k + 1, : patches[k]], "image_sizes": torch.tensor([sizes[k]])}
            k += 1
        elif media is not None:
            video = torch.randn(1, media[1], 3, base, base, generator=gen)
            parts.append(torch.full((media[1] * per_frame,), cfg.video_token_id))
            videos.append(video)
            single = {"pixel_values_videos": video}
        parts.append(_text(gen, after, vocab))
        seqs.append(torch.cat(parts))
        singles.append(single)
    ids, mask = _pad(seqs)
    for b, s in enumerate(seqs):
        singles[b]["input_ids"] = s[None]
    return dict(input_ids=ids, attention_mask=mask, pixel_values=pixel_values, image_sizes=torch.tensor(sizes),
                pixel_values_videos=torch.cat(videos)), singles


def gemma3_inputs(model, seed=0):
    """Rows with 1, 2, 0 and 1 images, each <start_of_image> + 4 image tokens + <end_of_image>; token_type_ids mark
    the image tokens (the processor's: an image's tokens attend to each other both ways)."""
    gen = torch.Generator().manual_seed(seed)
    cfg = model.config
    vocab = cfg.text_config.vocab_size
    rows = [(1, 2, 6), (2, 1, 1), (0, 5, 2), (1, 1, 0)]
    seqs, singles, images = [], [], []
    for n, before, after in rows:
        parts, own = [_text(gen, before, vocab)], []
        for _ in range(n):
            parts += [torch.tensor([cfg.boi_token_id]), torch.full((4,), cfg.image_token_id),
                      torch.tensor([cfg.eoi_token_id]), _text(gen, 2, vocab)]
            own.append(torch.randn(3, 32, 32, generator=gen))
        parts.append(_text(gen, after, vocab))
        seq = torch.cat(parts)
        seqs.append(seq)
        images += own
        singles.append({"pixel_values": torch.stack(own)} if own else {})
        singles[-1].update(input_ids=seq[None], token_type_ids=(seq == cfg.image_token_id).long()[None])
    ids, mask = _pad(seqs)
    return dict(input_ids=ids, attention_mask=mask, pixel_values=torch.stack(images),
                token_type_ids=(ids == cfg.image_token_id).long()), singles


def smolvlm_inputs(model, seed=0):
    """Rows with an image split into 1 x 2 crops (+ the global image), none, two unsplit images, and one: each crop's 4
    tokens after <fake_token_around_image><row_1_col_j>, the global image's after <global-img>; pixels (B, images, 3,
    32, 32), rows with fewer images padded with all-zero images (pixel_attention_mask False)."""
    gen = torch.Generator().manual_seed(seed)
    cfg = model.config
    vocab = cfg.text_config.vocab_size
    image, fake, glob = cfg.image_token_id, vocab - 3, vocab - 4
    rows = [([2], 2, 3), ([], 5, 2), ([0, 0], 1, 1), ([0], 1, 0)]  # per image: number of crops (0: not split)

    def tokens(crops):
        out = []
        for j in range(crops):
            out += [fake, vocab - 5 - j] + [image] * 4
        if crops:
            out += [10, 10]  # the "\n" after the row of crops
        return out + [fake, glob] + [image] * 4 + [fake]

    seqs, singles, per_row = [], [], []
    for crops, before, after in rows:
        parts, own = [_text(gen, before, vocab)], []
        for n in crops:
            parts += [torch.tensor(tokens(n)), _text(gen, 1, vocab)]
            own += [torch.randn(3, 32, 32, generator=gen) for _ in range(n + 1)]
        parts.append(_text(gen, after, vocab))
        seq = torch.cat(parts)
        seqs.append(seq)
        per_row.append(own)
        singles.append({"pixel_values": torch.stack(own)[None],
                        "pixel_attention_mask": torch.ones(1, len(own), 32, 32, dtype=torch.bool)} if own else {})
        singles[-1]["input_ids"] = seq[None]
    most = max(len(own) for own in per_row)
    pixels = torch.zeros(len(rows), most, 3, 32, 32)
    pixel_mask = torch.zeros(len(rows), most, 32, 32, dtype=torch.bool)
    for b, own in enumerate(per_row):
        for k, img in enumerate(own):
            pixels[b, k], pixel_mask[b, k] = img, True
    ids, mask = _pad(seqs)
    return dict(input_ids=ids, attention_mask=mask, pixel_values=pixels, pixel_attention_mask=pixel_mask), singles


@dataclass
class Case:
    build: Callable[..., torch.nn.Module]
    inputs: Callable
    model_type: str
    kwargs: dict


CASES = {
    "internvl-qwen2": Case(tiny_internvl, internvl_inputs, "pmod_internvl", {"family": "qwen2"}),
    "internvl-qwen3": Case(tiny_internvl, internvl_inputs, "pmod_internvl", {"family": "qwen3"}),
    "internvl-llama": Case(tiny_internvl, internvl_inputs, "pmod_internvl", {"family": "llama"}),
    "mistral3": Case(tiny_mistral3, mistral3_inputs, "pmod_mistral3", {"family": "mistral"}),
    "mistral3-ministral3": Case(tiny_mistral3, mistral3_inputs, "pmod_mistral3", {"family": "ministral3"}),
    "llava-next-video": Case(tiny_llava_next_video, llava_next_video_inputs, "pmod_llava_next_video", {}),
    "gemma3": Case(tiny_gemma3, gemma3_inputs, "pmod_gemma3", {}),
    "smolvlm": Case(tiny_smolvlm, smolvlm_inputs, "pmod_smolvlm", {"version": "smolvlm"}),
    "idefics3": Case(tiny_smolvlm, smolvlm_inputs, "pmod_idefics3", {"version": "idefics3"}),
}


def _routed(case: Case, attn: str = "sdpa"):
    model = pmod.apply_pmod(case.build(attn_implementation=attn, **case.kwargs), pmod.PModConfig(schedule=SCHEDULE))
    randomize_routers(model)
    return model


def _generate_kwargs(model):
    cfg = model.config
    suppress = [t for t in (cfg.image_token_id, getattr(cfg, "video_token_id", None), cfg.text_config.eos_token_id)
                if t is not None]
    return dict(max_new_tokens=4, do_sample=False, suppress_tokens=suppress, return_dict_in_generate=True,
                pad_token_id=0)


@pytest.mark.parametrize("name", CASES)
def test_keep_ratio_one_equals_dense(name):
    case = CASES[name]
    dense = case.build(**case.kwargs)
    assert_keep_ratio_one_equals_dense(dense, case.inputs(dense)[0])


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("name", CASES)
def test_random_routers_match_reference(name, attn):
    case = CASES[name]
    model = _routed(case, attn)
    inputs, singles = case.inputs(model)
    with torch.no_grad():
        got = valid_rows(model(**inputs).logits, inputs["attention_mask"])
        ref = reference_logits(model, inputs["input_ids"], inputs["attention_mask"],
                               row_inputs=lambda b: {k: v for k, v in singles[b].items() if k != "input_ids"})
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    vision = inputs["input_ids"] == model.config.image_token_id
    if getattr(model.config, "video_token_id", None) is not None:
        vision |= inputs["input_ids"] == model.config.video_token_id
    routing = model.routing()[2]
    assert torch.equal(routing.target, vision) and (~vision.any(1)).any()  # a row without media routes nothing
    assert (routing.processed | routing.target).sum() == inputs["attention_mask"].sum()  # all text processed
    assert int(routing.selected[0].sum()) == int(int(vision[0].sum()) * 0.3)


@pytest.mark.parametrize("name", CASES)
def test_batched_generation_equals_rows_alone_and_kv_shrinks(name):
    case = CASES[name]
    model = _routed(case)
    inputs, singles = case.inputs(model)
    kw = _generate_kwargs(model)
    with torch.no_grad():
        out = model.generate(**inputs, **kw)
        batched = out.sequences[:, inputs["input_ids"].shape[1]:]
        for b, single in enumerate(singles):
            alone = model.generate(**single, **kw).sequences[0, single["input_ids"].shape[1]:]
            assert torch.equal(batched[b], alone), b
    report = kv_cache_report(output_cache(out))
    assert sum(layer.entries for layer in report.layers) < sum(layer.dense_entries for layer in report.layers)


@pytest.mark.parametrize("name", CASES)
def test_cached_decoding_equals_recomputation(name):
    case = CASES[name]
    model = _routed(case)
    inputs, _ = case.inputs(model)
    with torch.no_grad():
        out = model.generate(**inputs, **_generate_kwargs(model), output_logits=True)
        n = inputs["input_ids"].shape[1]
        for step, logits in enumerate(out.logits):
            ids = out.sequences[:, : n + step]
            mask = torch.cat([inputs["attention_mask"], torch.ones(ids.shape[0], step, dtype=torch.long)], 1)
            # positions counted as generate() counts them (padding-aware: Ministral 3's attention reads them)
            positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
            full = model(**dict(inputs, input_ids=ids, attention_mask=mask, position_ids=positions)).logits[:, -1]
            torch.testing.assert_close(logits, full, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", CASES)
def test_dense_checkpoint_converts_and_pmod_checkpoint_round_trips(name, tmp_path):
    case = CASES[name]
    dense = case.build(**case.kwargs)
    dense.save_pretrained(tmp_path / "dense")
    every_layer = pmod.PModConfig(schedule=[1.0] * 4, routed_layers=[0, 1, 2, 3])
    converted = pmod.load_model(tmp_path / "dense", every_layer)
    inputs, _ = case.inputs(dense)
    with torch.no_grad():  # padding positions are not processed by routed layers: compare the tokens
        got = valid_rows(converted(**inputs).logits, inputs["attention_mask"])
        want = valid_rows(dense(**inputs).logits, inputs["attention_mask"])
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
    model = _routed(case)
    model.save_pretrained(tmp_path / "pmod")
    loaded = pmod.load_model(tmp_path / "pmod")
    assert loaded.config.model_type == case.model_type and type(loaded) is type(model)
    assert converted.config.model_type == case.model_type
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).logits, model(**inputs).logits)


# ---------------------------------------------------------------------- the table's classes
def test_subclasses_keep_their_own_methods_and_do_not_replace_the_routed_layers():
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    from pmod.families import PModLlamaDecoderLayer, PModLlamaForCausalLM
    from pmod.layer import ROUTED_LAYERS, PModLayerMixin

    class Mine(PModLlamaForCausalLM):
        def forward(self, *args, **kwargs):
            return "mine"

    assert Mine.__dict__["forward"].__qualname__.endswith("Mine.forward")
    assert Mine.dense_class is PModLlamaForCausalLM.dense_class

    class Instrumented(PModLlamaDecoderLayer):
        pass

    assert ROUTED_LAYERS[LlamaDecoderLayer] is PModLlamaDecoderLayer
    with pytest.raises(TypeError, match="already has a routed class"):
        type("AnotherRoutedLlama", (PModLayerMixin, LlamaDecoderLayer), {})
    assert ROUTED_LAYERS[LlamaDecoderLayer] is PModLlamaDecoderLayer


def test_moe_checkpoint_takes_the_experts_implementations_of_its_dense_class(tmp_path):
    """transformers decides from the defining module's source whether a class may switch its experts implementation;
    a p-MoD class answers as its dense class, also in a fresh process (no dense model built first)."""
    import subprocess
    import sys

    from transformers import Qwen3VLMoeForConditionalGeneration

    from pmod.families import PModQwen3VLMoeForConditionalGeneration

    assert PModQwen3VLMoeForConditionalGeneration._can_set_experts_implementation() is \
        Qwen3VLMoeForConditionalGeneration._can_set_experts_implementation()
    from pmod.tiny import tiny_qwen3_vl

    pmod.apply_pmod(tiny_qwen3_vl(moe=True), pmod.PModConfig(schedule=SCHEDULE)).save_pretrained(tmp_path)
    code = ("import pmod, sys; m = pmod.load_model(sys.argv[1]); "
            "print(m.config._experts_implementation, m._can_set_experts_implementation())")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, check=True)
    dense_choice = Qwen3VLMoeForConditionalGeneration._can_set_experts_implementation()
    assert out.stdout.split()[-1] == str(dense_choice)


def test_layer_routing_keeps_its_positional_order_and_generate_refuses_token_counts_alone():
    target = torch.tensor([[True, True, False]])
    processed, selected = torch.tensor([[True, False, True]]), torch.tensor([[True, False, False]])
    record = pmod.LayerRouting(target, processed, selected, torch.zeros(1, 3), 0.5)
    assert record.keep_ratio == 0.5 and torch.equal(record.selected, selected) and "keep_ratio=0.5" in repr(record)
    model = pmod.apply_pmod(tiny_internvl(), pmod.PModConfig(schedule=SCHEDULE))
    ids = torch.randint(5, 100, (1, 6))
    with pytest.raises(pmod.PModInputError, match="token_counts describe a prompt together with target_counts"):
        model.generate(input_ids=ids, token_counts=[6], max_new_tokens=2)
