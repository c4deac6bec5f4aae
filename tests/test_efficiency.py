import math

import torch

import pmod
from pmod.compat import output_cache
from pmod.efficiency import kv_cache_report
from pmod.tiny import randomize_routers, tiny_llava
from tests.helpers.inputs import llava_inputs

SCHEDULE = [0.5, 1.0, 0.3, 0.6]


def _model():
    model = pmod.apply_pmod(tiny_llava(num_layers=4), pmod.PModConfig(schedule=SCHEDULE))
    randomize_routers(model)
    return model


def _prefill_and_decode(model, inputs, steps=3):
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        cache = output_cache(model(**inputs, use_cache=True))
        mask = inputs.get("attention_mask")
        for _ in range(steps):
            new = torch.randint(1, 120, (inputs["input_ids"].shape[0], 1), generator=gen)
            mask = torch.cat([mask, torch.ones_like(new)], 1) if mask is not None else None
            model(input_ids=new, attention_mask=mask, past_key_values=cache)
    return cache


def test_kv_report_matches_schedule_prediction():
    model = _model()
    inputs, _ = llava_inputs(model, [(3, 1, 4), (3, 1, 4)])
    inputs.pop("attention_mask")
    length, steps, n_vision = inputs["input_ids"].shape[1], 3, 16
    cache = _prefill_and_decode(model, inputs, steps)
    report = kv_cache_report(cache)
    total = length + steps
    predicted = [total if r == 1.0 else total - n_vision + math.floor(n_vision * r) for r in SCHEDULE]
    assert [layer.entries // 2 for layer in report.layers] == predicted
    assert report.ratio == sum(predicted) / (len(SCHEDULE) * total)
    assert report.entry_ratio == report.ratio  # equal rows: no empty slots
    actual = sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)
    assert report.bytes == actual
    per_token = [2 * k.shape[0] * k.shape[1] * k.shape[3] * k.element_size()
                 for k in (layer.keys for layer in cache.layers)]
    assert report.dense_bytes == sum(per_token) * total
    assert [layer.routed for layer in report.layers] == [True, False, True, True]


def test_kv_report_counts_empty_slots_of_uneven_rows():
    model = _model()
    inputs, _ = llava_inputs(model)  # rows with 16, 32, 0 and 16 vision tokens
    report = kv_cache_report(_prefill_and_decode(model, inputs, 1))
    routed = [layer for layer in report.layers if layer.routed]
    assert all(layer.slots >= layer.entries for layer in routed)
    assert any(layer.slots > layer.entries for layer in routed)
    assert report.ratio >= report.entry_ratio
    assert report.ratio < 1.0
    assert report.to_dict()["layers"][1]["routed"] is False


# ---------------------------------------------------------------------- analytic accounting
import json  # noqa: E402
import re  # noqa: E402

import pytest  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from pmod.cli import main  # noqa: E402
from pmod.efficiency import PRESETS, prefill_cost, realized_cost, shape_from_config  # noqa: E402
from pmod.tiny import tiny_causal_lm  # noqa: E402


def test_paper_settings():
    c15 = prefill_cost(PRESETS["llava-1.5-7b"], 576, 60)
    assert round(c15.kv_ratio_nominal, 4) == 0.5375
    assert round(c15.kv_ratio, 4) == 0.5369
    assert abs(c15.flops_ratio - 0.587) < 0.02
    assert abs(c15.dense_flops / 1e12 - 8.38) < 0.2
    for vision in (2500, 2880):
        nxt = prefill_cost(PRESETS["llava-next-7b"], vision, 200)
        assert abs(nxt.flops_ratio - 0.556) < 0.02
    assert abs(prefill_cost(PRESETS["llava-next-7b"], 2500, 200).dense_flops / 1e12 - 39.46) < 1.0


def _decoder_flops(model, **inputs):
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(**inputs, use_cache=False)
    counts = counter.get_flop_counts()
    return sum(sum(v.values()) for k, v in counts.items() if re.search(r"\.layers\.\d+$", k))


