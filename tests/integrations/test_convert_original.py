"""Conversion of checkpoints saved by the original p-MoD code (LLaVA layout).

The tests write tiny checkpoints in the original key layout and compare the converted model with a
functional re-implementation of what the original code computes (method.md), written from the raw
original-layout tensors: -200 placeholder expansion, CLIP layer -2 without CLS, mlp2x_gelu projector, Llama
decoder with routed layers (original schedule with its hard-coded 31, TanhNorm, STRing).
"""

import json
import math

import pytest
import torch
import torch.nn.functional as F

import pmod
from pmod.integrations.convert import ConversionError, convert_original, parse_original_settings
from tests.helpers.original import HD, KV, D, H, L, V, _original_config, _original_state, write_original

PLACEHOLDER = -200


# ---------------------------------------------------------------------- the original computation, functionally
def _rms(x, w, eps=1e-5):
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def _rope(x, pos):  # x (n, heads, hd)
    inv = 1.0 / (10000.0 ** (torch.arange(0, HD, 2, dtype=torch.float32) / HD))
    freqs = pos[:, None].float() * inv[None]
    cos, sin = torch.cat([freqs, freqs], -1).cos()[:, None], torch.cat([freqs, freqs], -1).sin()[:, None]
    rot = torch.cat([-x[..., HD // 2 :], x[..., : HD // 2]], -1)
    return x * cos + rot * sin


def _attention(state, p, x, pos):
    n = x.shape[0]
    q = _rope((x @ state[p + "self_attn.q_proj.weight"].T).view(n, H, HD), pos)
    k = _rope((x @ state[p + "self_attn.k_proj.weight"].T).view(n, KV, HD), pos).repeat_interleave(H // KV, 1)
    v = (x @ state[p + "self_attn.v_proj.weight"].T).view(n, KV, HD).repeat_interleave(H // KV, 1)
    scores = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(HD)
    scores = scores.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
    out = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v).reshape(n, D)
    return out @ state[p + "self_attn.o_proj.weight"].T


def _mlp(state, p, x):
    return (F.silu(x @ state[p + "mlp.gate_proj.weight"].T)
            * (x @ state[p + "mlp.up_proj.weight"].T)) @ state[p + "mlp.down_proj.weight"].T


def original_logits(state, vision, settings, ids, pixel_values, feats=None, base_tokens=0):
    """Logits of the original code for one prompt with -200 placeholders (one image per placeholder).

    ``feats`` (a list of (n_i, D) image features) replaces the LLaVA-1.5 vision path. ``base_tokens``: the first
    features of each image that are not routed (``vision_hr``: the base image of an anyres image).
    """
    if feats is None:
        feats = vision(pixel_values, output_hidden_states=True).hidden_states[-2][:, 1:]  # (images, 16, 32)
        feats = F.gelu(feats @ state["model.mm_projector.0.weight"].T + state["model.mm_projector.0.bias"])
        feats = feats @ state["model.mm_projector.2.weight"].T + state["model.mm_projector.2.bias"]
    rows, target, image = [], [], 0
    for t in ids:
        if t == PLACEHOLDER:
            rows += list(feats[image])
            target += [False] * base_tokens + [True] * (len(feats[image]) - base_tokens)
            image += 1
        else:
            rows.append(state["model.embed_tokens.weight"][t])
            target.append(False)
    x, pos = torch.stack(rows), torch.arange(len(rows))
    for i in range(L):
        routed = i in settings.routed_layers
        p = f"model.layers.{i}." + ("decoder_layer." if routed else "")
        if not routed:
            h = x + _attention(state, p, _rms(x, state[p + "input_layernorm.weight"]), pos)
            x = h + _mlp(state, p, _rms(h, state[p + "post_attention_layernorm.weight"]))
            continue
        s = x @ state[f"model.layers.{i}.router.router.weight"][0] + state[f"model.layers.{i}.router.router.bias"][0]
        g = 0.2 * torch.tanh(s) + 1.0
        vis = [j for j in range(len(rows)) if target[j]]
        k = int(torch.tensor(float(len(vis)), dtype=torch.float32)
                * torch.tensor(settings.schedule[i], dtype=torch.float32))
        chosen = set(sorted(vis, key=lambda j: (-float(s[j]), j))[:k])
        keep = [j for j in range(len(rows)) if not target[j] or j in chosen]
        xs = x[keep]
        h = xs + _attention(state, p, _rms(xs, state[p + "input_layernorm.weight"]), pos[keep])
        m = _mlp(state, p, _rms(h, state[p + "post_attention_layernorm.weight"]))
        new = g[:, None] * x  # skipped vision tokens
        for r, j in enumerate(keep):
            new[j] = h[r] + (g[j] if target[j] else 1.0) * m[r]
        x = new
    return _rms(x, state["model.norm.weight"]) @ state["lm_head.weight"].T


def expand(ids, image_token_id, per_image=16):
    out = []
    for t in ids:
        out += [image_token_id] * per_image if t == PLACEHOLDER else [t]
    return torch.tensor([out])


PINPOINTS = [[28, 56], [56, 28], [56, 56], [84, 28], [28, 84]]


def _original_tokenizer():
    """A V-word tokenizer without an image token, like the original Vicuna tokenizer (ids 0-3 special)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<unk>", "<s>", "</s>", "USER", "ASSISTANT", ":", "?"] + [f"w{i}" for i in range(V - 8)]
    tok = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>")


# ---------------------------------------------------------------------- tests
def test_original_schedule_strings():
    s = parse_original_settings({"mod_target_layers": "shiftedcos_decay_0.85_0.15"}, 32)
    assert s.routed_layers == list(range(8, 32))
    assert [round(r, 4) for r in s.schedule[8:12]] == [0.8445, 0.8061, 0.7645, 0.7202]
    # the original's hard-coded 31: a 16-layer model decays only half-way
    assert parse_original_settings({"mod_target_layers": "shiftedcos_decay_0.85_0.15"}, 16).schedule[-1] > 0.5
    for bad in ({"mod_target_layers": "cosine_0.5"}, {"mod_target_layers": "shiftedcos_decay_a_b"},
                {"mod_target_layers": "shiftedcos_decay_0.85_0.15", "mod_weight_norm": "sigmoid"},
                {"mod_target_layers": "shiftedcos_decay_0.85_0.15", "mod_target_token_type": "text"},
                {"mod_target_layers": "shiftedcos_decay_0.85_0.15", "mod_target_token_type": "vision_hr"},  # no anyres
                {"mod_target_layers": "shiftedcos_decay_0.85_0.15", "mod_router_factor": float("nan")}):
        with pytest.raises(ConversionError):
            parse_original_settings(bad, 32)


def test_released_settings():
    """The released checkpoints' settings: PRD over layers 8-31, every vision token routed, TanhNorm 0.2 / 1, bias."""
    s = parse_original_settings(_original_config(), 32)
    assert s.routed_layers == list(range(8, 32)) and s.targets == "vision"
    assert (s.alpha, s.beta, s.router_bias, s.tanh_norm, s.string) == (0.2, 1.0, True, True, True)
    assert round(sum(s.layer_ratios(32)) / 32, 4) == 0.5375  # the paper's 53.8% KV cache
    assert parse_original_settings({**_original_config(), "mod_target_token_type": "all"}, 32).targets == "all"
    anyres = {**_original_config(), "image_aspect_ratio": "anyres", "mod_target_token_type": "vision_hr"}
    assert parse_original_settings(anyres, 32).targets == "vision_hr"
    # mod_router_factor is the schedule's shift (average ratio): raw(l) = 0.5 cos(pi l / 31) + factor
    shifted = parse_original_settings({**_original_config(), "mod_router_factor": 0.4}, 32)
    assert shifted.routed_layers == list(range(5, 32))  # 0.5 cos(5 pi / 31) + 0.4 = 0.837 <= 0.85
    assert shifted.schedule[16] == pytest.approx(0.5 * math.cos(math.pi * 16 / 31) + 0.4)
    assert shifted.schedule[31] == 0.15


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    root = tmp_path_factory.mktemp("orig")
    state, vision, settings = _original_state()
    write_original(root / "src", state, _original_config())
    _original_tokenizer().save_pretrained(root / "src")
    vision.config.save_pretrained(root / "clip")  # --vision-tower: the hub id in the config is not available here
    convert_original(root / "src", root / "out", vision_tower=root / "clip")
    return pmod.load_model(root / "out").eval(), state, vision, settings, root


def test_converted_model_computes_the_original_logits(converted):
    model, state, vision, settings, _ = converted
    assert model.pmod.routed_layers == settings.routed_layers
    assert model.config.image_token_id == V
    gen = torch.Generator().manual_seed(3)
    ids = [1, 5, 9, PLACEHOLDER, 11, 12, 13, 40, 41]
    px = torch.randn(1, 3, 28, 28, generator=gen)
    with torch.no_grad():
        expected = original_logits(state, vision, settings, ids, px)
        got = model(input_ids=expand(ids, V), pixel_values=px).logits[0, :, :V]
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_converted_model_greedy_generation_matches_original(converted):
    model, state, vision, settings, _ = converted
    ids = [1, 7, PLACEHOLDER, 20, 21, 22]
    px = torch.randn(1, 3, 28, 28, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        expected = list(ids)
        for _ in range(5):
            expected.append(int(original_logits(state, vision, settings, expected, px)[-1].argmax()))
        prompt = expand(ids, V)
        got = model.generate(input_ids=prompt, pixel_values=px, max_new_tokens=5, do_sample=False)[0, prompt.shape[1] :]
    assert got.tolist() == expected[len(ids) :]


def test_original_conversion_errors(tmp_path, converted):
    state, _, _ = _original_state()
    config = _original_config()
    write_original(tmp_path / "novision", state, config)
    with pytest.raises(ConversionError, match="--vision-tower"):
        convert_original(tmp_path / "novision", tmp_path / "o0")
    bad = dict(state)
    bad.pop("model.layers.9.router.router.weight")
    write_original(tmp_path / "missing", bad, config)
    with pytest.raises(ConversionError, match="missing.*layers.9.router.weight"):
        convert_original(tmp_path / "missing", tmp_path / "o1", vision_tower=converted[4] / "clip")
    write_original(tmp_path / "badname", {**state, "model.layers.3.extra.weight": torch.zeros(2)}, config)
    with pytest.raises(ConversionError, match="unexpected"):
        convert_original(tmp_path / "badname", tmp_path / "o2", vision_tower=converted[4] / "clip")
    write_original(tmp_path / "shape", {**state, "model.mm_projector.2.bias": torch.zeros(5)}, config)
    with pytest.raises(ConversionError, match="wrong shapes.*linear_2.bias"):
        convert_original(tmp_path / "shape", tmp_path / "o3", vision_tower=converted[4] / "clip")
    write_original(tmp_path / "setting", state, {**config, "mod_weight_norm": "softmax_1"})
    with pytest.raises(ConversionError, match="mod_weight_norm"):
        convert_original(tmp_path / "setting", tmp_path / "o4", vision_tower=converted[4] / "clip")
    write_original(tmp_path / "shard", state, config)
    (tmp_path / "shard" / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(ConversionError, match="missing weight shards"):
        convert_original(tmp_path / "shard", tmp_path / "o5", vision_tower=converted[4] / "clip")
    assert not any((tmp_path / f"o{i}").exists() for i in range(0, 6))
    _, _, _, _, root = converted
    with pytest.raises(ConversionError, match="already exists"):
        convert_original(root / "src", root / "out", vision_tower=root / "clip")


def test_converted_processor_builds_inputs_the_model_accepts(converted):
    from PIL import Image
    from transformers import AutoProcessor

    model, *_, root = converted
    processor = AutoProcessor.from_pretrained(root / "out")
    assert processor.tokenizer.convert_tokens_to_ids("<image>") == V
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "w1 w2 ?"}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(images=Image.new("RGB", (40, 20), (250, 0, 0)), text=text, return_tensors="pt")
    assert int((inputs["input_ids"] == V).sum()) == 16
    assert inputs["pixel_values"].shape == (1, 3, 28, 28)
    with torch.no_grad():
        model(**inputs)


def test_convert_original_cli(converted, tmp_path, capsys):
    from pmod.cli import main

    *_, root = converted
    args = ["convert", "original", str(root / "src"), str(tmp_path / "cli"), "--vision-tower", str(root / "clip")]
    assert main(args) == 0
    assert json.loads((tmp_path / "cli" / "config.json").read_text())["model_type"] == "pmod_llava"
    assert main(args) == 2 and "already exists" in capsys.readouterr().err
    assert main(args + ["--force"]) == 0


def test_llava_next_original_conversion(tmp_path, converted):
    """anyres + spatial_unpad: image_newline carried; decoder and routing equal the original computation on the
    packed image features (the anyres packing itself is transformers' LLaVA-NeXT code)."""
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    state, vision, settings = _original_state()
    state["model.image_newline"] = torch.randn(D, generator=torch.Generator().manual_seed(7))
    config = {**_original_config(), "image_aspect_ratio": "anyres", "mm_patch_merge_type": "spatial_unpad",
              "image_grid_pinpoints": PINPOINTS}
    write_original(tmp_path / "src", state, config)
    convert_original(tmp_path / "src", tmp_path / "out", vision_tower=converted[4] / "clip")
    model = pmod.load_model(tmp_path / "out").eval()
    assert type(model).__name__ == "PModLlavaNextForConditionalGeneration"
    assert torch.equal(model.model.image_newline, state["model.image_newline"])
    sizes = torch.tensor([[28, 56]])
    patches = image_size_to_num_patches([28, 56], PINPOINTS, 28)
    px = torch.randn(1, patches, 3, 28, 28, generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        feats = list(model.model.get_image_features(px, sizes).pooler_output)
        ids = [1, 5, PLACEHOLDER, 11, 12]
        expected = original_logits(state, vision, settings, ids, None, feats=feats)
        got = model(input_ids=expand(ids, V, feats[0].shape[0]), pixel_values=px, image_sizes=sizes).logits[0, :, :V]
    assert feats[0].shape[0] > 16  # base image + high-resolution grid + newlines
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_llava_next_vision_hr_conversion(tmp_path, converted):
    """mod_target_token_type 'vision_hr': the base-image tokens of an anyres image are processed in every layer, only
    the high-resolution part (with its newlines) is routed, as in the original computation."""
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    state, vision, _ = _original_state()
    state["model.image_newline"] = torch.randn(D, generator=torch.Generator().manual_seed(7))
    config = {**_original_config(), "image_aspect_ratio": "anyres", "mm_patch_merge_type": "spatial_unpad",
              "image_grid_pinpoints": PINPOINTS, "mod_target_token_type": "vision_hr"}
    settings = parse_original_settings(config, L)
    write_original(tmp_path / "src", state, config)
    convert_original(tmp_path / "src", tmp_path / "out", vision_tower=converted[4] / "clip")
    model = pmod.load_model(tmp_path / "out").eval()
    assert model.pmod.settings.targets == "vision_hr"
    sizes = torch.tensor([[56, 28]])
    px = torch.randn(1, image_size_to_num_patches([56, 28], PINPOINTS, 28), 3, 28, 28,
                     generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        feats = list(model.model.get_image_features(px, sizes).pooler_output)
        ids = [1, 5, PLACEHOLDER, 11, 12]
        expected = original_logits(state, vision, settings, ids, None, feats=feats, base_tokens=16)
        got = model(input_ids=expand(ids, V, feats[0].shape[0]), pixel_values=px, image_sizes=sizes).logits[0, :, :V]
        every = original_logits(state, vision, settings, ids, None, feats=feats)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(got, every, rtol=1e-4, atol=1e-4)  # routing the base image too would differ
    assert int(model.routing()[8].target.sum()) == feats[0].shape[0] - 16


def test_original_bin_checkpoint(tmp_path, converted):
    """Unsharded pytorch_model.bin (read with weights_only=True) converts to the same model."""
    model, state, *_ , root = converted
    (tmp_path / "src").mkdir()
    torch.save(state, tmp_path / "src" / "pytorch_model.bin")
    (tmp_path / "src" / "config.json").write_text(json.dumps(_original_config()))
    convert_original(tmp_path / "src", tmp_path / "out", vision_tower=root / "clip")
    again = pmod.load_model(tmp_path / "out")
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), model.state_dict().values()))
    (tmp_path / "src" / "pytorch_model.bin").write_bytes(b"not a checkpoint")
    with pytest.raises(ConversionError, match="Cannot read weights"):
        convert_original(tmp_path / "src", tmp_path / "out2", vision_tower=root / "clip")
