"""A plain, per-example reference implementation of method.md, written independently of pmod's routed layer.

One example at a time, padding removed, Python-level selection; it reuses only the model's own sub-modules
(embeddings, vision path, norms, attention, MLP, rotary embedding, lm_head).
"""

from __future__ import annotations

import math

import torch


class _Stop(Exception):
    pass


def merged_embeddings(model, input_ids, pixel_values=None, image_sizes=None, **extra):
    """(1, T, D) input embeddings of one example with its image features spliced in, via the model's own code."""
    captured = {}

    def capture_and_stop(module, args, kwargs):
        captured["x"] = kwargs["inputs_embeds"]
        captured["positions"] = kwargs.get("position_ids")
        if kwargs.get("deepstack_visual_embeds") is not None:  # Qwen3-VL: added after the first decoder layers
            captured["deepstack"] = (kwargs["visual_pos_masks"][0], kwargs["deepstack_visual_embeds"])
        raise _Stop  # the decoder stack is what the reference reimplements

    handle = _inner(model).register_forward_pre_hook(capture_and_stop, with_kwargs=True)
    kwargs = {"image_sizes": image_sizes} if image_sizes is not None else {}
    kwargs.update({k: v for k, v in extra.items() if v is not None})
    try:
        with torch.no_grad():
            model.model(input_ids=input_ids, pixel_values=pixel_values, **kwargs)
    except _Stop:
        pass
    finally:
        handle.remove()
    return captured["x"], captured.get("positions"), captured.get("deepstack")


def _inner(model):
    """The decoder stack (layers, norm, rotary embedding) of a multimodal or text-only model."""
    for name in ("language_model", "text_model"):  # SmolVLM / Idefics3: text_model
        if hasattr(model.model, name):
            return getattr(model.model, name)
    return model.model


def causal_mask(n: int, dtype) -> torch.Tensor:
    m = torch.full((n, n), torch.finfo(dtype).min, dtype=dtype).triu(1)
    return m[None, None]


def layer_mask(model, i: int, kept: list[int], blocks: list[int], dtype) -> torch.Tensor:
    """(1, 1, n, n) additive mask of layer ``i`` over the tokens at sequence positions ``kept`` (ascending), written
    from the family's rules: causal; Gemma 3 also lets an image's tokens (``blocks[p]``: the image of position p, -1
    for text) see each other both ways, and its sliding layers see only keys within the window."""
    text = model.config.get_text_config(decoder=True)
    if text.model_type != "gemma3_text":
        return causal_mask(len(kept), dtype)
    sliding = text.layer_types[i] == "sliding_attention"
    allowed = [[(k <= q or blocks[q] == blocks[k] != -1) and (not sliding or k > q - text.sliding_window)
                for k in kept] for q in kept]
    m = torch.zeros(len(kept), len(kept), dtype=dtype).masked_fill(~torch.tensor(allowed), torch.finfo(dtype).min)
    return m[None, None]


def rotary(model, inner, x, position_ids, i: int):
    """The rotary tables of layer ``i`` (Gemma 3: one pair per layer type)."""
    text = model.config.get_text_config(decoder=True)
    if text.model_type == "gemma3_text":
        return inner.rotary_emb(x, position_ids, text.layer_types[i])
    return inner.rotary_emb(x, position_ids)


def image_blocks(target: torch.Tensor) -> list[int]:
    """Per position, the index of the run of consecutive target tokens it belongs to (an image), -1 elsewhere."""
    blocks, run, previous = [], -1, False
    for t in target.tolist():
        if t and not previous:
            run += 1
        blocks.append(run if t else -1)
        previous = t
    return blocks


def reference_language_model(model, x: torch.Tensor, positions: torch.Tensor, target: torch.Tensor,
                             deepstack=None) -> torch.Tensor:
    """Run the decoder stack of a p-MoD model on one example.

    x: (n, D) input embeddings of the non-padding tokens; positions: (n,) their position ids, or (3, n)
    multimodal (M-RoPE) position ids; target: (n,) bool routed positions; deepstack: Qwen3-VL's (visual (n,) bool,
    [features (n_visual, D)] per layer), added to the visual positions after layers 0, 1, ... Returns (n, vocab)
    logits.
    """
    mrope = positions.dim() == 2

    def batched(p):  # position ids with a batch axis: (1, n) or (3, 1, n)
        return p[:, None] if mrope else p[None]

    inner = _inner(model)
    x = x[None]  # (1, n, D)
    blocks = image_blocks(target)
    for i, layer in enumerate(inner.layers):
        x = _reference_layer(model, inner, layer, i, x, positions, target, batched, mrope, blocks)
        if deepstack is not None and i < len(deepstack[1]):
            visual, features = deepstack
            x = x.clone()
            x[0, visual] = x[0, visual] + features[i].to(x.dtype)
    x = inner.norm(x)
    logits = model.lm_head(x)[0]
    cap = getattr(model.config.get_text_config(decoder=True), "final_logit_softcapping", None)
    return torch.tanh(logits / cap) * cap if cap else logits