def test_analytic_flops_match_flop_counter():
    dense = tiny_causal_lm("llama", num_layers=6, attn_implementation="eager", hidden_size=64, num_kv_heads=2)
    n_vision, n_text = 48, 16
    ids = torch.randint(1, 120, (1, n_vision + n_text))
    target = torch.zeros_like(ids, dtype=torch.bool)
    target[0, 8 : 8 + n_vision] = True
    measured_dense = _decoder_flops(dense, input_ids=ids)
    model = pmod.apply_pmod(dense, pmod.PModConfig())
    randomize_routers(model)
    measured_pmod = _decoder_flops(model, input_ids=ids, target_mask=target)
    cost = prefill_cost(shape_from_config(model.config), n_vision, n_text, resolved=model.pmod)
    assert abs(cost.dense_flops / measured_dense - 1) < 0.05
    assert abs(cost.pmod_flops / measured_pmod - 1) < 0.05
    assert abs(cost.flops_ratio - measured_pmod / measured_dense) < 0.02
    # and the realised accounting of that very forward agrees with the analytic one
    realized = realized_cost(model)
    assert realized.flops_ratio[0] == pytest.approx(cost.flops_ratio, rel=1e-9)
    assert realized.kv_ratio[0] == pytest.approx(cost.kv_ratio, rel=1e-9)


def test_realized_cost_differs_per_row():
    model = _model()
    inputs, _ = llava_inputs(model)  # 16, 32, 0 and 16 vision tokens, different text lengths
    with torch.no_grad():
        model(**inputs)
    realized = realized_cost(model)
    assert realized.kv_ratio[2] == 1.0 and realized.flops_ratio[2] > 0.99  # no image: only the routers cost extra
    assert realized.kv_ratio[1] < 1.0 and realized.flops_ratio[1] < realized.flops_ratio[0]
    shape = shape_from_config(model.config)
    mask = inputs["attention_mask"]
    n_vision = int((inputs["input_ids"][0] == model.config.image_token_id).sum())
    expected = prefill_cost(shape, n_vision, int(mask[0].sum()) - n_vision, resolved=model.pmod)
    assert realized.flops_ratio[0] == pytest.approx(expected.flops_ratio, rel=1e-9)