def _reference_layer(model, inner, layer, i, x, positions, target, batched, mrope, blocks):
    """Decoder layer ``i`` of the reference on (1, n, D) hidden states."""
    pmod = model.pmod
    if i not in pmod.routed_layers:
        cos_sin = rotary(model, inner, x, batched(positions), i)
        return layer(x, attention_mask=layer_mask(model, i, list(range(x.shape[1])), blocks, x.dtype),
                     position_embeddings=cos_sin, position_ids=None if mrope else positions[None])
    ratio = pmod.layer_ratios[i]
    bias = layer.router.bias.float() if layer.router.bias is not None else 0.0
    s_t = x[0].float() @ layer.router.weight[0].float() + bias  # (n,) router logits, fp32
    s = s_t.tolist()
    targets = [j for j in range(x.shape[1]) if target[j]]
    k = math.floor(float(torch.tensor(len(targets), dtype=torch.float32) * torch.tensor(ratio, dtype=torch.float32)))
    ranked = sorted(targets, key=lambda j: (-s[j], j))
    selected = set(ranked[:k])
    keep = [j for j in range(x.shape[1]) if (not target[j]) or j in selected]
    raw = torch.tanh(s_t) if pmod.settings.tanh_norm else s_t
    g = (pmod.settings.alpha * raw + pmod.settings.beta).to(x.dtype)  # (n,)
    skip = g if pmod.settings.string else torch.ones_like(g)
    out = []
    if not keep:  # nothing processed: every token is a skipped target
        return (skip[:, None] * x[0])[None]
    xs = x[:, keep]
    cos_sin = rotary(model, inner, xs, batched(positions[..., keep]), i)
    attn, _ = layer.self_attn(
        hidden_states=layer.input_layernorm(xs),
        attention_mask=layer_mask(model, i, keep, blocks, x.dtype),
        position_embeddings=cos_sin,
        position_ids=None if mrope else positions[keep][None],  # read by Ministral 3's attention
    )
    if hasattr(layer, "pre_feedforward_layernorm"):  # Gemma 3: each branch normed before and after
        h = xs + layer.post_attention_layernorm(attn)
        m = layer.post_feedforward_layernorm(layer.mlp(layer.pre_feedforward_layernorm(h)))
    else:
        h = xs + attn
        m = layer.mlp(layer.post_attention_layernorm(h))
    kept_out = {j: (h[0, r] + (g[j] if target[j] else 1.0) * m[0, r]) for r, j in enumerate(keep)}
    for j in range(x.shape[1]):
        out.append(kept_out[j] if j in kept_out else skip[j] * x[0, j])
    return torch.stack(out)[None]


def reference_logits(model, input_ids, attention_mask=None, pixel_values=None, image_sizes=None, position_ids=None,
                     images_per_row=None, targets="vision", pixel_values_videos=None, videos_per_row=None,
                     row_inputs=None):
    """Per-example reference logits for a batch: a list of (n_b, vocab) tensors over each row's non-padding positions.

    ``images_per_row[b]`` says how many entries of ``pixel_values`` (in order) belong to row b;
    ``row_inputs(b)`` may give row b's model inputs directly (e.g. Qwen2-VL's flat patches and grids).
    """
    batch, length = input_ids.shape
    mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
    if position_ids is None:
        position_ids = torch.arange(length).expand(batch, length)
    images_per_row = images_per_row or [0] * batch
    videos_per_row = videos_per_row or [0] * batch
    outs = []
    cursor = video_cursor = 0
    for b in range(batch):
        px = sizes = None
        valid = mask[b].bool()
        ids = input_ids[b][valid][None]
        if _inner(model) is not model.model:  # a multimodal model
            n = images_per_row[b]
            px = pixel_values[cursor : cursor + n] if n else None
            sizes = image_sizes[cursor : cursor + n] if (n and image_sizes is not None) else None
            cursor += n
            nv = videos_per_row[b]
            videos = pixel_values_videos[video_cursor : video_cursor + nv] if nv else None
            has_video = False
            video_cursor += nv
            kwargs = {"pixel_values": px, "image_sizes": sizes, "pixel_values_videos": videos}
            kwargs.update(row_inputs(b) if row_inputs else {})
            x, model_positions, deepstack = merged_embeddings(model, ids, **kwargs)
            x = x[0]
            has_video = kwargs.get("pixel_values_videos") is not None
        else:
            x, model_positions, has_video, deepstack = model.get_input_embeddings()(ids)[0], None, False, None
        if targets in ("vision", "vision_hr"):
            target = ids[0] == model.config.image_token_id
            if targets == "vision_hr" and px is not None:  # LLaVA-NeXT: each image's base tokens come first
                vision = model.config.vision_config
                base = (vision.image_size // vision.patch_size) ** 2
                with torch.no_grad():
                    counts = [f.shape[0] for f in model.model.get_image_features(px, sizes).pooler_output]
                positions = target.nonzero().squeeze(1).tolist()
                start = 0
                for count in counts:
                    target[positions[start : start + base]] = False
                    start += count
            if has_video and getattr(model.config, "video_token_id", None) is not None:
                target = target | (ids[0] == model.config.video_token_id)
        else:
            target = torch.ones(ids.shape[1], dtype=torch.bool)
        if model_positions is not None and model_positions.dim() == 3:  # M-RoPE ids the model computed: (3, 1, n)
            positions = model_positions[-3:, 0]
        else:
            positions = position_ids[b][valid]
            if hasattr(_inner(model).rotary_emb, "mrope_section"):  # M-RoPE: text positions on all three axes
                positions = positions.expand(3, -1)
        outs.append(reference_language_model(model, x, positions, target, deepstack))
    return outs