def test_flops_cli(tmp_path, capsys):
    assert main(["flops", "--preset", "llava-1.5-7b", "--vision-tokens", "576", "--text-tokens", "64", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert 0.55 < out["flops_ratio"] < 0.6 and round(out["kv_ratio"], 4) == 0.5369
    assert len(out["layers"]) == 32 and out["assumptions"]
    assert out["flops_ratio"] < out["total_flops_ratio"] < out["flops_ratio"] + 0.02  # one 336 px crop: cheap
    args = ["flops", "--preset", "llava-1.5-7b", "--vision-tokens", "576", "--text-tokens", "64", "--json"]
    assert main([*args, "--frames", "2"]) == 0  # a video of two frames through the tower
    assert json.loads(capsys.readouterr().out)["vision_encoder_tflops"] == pytest.approx(
        2 * out["vision_encoder_tflops"])
    assert main([*args, "--frames", "2", "--crops", "1"]) == 0  # and an image besides
    assert json.loads(capsys.readouterr().out)["vision_encoder_tflops"] == pytest.approx(
        3 * out["vision_encoder_tflops"])
    assert main(["flops", "--preset", "llava-next-7b", "--vision-tokens", "2880", "--text-tokens", "200"]) == 0
    text = capsys.readouterr().out
    assert "TFLOPs" in text and "assumptions" in text and "whole model:" in text
    model = _model()
    model.save_pretrained(tmp_path)
    assert main(["flops", "--model", str(tmp_path), "--vision-tokens", "16", "--text-tokens", "8", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [layer["routed"] for layer in out["layers"]] == [True, False, True, True]
    # a tiny model's table is in a unit its numbers show in (it printed 0.0 GFLOPs on every row)
    assert main(["flops", "--model", str(tmp_path), "--vision-tokens", "16", "--text-tokens", "8"]) == 0
    text = capsys.readouterr().out
    assert "dense MFLOPs" in text and " 0.0 " not in text.split("decoder layers")[0]


def test_newer_architecture_presets_and_configs():
    from pmod.cli import PRESET_NAMES
    from pmod.efficiency import PRESETS, prefill_cost, shape_from_config
    from pmod.tiny import tiny_llava_onevision, tiny_qwen2_vl

    assert set(PRESET_NAMES) == set(PRESETS)
    for name in ("qwen2-vl-7b", "qwen2.5-vl-7b", "llava-onevision-7b"):
        cost = prefill_cost(PRESETS[name], 1024, 64, pmod.PModConfig())
        assert 0.45 < cost.flops_ratio < 0.65 and cost.kv_ratio == pytest.approx(0.5375, abs=0.01)
    qwen = shape_from_config(pmod.apply_pmod(tiny_qwen2_vl(), pmod.PModConfig()).config)
    assert qwen.decoder.num_layers == 4 and qwen.decoder.num_kv_heads == 2
    # the ViT's width is embed_dim (32), its merger maps 4 x 32 into the decoder's 64; full attention, GELU MLP
    assert (qwen.vision.hidden, qwen.vision.intermediate, qwen.vision.merge, qwen.vision.image_size) == (32, 64, 4, 0)
    assert qwen.vision.projector == ((128, 128), (128, 64)) and not qwen.vision.window and not qwen.vision.gated_mlp
    qwen25 = shape_from_config(pmod.apply_pmod(tiny_qwen2_vl(version="2.5"), pmod.PModConfig()).config).vision
    # windows of 8 px = 4 x 4 patches in block 0, full attention in block 1 (fullatt_block_indexes [1]); SwiGLU MLP
    assert (qwen25.window, qwen25.windowed_layers, qwen25.gated_mlp) == (16, 1, True)
    onevision = shape_from_config(tiny_llava_onevision().config)
    assert onevision.vision.hidden == 32 and onevision.crops == 5


@pytest.mark.parametrize("family", ["qwen3-vl-moe", "gemma3-wide-heads", "mistral3", "internvl-qwen3",
                                    "llava-next-video", "idefics3"])
def test_analytic_flops_of_newer_families_match_flop_counter(family):
    """Head sizes wider than hidden / heads (Gemma 3, Mistral-Small), sparse MoE layers with a dense first layer
    (Qwen3-VL-MoE) and sliding-window layers: the cost model counts what the layers compute (eager attention
    computes the whole matrix, so the paper's full count applies)."""
    import transformers

    from pmod.tiny import tiny_gemma3, tiny_internvl, tiny_llava_next_video, tiny_mistral3, tiny_qwen3_vl, tiny_smolvlm

    if family == "qwen3-vl-moe":
        dense = tiny_qwen3_vl(moe=True, attn_implementation="eager")
        dense.set_experts_implementation("eager")  # FlopCounterMode does not count grouped_mm: one matmul per expert
    elif family == "gemma3-wide-heads":
        cfg = tiny_gemma3().config
        cfg.text_config.head_dim = 32  # query width 4 x 32 = 128 against hidden 64
        cfg.text_config.query_pre_attn_scalar = 32
        cfg._attn_implementation = cfg.text_config._attn_implementation = "eager"
        dense = transformers.Gemma3ForConditionalGeneration(cfg).eval()
    elif family == "internvl-qwen3":  # a Qwen3 decoder: q/k norms, head_dim from the config
        dense = tiny_internvl(family="qwen3", attn_implementation="eager")
    elif family == "llava-next-video":
        dense = tiny_llava_next_video(attn_implementation="eager")
    elif family == "idefics3":
        dense = tiny_smolvlm(version="idefics3", attn_implementation="eager")
    else:
        dense = tiny_mistral3(attn_implementation="eager")
    shape = shape_from_config(dense.config)
    n_vision, n_text = 24, 8
    ids = torch.randint(5, 100, (1, n_vision + n_text))
    target = torch.zeros_like(ids, dtype=torch.bool)
    target[0, 4 : 4 + n_vision] = True
    measured_dense = _decoder_flops(dense, input_ids=ids)
    model = pmod.apply_pmod(dense, pmod.PModConfig(schedule=[1.0, 0.5, 0.3, 0.25]))
    randomize_routers(model)
    measured_pmod = _decoder_flops(model, input_ids=ids, target_mask=target)
    cost = prefill_cost(shape, n_vision, n_text, resolved=model.pmod)
    assert abs(cost.dense_flops / measured_dense - 1) < 0.05
    assert abs(cost.pmod_flops / measured_pmod - 1) < 0.05
    if family == "qwen3-vl-moe":
        assert shape.decoder.moe_layers == (1, 2, 3) and shape.vision.merge == 4 and shape.vision.image_size == 0
    if family == "gemma3-wide-heads":
        assert shape.decoder.q_width == 128 and shape.decoder.sliding_layers == (0, 2)


def _vision_inputs(family: str):
    """A tiny model of ``family`` (eager attention), a call of its vision tower and projector as the model's forward
    makes it, and the shape and vision tokens that call corresponds to."""
    import transformers

    from pmod.tiny import tiny_gemma3, tiny_internvl, tiny_llava_next_video, tiny_mistral3, tiny_qwen3_vl, tiny_smolvlm

    if family.startswith(("qwen2-vl", "qwen2.5-vl")):  # patch 2, temporal patch 2, 2 x 2 merge; 2.5: windows of 4 x 4
        # patches (2 x 2 merged cells) in block 0, full attention in block 1
        from pmod.tiny import tiny_qwen2_vl

        model = tiny_qwen2_vl(version=family.split("-")[0][4:], attn_implementation="eager")
        shape = shape_from_config(model.config)
        if family.endswith("-video"):  # four frames of 8 x 4 patches: two frame pairs (attended apart), 16 tokens
            return model, lambda: model.model.get_video_features(torch.randn(64, 24), torch.tensor([[2, 8, 4]])), \
                shape.with_crops(0).with_frames(4), 16
        if family.endswith("-two"):  # two images of 8 x 8 patches (four windows each): 32 tokens
            return model, lambda: model.model.get_image_features(torch.randn(128, 24), torch.tensor([[1, 8, 8]] * 2)), \
                shape.with_crops(2), 32
        # one image of 16 x 8 patches (eight windows): 32 tokens
        return model, lambda: model.model.get_image_features(torch.randn(128, 24), torch.tensor([[1, 16, 8]])), \
            shape, 32
    if family in ("qwen3-vl", "qwen3-vl-moe"):  # one image of 8 x 8 patches (2 px, temporal patch 2): 16 tokens
        model = tiny_qwen3_vl(moe=family == "qwen3-vl-moe", attn_implementation="eager")
        return model, lambda: model.model.get_image_features(torch.randn(64, 24), torch.tensor([[1, 8, 8]])), \
            shape_from_config(model.config), 16
    if family == "qwen3-vl-video":  # four frames of 4 x 4 patches: two temporal patches (attended apart), 8 tokens
        model = tiny_qwen3_vl(attn_implementation="eager")
        return model, lambda: model.model.get_video_features(torch.randn(32, 24), torch.tensor([[2, 4, 4]])), \
            shape_from_config(model.config).with_crops(0).with_frames(4), 8
    if family == "internvl":  # three 32 px tiles of 16 patches and a CLS token, pixel-shuffled to 4 tokens each
        model = tiny_internvl(attn_implementation="eager")
        return model, lambda: model.model.get_image_features(
            torch.randn(3, 3, 32, 32), vision_feature_layer=-1, vision_feature_select_strategy="default"), \
            shape_from_config(model.config), 12
    if family == "gemma3":  # two 32 px images of 16 patches, pooled 2 x 2 to 4 tokens each (SigLIP's head computed)
        model = tiny_gemma3(attn_implementation="eager")
        return model, lambda: model.model.get_image_features(torch.randn(2, 3, 32, 32)), \
            shape_from_config(model.config), 8
    if family == "gemma3-no-head":  # as the released checkpoints: vision_use_head false
        cfg = tiny_gemma3().config
        cfg.vision_config.vision_use_head = False
        cfg._attn_implementation = cfg.vision_config._attn_implementation = "eager"
        model = transformers.Gemma3ForConditionalGeneration(cfg).eval()
        return model, lambda: model.model.get_image_features(torch.randn(2, 3, 32, 32)), \
            shape_from_config(model.config), 8
    if family == "mistral3":  # one 32 x 24 px image: 8 x 6 patches of 4 px, merged 2 x 2 into 12 tokens
        model = tiny_mistral3(attn_implementation="eager")
        return model, lambda: model.model.get_image_features(
            torch.randn(1, 3, 32, 24), image_sizes=torch.tensor([[32, 24]]), vision_feature_layer=-1), \
            shape_from_config(model.config), 12
    if family == "llava-next-video-image":  # a 56 px image: anyres 2 x 2 crops and the base image, 16 patches each
        model = tiny_llava_next_video(attn_implementation="eager")
        return model, lambda: model.model.get_image_features(
            torch.randn(1, 5, 3, 28, 28), image_sizes=torch.tensor([[56, 56]]), vision_feature_layer=-2,
            vision_feature_select_strategy="default"), shape_from_config(model.config), 5 * 16
    if family == "llava-next-video-video":  # three frames of 16 patches, pooled 2 x 2 to 4 tokens each
        model = tiny_llava_next_video(attn_implementation="eager")
        return model, lambda: model.model.get_video_features(
            torch.randn(1, 3, 3, 28, 28), vision_feature_layer=-2, vision_feature_select_strategy="default"), \
            shape_from_config(model.config).with_crops(0).with_frames(3), 12
    # SmolVLM / Idefics3: five 32 px crops of 16 patches, pixel-shuffled (scale 2) to 4 tokens each
    model = tiny_smolvlm(version=family, attn_implementation="eager")
    return model, lambda: model.model.get_image_features(torch.randn(1, 5, 3, 32, 32)), \
        shape_from_config(model.config), 20


@pytest.mark.parametrize("family", ["qwen2-vl", "qwen2-vl-two", "qwen2-vl-video", "qwen2.5-vl", "qwen2.5-vl-two",
                                    "qwen2.5-vl-video", "qwen3-vl", "qwen3-vl-moe", "qwen3-vl-video", "internvl",
                                    "gemma3", "gemma3-no-head", "mistral3", "llava-next-video-image",
                                    "llava-next-video-video", "smolvlm", "idefics3"])
def test_analytic_vision_flops_match_flop_counter(family):
    """The vision tower and projector as the model runs them (its get_image_features / get_video_features, eager
    attention): the cost model counts what they compute for that many images, tiles, crops or frames."""
    model, run, shape, n_vision = _vision_inputs(family)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        features = run()
    measured = counter.get_total_flops()
    cost = prefill_cost(shape, n_vision, 4)
    analytic = cost.vision_encoder_flops + cost.projector_flops
    assert abs(analytic / measured - 1) < 0.05, (family, analytic, measured)
    if family.startswith("qwen"):  # the patch embedding, every block's matmuls and the mergers: exactly
        assert analytic == measured, (family, analytic, measured)
    assert cost.total_flops_ratio > cost.flops_ratio
    pooled = features.pooler_output
    if family != "llava-next-video-image":  # anyres: the decoder gets the crops' features unpadded, plus newlines
        tokens = sum(f[..., 0].numel() for f in (pooled if isinstance(pooled, (list, tuple)) else [pooled]))
        assert tokens == n_vision  # the token count the analytic shape derived its patches or crops from


def test_qwen2_5_vl_windows_cut_short_cost_less_than_counted():
    """The count assumes an image whose grid fills whole windows; one whose sides are not multiples of a window's
    (here 6 x 6 patches against windows of 4 x 4: windows of 16, 8, 8 and 4 patches) computes less in its windowed
    layers, never more."""
    from pmod.tiny import tiny_qwen2_vl

    model = tiny_qwen2_vl(version="2.5", attn_implementation="eager")
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model.model.get_image_features(torch.randn(36, 24), torch.tensor([[1, 6, 6]]))
    cost = prefill_cost(shape_from_config(model.config), 9, 4)
    d = 32
    cut_short = 4 * d * (36 * 16 - (16**2 + 8**2 + 8**2 + 4**2))  # block 0's attention: 36 x 16 pairs counted
    assert cost.vision_encoder_flops + cost.projector_flops - counter.get_total_flops() == cut_short


def _released_configs() -> dict:
    """The published configs' vision settings (and the decoder widths the projectors map into) of the presets."""
    import transformers

    qwen3_vision = dict(depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16, patch_size=16,
                        temporal_patch_size=2, spatial_merge_size=2, deepstack_visual_indexes=[8, 16, 24])
    return {
        # Qwen/Qwen2-VL-7B-Instruct: its vision hidden_size is the merger's output, embed_dim the ViT's width
        "qwen2-vl-7b": transformers.Qwen2VLConfig(
            vision_config=dict(depth=32, embed_dim=1280, mlp_ratio=4, num_heads=16, patch_size=14,
                               spatial_merge_size=2, temporal_patch_size=2, hidden_size=3584),
            text_config=dict(hidden_size=3584)),
        # Qwen/Qwen2.5-VL-7B-Instruct
        "qwen2.5-vl-7b": transformers.Qwen2_5_VLConfig(
            vision_config=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, patch_size=14,
                               spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                               fullatt_block_indexes=[7, 15, 23, 31], out_hidden_size=3584),
            text_config=dict(hidden_size=3584)),
        "qwen3-vl-8b": transformers.Qwen3VLConfig(vision_config=dict(qwen3_vision, out_hidden_size=4096),
                                                  text_config=dict(hidden_size=4096)),
        "qwen3-vl-30b-a3b": transformers.Qwen3VLMoeConfig(vision_config=dict(qwen3_vision, out_hidden_size=2048),
                                                          text_config=dict(hidden_size=2048)),
        "internvl3-8b": transformers.InternVLConfig(
            vision_config=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                               image_size=[448, 448], patch_size=[14, 14]),
            text_config=dict(model_type="qwen2", hidden_size=3584), downsample_ratio=0.5),
        "gemma-3-12b": transformers.Gemma3Config(
            vision_config=dict(model_type="siglip_vision_model", hidden_size=1152, intermediate_size=4304,
                               num_hidden_layers=27, num_attention_heads=16, image_size=896, patch_size=14,
                               vision_use_head=False),
            text_config=dict(hidden_size=3840), mm_tokens_per_image=256),
        "mistral-small-3.1-24b": transformers.Mistral3Config(
            vision_config=dict(model_type="pixtral", hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                               num_attention_heads=16, head_dim=64, image_size=1540, patch_size=14),
            text_config=dict(model_type="mistral", hidden_size=5120), spatial_merge_size=2, vision_feature_layer=-1,
            multimodal_projector_bias=False),
    }


def test_newer_family_presets():
    import dataclasses

    from pmod.efficiency import decoder_layer_flops

    released = _released_configs()
    for name in ("qwen2-vl-7b", "qwen2.5-vl-7b", "qwen3-vl-8b", "qwen3-vl-30b-a3b", "internvl3-8b", "gemma-3-12b",
                 "mistral-small-3.1-24b"):
        cost = prefill_cost(PRESETS[name], 1024, 64, pmod.PModConfig())
        assert 0.4 < cost.flops_ratio < 0.7 and cost.kv_ratio < 0.65, name
        assert not any("vision encoder and projector are not counted" in a for a in cost.assumptions), name
        assert cost.vision_encoder_flops > 0 and cost.projector_flops > 0, name
        # the vision tower costs the dense and the p-MoD model the same: the whole model saves less than its decoder
        assert cost.flops_ratio + 0.03 < cost.total_flops_ratio < 0.85, name
        # the preset's vision shape is what shape_from_config reads from the released config
        assert (dataclasses.replace(shape_from_config(released[name]).vision, note="")
                == dataclasses.replace(PRESETS[name].vision, note="")), name
    qwen = prefill_cost(PRESETS["qwen3-vl-8b"], 1024, 64)
    assert any("4096 patches" in a and "(4 times)" in a for a in qwen.assumptions)  # merger + 3 DeepStack mergers
    intern = prefill_cost(PRESETS["internvl3-8b"], 1024, 64)
    assert any("4 crop(s)" in a and "1025 tokens each" in a for a in intern.assumptions)  # 448 px tiles + CLS
    moe = PRESETS["qwen3-vl-30b-a3b"].decoder
    # about 3B of its 30B parameters are active: a token costs close to 2 x 3B FLOPs in its layers' matmuls
    per_token = sum(decoder_layer_flops(1, moe, layer=i) for i in range(moe.num_layers))
    assert 2 * 2.0e9 < per_token < 2 * 3.5e9
    gemma = PRESETS["gemma-3-12b"].decoder
    assert (decoder_layer_flops(8192, gemma, causal=True, layer=0)
            < decoder_layer_flops(8192, gemma, causal=True, layer=5))
    # Qwen2.5-VL: 28 of its 32 blocks attend within windows of 112 px (8 x 8 patches), and the assumption says so;
    # Qwen2-VL's blocks all attend within the whole image, so its tower costs more at the same width
    qwen25 = prefill_cost(PRESETS["qwen2.5-vl-7b"], 1024, 64)
    assert any("4096 patches" in a and "28 of its layers attend within windows of 8x8 patches" in a
               and "grid assumed to fill whole windows" in a for a in qwen25.assumptions)
    assert qwen25.vision_encoder_flops < prefill_cost(PRESETS["qwen2-vl-7b"], 1024, 64).vision_encoder_flops
