"""Small random-weight models built from configs, for tests, benchmarks, the demo and CPU training recipes (no hub
needed)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal, get_args

import torch
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    MistralConfig,
    PreTrainedModel,
    ProcessorMixin,
    Qwen2Config,
)

from .errors import PModConfigError

TEXT_CONFIGS = {"llama": LlamaConfig, "qwen2": Qwen2Config, "mistral": MistralConfig}


def text_config(
    family: str = "llama",
    vocab_size: int = 128,
    hidden_size: int = 64,
    num_layers: int = 4,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int | None = None,
    attn_implementation: str = "sdpa",
    **kwargs,
):
    cfg = TEXT_CONFIGS[family](
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or 2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=4096,
        **kwargs,
    )
    cfg._attn_implementation = attn_implementation
    return cfg


def vision_config(image_size: int = 28, patch_size: int = 7, hidden_size: int = 32, num_layers: int = 2):
    return CLIPVisionConfig(
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        image_size=image_size,
        patch_size=patch_size,
        projection_dim=hidden_size,
    )


def tiny_llava(
    num_layers: int = 4,
    hidden_size: int = 64,
    vocab_size: int = 128,
    image_size: int = 28,
    patch_size: int = 7,
    attn_implementation: str = "sdpa",
    family: str = "llama",
    seed: int = 0,
    vision_hidden_size: int = 32,
    vision_layers: int = 2,
) -> LlavaForConditionalGeneration:
    """A LLaVA-1.5-shaped model: (image_size / patch_size)^2 image tokens per image; image token = vocab_size - 1."""
    torch.manual_seed(seed)
    cfg = LlavaConfig(
        vision_config=vision_config(image_size, patch_size, vision_hidden_size, vision_layers),
        text_config=text_config(family, vocab_size, hidden_size, num_layers, attn_implementation=attn_implementation),
        image_token_id=vocab_size - 1,
        image_seq_length=(image_size // patch_size) ** 2,
    )
    cfg._attn_implementation = attn_implementation
    return LlavaForConditionalGeneration(cfg).eval()


def tiny_llava_next(
    num_layers: int = 4,
    hidden_size: int = 64,
    vocab_size: int = 128,
    image_size: int = 28,
    patch_size: int = 7,
    attn_implementation: str = "sdpa",
    seed: int = 0,
) -> LlavaNextForConditionalGeneration:
    """A LLaVA-NeXT-shaped model with anyres grid pinpoints [[1,2],[2,1],[2,2],[3,1],[1,3]] x image_size."""
    torch.manual_seed(seed)
    pinpoints = [[a * image_size, b * image_size] for a, b in [[1, 2], [2, 1], [2, 2], [3, 1], [1, 3]]]
    cfg = LlavaNextConfig(
        vision_config=vision_config(image_size, patch_size),
        text_config=text_config("llama", vocab_size, hidden_size, num_layers, attn_implementation=attn_implementation),
        image_token_id=vocab_size - 1,
        image_grid_pinpoints=pinpoints,
    )
    cfg._attn_implementation = attn_implementation
    return _init_newline(LlavaNextForConditionalGeneration(cfg).eval())


def _init_newline(model: PreTrainedModel) -> PreTrainedModel:
    with torch.no_grad():  # anyres models create image_newline uninitialised
        model.model.image_newline.normal_(0, 0.5)
    return model


def tiny_llava_onevision(
    num_layers: int = 4,
    hidden_size: int = 64,
    vocab_size: int = 128,
    image_size: int = 28,
    patch_size: int = 7,
    attn_implementation: str = "sdpa",
    seed: int = 0,
) -> PreTrainedModel:
    """A LLaVA-OneVision-shaped model: tiny SigLIP, Qwen2 decoder, anyres grid pinpoints up to 2x2 x image_size;
    image token = vocab_size - 1, video token = vocab_size - 2."""
    from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration, SiglipVisionConfig

    torch.manual_seed(seed)
    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                image_size=image_size, patch_size=patch_size)
    pinpoints = [[a * image_size, b * image_size] for a, b in [[1, 1], [1, 2], [2, 1], [2, 2]]]
    cfg = LlavaOnevisionConfig(
        vision_config=vision,
        text_config=text_config("qwen2", vocab_size, hidden_size, num_layers, attn_implementation=attn_implementation),
        image_token_id=vocab_size - 1,
        video_token_id=vocab_size - 2,
        image_grid_pinpoints=pinpoints,
        vision_feature_layer=-1,
    )
    cfg._attn_implementation = attn_implementation
    return _init_newline(LlavaOnevisionForConditionalGeneration(cfg).eval())


def mrope_sections(head_dim: int) -> list[int]:
    """Temporal, height and width rotary sections in Qwen2-VL's proportions (1/4, 3/8, 3/8 of the rotary
    half-dimension: [16, 24, 24] at head_dim 128, [2, 3, 3] at 16)."""
    if head_dim % 2:
        raise ValueError(f"rotary embeddings need an even head size, got {head_dim}")
    half = head_dim // 2
    t = half // 4
    return [t, (half - t) // 2, half - t - (half - t) // 2]


def tiny_qwen2_vl(
    num_layers: int = 4,
    hidden_size: int = 64,
    vocab_size: int = 128,
    version: str = "2",
    attn_implementation: str = "sdpa",
    seed: int = 0,
    patch_size: int = 2,
) -> PreTrainedModel:
    """A Qwen2-VL (``version="2"``) or Qwen2.5-VL (``"2.5"``) shaped model: patch ``patch_size``, temporal patch 2,
    2x2 merge (one token per 4 patches of a frame pair), M-RoPE sections as Qwen's (`mrope_sections`), Qwen2.5-VL
    windows of 2 x 2 merged cells; image / video / vision-start / vision-end tokens are vocab_size - 1 ..
    vocab_size - 4."""
    import transformers

    torch.manual_seed(seed)
    vision = dict(depth=2, num_heads=4, patch_size=patch_size, spatial_merge_size=2, temporal_patch_size=2,
                  in_channels=3)
    if version == "2":
        vision.update(embed_dim=32, hidden_size=hidden_size, mlp_ratio=2)
        config_cls, model_cls = transformers.Qwen2VLConfig, transformers.Qwen2VLForConditionalGeneration
    elif version == "2.5":
        vision.update(hidden_size=32, intermediate_size=64, out_hidden_size=hidden_size, window_size=4 * patch_size,
                      fullatt_block_indexes=[1])
        config_cls, model_cls = transformers.Qwen2_5_VLConfig, transformers.Qwen2_5_VLForConditionalGeneration
    else:
        raise ValueError(f"version must be '2' or '2.5', got {version!r}")
    text = dict(vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=num_layers, num_attention_heads=4,
                num_key_value_heads=2, intermediate_size=2 * hidden_size, bos_token_id=2,
                eos_token_id=3, pad_token_id=0,
                rope_parameters={"rope_type": "default", "mrope_section": mrope_sections(hidden_size // 4),
                                 "rope_theta": 10000.0})
    cfg = config_cls(
        vision_config=vision, text_config=text, image_token_id=vocab_size - 1, video_token_id=vocab_size - 2,
        vision_start_token_id=vocab_size - 3, vision_end_token_id=vocab_size - 4,
    )
    cfg._attn_implementation = attn_implementation
    cfg.get_text_config()._attn_implementation = attn_implementation
    return model_cls(cfg).eval()


def tiny_qwen3_vl(
    num_layers: int = 4,
    hidden_size: int = 64,
    vocab_size: int = 128,
    moe: bool = False,
    attn_implementation: str = "sdpa",
    seed: int = 0,
    patch_size: int = 2,
) -> PreTrainedModel:
    """A Qwen3-VL shaped model (``moe=True``: Qwen3-VL-MoE, 4 experts of which 2 per token, layer 0 a plain MLP):
    patch ``patch_size``, temporal patch 2, 2x2 merge, interleaved M-RoPE sections, DeepStack features of both vision
    blocks added after text layers 0 and 1; image / video / vision-start / vision-end tokens are vocab_size - 1 ..
    vocab_size - 4 (as `tiny_qwen2_vl`)."""
    import transformers

    torch.manual_seed(seed)
    vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=patch_size, in_channels=3,
                  temporal_patch_size=2, spatial_merge_size=2, out_hidden_size=hidden_size,
                  num_position_embeddings=64,  # a square: the learned 2-D position table (8 x 8) is interpolated
                  deepstack_visual_indexes=[0, 1])
    head_dim = hidden_size // 4
    text = dict(vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=num_layers, num_attention_heads=4,
                num_key_value_heads=2, head_dim=head_dim, intermediate_size=2 * hidden_size, bos_token_id=2,
                eos_token_id=3, pad_token_id=0,
                rope_parameters={"rope_type": "default", "mrope_section": mrope_sections(head_dim),
                                 "mrope_interleaved": True, "rope_theta": 10000.0})
    if moe:
        text.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=hidden_size // 2, decoder_sparse_step=1,
                    mlp_only_layers=[0])
        config_cls, model_cls = transformers.Qwen3VLMoeConfig, transformers.Qwen3VLMoeForConditionalGeneration
    else:
        config_cls, model_cls = transformers.Qwen3VLConfig, transformers.Qwen3VLForConditionalGeneration
    cfg = config_cls(
        vision_config=vision, text_config=text, image_token_id=vocab_size - 1, video_token_id=vocab_size - 2,
        vision_start_token_id=vocab_size - 3, vision_end_token_id=vocab_size - 4, tie_word_embeddings=False,
    )
    cfg._attn_implementation = attn_implementation
    cfg.get_text_config()._attn_implementation = attn_implementation
    return model_cls(cfg).eval()


def _text_dict(family: str, vocab_size: int, hidden_size: int, num_layers: int) -> dict:
    """A tiny decoder's config as a dict (the form multimodal configs take for their text part)."""
    text = dict(model_type=family, vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2,
                head_dim=hidden_size // 4, max_position_embeddings=4096, pad_token_id=0, bos_token_id=2,
                eos_token_id=3)
    if family == "ministral3":
        # Ministral 3's attention scales queries by 1 + beta * log(1 + floor(position / original_max)): an original
        # length of 8 makes the scaling reach the tiny prompts' positions
        text["rope_parameters"] = {"rope_type": "yarn", "rope_theta": 1e6, "factor": 512.0,  # 4096 / 8
                                   "original_max_position_embeddings": 8, "beta_fast": 32.0, "beta_slow": 1.0,
                                   "mscale_all_dim": 1.0, "mscale": 1.0, "llama_4_scaling_beta": 0.1}
    if family in ("mistral", "ministral3"):
        text["sliding_window"] = None
    return text


def _finish(model_cls: type, cfg, attn_implementation: str) -> PreTrainedModel:
    cfg._attn_implementation = attn_implementation
    cfg.get_text_config()._attn_implementation = attn_implementation
    return model_cls(cfg).eval()


def _tiny_vit(image_size: int, patch_size: int, **extra) -> dict:
    """The vision config (a dict) of the tiny towers built from one: 2 layers of width 32 with 2 heads, for
    ``image_size``-pixel images in ``patch_size``-pixel patches; ``extra`` adds the family's own keys."""
    return dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=image_size,
                patch_size=patch_size, **extra)


def _pooled_side(image_size: int, patch_size: int) -> int:
    """Image tokens a side for towers that merge 2 x 2 patches into a token (Gemma 3's pooling, InternVL's and
    Idefics3's pixel shuffle): the patches a side must be a whole, even number."""
    if image_size % patch_size or (image_size // patch_size) % 2:
        raise ValueError(f"image_size ({image_size}) must be an even multiple of patch_size ({patch_size}): 2 x 2 "
                         "patches make an image token")
    return image_size // patch_size // 2


def tiny_internvl(
    num_layers: int = 4,
    hidden_size: int = 64,
    vocab_size: int = 128,
    family: str = "qwen2",
    attn_implementation: str = "sdpa",
    seed: int = 0,
    image_size: int = 32,
    patch_size: int = 8,
) -> PreTrainedModel:
    """An InternVL-shaped model (InternVL3 / 3.5 -hf): ``image_size``-pixel tiles of ``patch_size``-pixel patches
    (32 and 8 by default), pixel-shuffled (0.5) into image tokens (4 per tile by default); a ``family`` decoder
    ("qwen2", "qwen3" or "llama"). Image token = vocab_size - 1, <img> and </img> = vocab_size - 3 and - 4."""
    from transformers import InternVLConfig, InternVLForConditionalGeneration

    torch.manual_seed(seed)
    side = _pooled_side(image_size, patch_size)
    cfg = InternVLConfig(text_config=_text_dict(family, vocab_size, hidden_size, num_layers),
                         vision_config=_tiny_vit(image_size, patch_size),
                         image_token_id=vocab_size - 1, image_seq_length=side**2, downsample_ratio=0.5,
                         vision_feature_layer=-1, vision_feature_select_strategy="default", tie_word_embeddings=False)
    return _finish(InternVLForConditionalGeneration, cfg, attn_implementation)


def tiny_mistral3(
    num_layers: int = 4,
    hidden_size: int = 64,
    vocab_size: int = 128,
    family: str = "mistral",
    attn_implementation: str = "sdpa",
    seed: int = 0,
) -> PreTrainedModel:
    """A Mistral 3-shaped model: a Pixtral tower of 4-pixel patches merged 2 x 2 (one image token per 8 x 8 pixels,
    images of any multiple of 8), a ``family`` decoder ("mistral": Mistral-Small-3.x, "ministral3": Ministral 3).
    [IMG] = vocab_size - 1, [IMG_BREAK] = vocab_size - 2, [IMG_END] = vocab_size - 3."""
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration

    torch.manual_seed(seed)
    vision = _tiny_vit(64, 4, model_type="pixtral", head_dim=16)
    cfg = Mistral3Config(text_config=_text_dict(family, vocab_size, hidden_size, num_layers), vision_config=vision,
                         image_token_index=vocab_size - 1, spatial_merge_size=2, vision_feature_layer=-1,
                         tie_word_embeddings=False)
    return _finish(Mistral3ForConditionalGeneration, cfg, attn_implementation)


def tiny_llava_next_video(
    num_layers: int = 4,
    hidden_size: int = 64,
    vocab_size: int = 128,
    image_size: int = 28,
    patch_size: int = 7,
    attn_implementation: str = "sdpa",
    seed: int = 0,
) -> PreTrainedModel:
    """A LLaVA-NeXT-Video-shaped model: images as `tiny_llava_next`'s (anyres), videos pooled 2 x 2 per frame
    ((image_size / patch_size / 2)^2 tokens a frame). Image token = vocab_size - 1, video token = vocab_size - 2."""
    from transformers import LlavaNextVideoConfig, LlavaNextVideoForConditionalGeneration

    torch.manual_seed(seed)
    pinpoints = [[a * image_size, b * image_size] for a, b in [[1, 2], [2, 1], [2, 2], [3, 1], [1, 3]]]
    cfg = LlavaNextVideoConfig(
        vision_config=vision_config(image_size, patch_size),
        text_config=text_config("llama", vocab_size, hidden_size, num_layers, attn_implementation=attn_implementation),
        image_token_index=vocab_size - 1, video_token_index=vocab_size - 2, image_grid_pinpoints=pinpoints,
        spatial_pool_stride=2, image_seq_length=(image_size // patch_size) ** 2,
        video_seq_length=(image_size // patch_size // 2) ** 2, tie_word_embeddings=False,
    )
    return _init_newline(_finish(LlavaNextVideoForConditionalGeneration, cfg, attn_implementation))


def tiny_gemma3(
    num_layers: int = 4,
    hidden_size: int = 64,
    vocab_size: int = 128,
    sliding_window: int = 6,
    attn_implementation: str = "sdpa",
    seed: int = 0,
    image_size: int = 32,
    patch_size: int = 8,
) -> PreTrainedModel:
    """A Gemma 3-shaped image-text model: a SigLIP tower of ``image_size``-pixel images in ``patch_size``-pixel
    patches, pooled 2 x 2 into image tokens (4 an image by default); sliding-window (``sliding_window``, short enough
    to matter in tiny prompts) and global layers alternating. Image token = vocab_size - 1, start / end of image =
    vocab_size - 3 / - 4; end of sequence 1."""
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    torch.manual_seed(seed)
    head_dim = hidden_size // 4
    text = dict(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2, head_dim=head_dim,
                query_pre_attn_scalar=head_dim, max_position_embeddings=4096, sliding_window=sliding_window,
                layer_types=["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(num_layers)],
                pad_token_id=0, bos_token_id=2, eos_token_id=1)
    side = _pooled_side(image_size, patch_size)
    vision = _tiny_vit(image_size, patch_size, model_type="siglip_vision_model")
    cfg = Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=side**2,
                       image_token_index=vocab_size - 1,
                       boi_token_index=vocab_size - 3, eoi_token_index=vocab_size - 4)
    return _finish(Gemma3ForConditionalGeneration, cfg, attn_implementation)


def tiny_smolvlm(
    num_layers: int = 4,
    hidden_size: int = 64,
    vocab_size: int = 128,
    version: str = "smolvlm",
    attn_implementation: str = "sdpa",
    seed: int = 0,
    image_size: int = 32,
    patch_size: int = 8,
) -> PreTrainedModel:
    """A SmolVLM-shaped (``version="smolvlm"``) or Idefics3-shaped (``"idefics3"``) model: ``image_size``-pixel crops
    of ``patch_size``-pixel patches (32 and 8 by default), pixel-shuffled (scale 2) into image tokens (4 a crop by
    default); a Llama decoder. Image token = vocab_size - 1,
    <fake_token_around_image> = vocab_size - 3, <global-img> = vocab_size - 4, <row_1_col_j> = vocab_size - 5 - j."""
    import transformers

    torch.manual_seed(seed)
    config_cls, model_cls = {
        "smolvlm": (transformers.SmolVLMConfig, transformers.SmolVLMForConditionalGeneration),
        "idefics3": (transformers.Idefics3Config, transformers.Idefics3ForConditionalGeneration),
    }[version]
    _pooled_side(image_size, patch_size)  # refuses sizes the pixel shuffle cannot take
    cfg = config_cls(text_config=_text_dict("llama", vocab_size, hidden_size, num_layers),
                     vision_config=_tiny_vit(image_size, patch_size),
                     image_token_id=vocab_size - 1, scale_factor=2, tie_word_embeddings=False, pad_token_id=0)
    return _finish(model_cls, cfg, attn_implementation)


def tiny_causal_lm(family: str = "llama", num_layers: int = 4, attn_implementation: str = "sdpa", seed: int = 0,
                   **kwargs) -> PreTrainedModel:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    cfg = text_config(family, num_layers=num_layers, attn_implementation=attn_implementation, **kwargs)
    return AutoModelForCausalLM.from_config(cfg, attn_implementation=attn_implementation).eval()


def randomize_routers(model: torch.nn.Module, scale: float = 0.5, seed: int = 1) -> None:
    """Give every router non-zero weights (tests of the routed path)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in model.routed_layers().values():
            w = torch.randn(layer.router.weight.shape, generator=gen) * scale
            layer.router.weight.copy_(w.to(layer.router.weight.dtype))
            if layer.router.bias is not None:
                layer.router.bias.copy_((torch.randn(1, generator=gen) * 0.1).to(layer.router.bias.dtype))


def word_tokenizer(words: list[str], vocab_size: int, placeholders: dict[str, int] | None = None,
                   specials: tuple[str, ...] = ("<pad>", "<unk>", "<s>", "</s>"), eos: str = "</s>",
                   named: dict[str, str] | None = None):
    """A word-level fast tokenizer: ``specials`` first (pad, unk, bos, eos by default), then ``words``;
    ``placeholders`` (default ``{"<image>": vocab_size - 1}``) are special tokens at fixed ids; ``named`` gives some
    of them the attribute names processors read (``{"boi_token": "<start_of_image>"}``: ``tokenizer.boi_token``)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    placeholders = {"<image>": vocab_size - 1} if placeholders is None else placeholders
    vocab = {w: i for i, w in enumerate(dict.fromkeys([*specials, *(w for w in words if w not in placeholders)]))}
    if len(vocab) > min(placeholders.values(), default=vocab_size):
        raise ValueError(f"{len(vocab)} words do not fit a vocabulary of {vocab_size} (the top ids are placeholders).")
    vocab.update(placeholders)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    extra = [t for t in specials if t not in ("<pad>", "<unk>", "<s>", eos)]
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>" if "<s>" in specials else None, eos_token=eos, unk_token="<unk>",
        pad_token="<pad>", additional_special_tokens=[*extra, *placeholders], padding_side="left",
        **({"extra_special_tokens": named} if named else {}),
    )
    return fast


def tiny_llava_processor(model: LlavaForConditionalGeneration, words: list[str] | None = None):
    """A `LlavaProcessor` matching a `tiny_llava` model: word tokenizer, CLIP image processor, Vicuna chat template."""
    from transformers import LlavaProcessor

    from .data.conversation import vicuna_v1_template

    try:  # the PIL backend (no torchvision here); older transformers only has the one class
        from transformers import CLIPImageProcessorPil as CLIPImageProcessor
    except ImportError:
        from transformers import CLIPImageProcessor

    vision = model.config.vision_config
    words = words or "USER ASSISTANT : what is in the image ? a red blue green circle square triangle yes no".split()
    tokenizer = word_tokenizer(words, model.config.text_config.vocab_size)
    size = vision.image_size
    image_processor = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=vision.patch_size,
        vision_feature_select_strategy=model.config.vision_feature_select_strategy,
        num_additional_image_tokens=1,
        chat_template=vicuna_v1_template(system=None),  # the tiny vocabularies hold none of the system prompt's words
    )


def chatml_template(image: str, video: str) -> str:
    """A ChatML chat template (Qwen2-VL, LLaVA-OneVision) for content lists of {"type": "image" | "video" |
    "text"}, with the given text for an image and a video."""
    return (
        "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
        "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
        "{% for c in message['content'] %}"
        "{% if c['type'] == 'image' %}" + image + "{% elif c['type'] == 'video' %}" + video +
        "{% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )


CHATML_TEMPLATE = chatml_template("<|vision_start|><|image_pad|><|vision_end|>",
                                  "<|vision_start|><|video_pad|><|vision_end|>")
CHATML_SPECIALS = ("<pad>", "<unk>", "<s>", "<|im_end|>", "<|im_start|>")
CHATML_WORDS = "user assistant system what is in the image ? a red blue green circle square yes no".split()


def _image_processor_class(name: str) -> type:
    """transformers' image processor ``name`` as ``AutoImageProcessor`` loads it here: the torchvision backend where
    torchvision is installed, else the PIL one (``{name}Pil``), so a saved and reloaded processor is the same."""
    import transformers

    from .compat import export_pil_image_processors
    from .processors import has_torchvision

    export_pil_image_processors()  # Idefics3 / SmolVLM without torchvision on transformers 5.17
    return getattr(transformers, name if has_torchvision() else f"{name}Pil")


def tiny_qwen2_vl_processor(model: PreTrainedModel, words: list[str] | None = None, image_size: int | None = None):
    """A Qwen2-VL / Qwen2.5-VL processor matching a `tiny_qwen2_vl` model: word tokenizer with the model's
    placeholder ids, transformers' image processor (every image resized to ``image_size`` squared pixels when
    given) and video processor (`pmod.processors.default_video_processor`: pmod's frame video processor where
    torchvision is missing), and a ChatML template."""
    from .processors import build_processor

    image_processor_class = _image_processor_class("Qwen2VLImageProcessor")

    cfg = model.config
    vision = cfg.vision_config
    placeholders = {"<|image_pad|>": cfg.image_token_id, "<|video_pad|>": cfg.video_token_id,
                    "<|vision_start|>": cfg.vision_start_token_id, "<|vision_end|>": cfg.vision_end_token_id}
    tokenizer = word_tokenizer(words or CHATML_WORDS, cfg.get_text_config().vocab_size, placeholders,
                               specials=CHATML_SPECIALS, eos="<|im_end|>")
    factor = vision.patch_size * vision.spatial_merge_size
    pixels = {} if image_size is None else {"min_pixels": image_size**2, "max_pixels": image_size**2}
    if image_size is not None and image_size % factor:
        raise ValueError(f"image_size must be a multiple of patch_size * spatial_merge_size = {factor}")
    image_processor = image_processor_class(patch_size=vision.patch_size, merge_size=vision.spatial_merge_size,
                                            temporal_patch_size=vision.temporal_patch_size, **pixels)
    name = "Qwen2_5_VLProcessor" if cfg.model_type.endswith("2_5_vl") else "Qwen2VLProcessor"
    return build_processor(name, image_processor, tokenizer, chat_template=CHATML_TEMPLATE)


def tiny_qwen3_vl_processor(model: PreTrainedModel, words: list[str] | None = None, image_size: int = 28):
    """A Qwen3-VL processor matching a `tiny_qwen3_vl` model: word tokenizer with the model's placeholder ids,
    transformers' image processor (images resized to ``image_size`` squared pixels) and video processor (video frames
    of ``image_size`` squared to 8 times that pixels; `pmod.processors.default_video_processor`: pmod's frame video
    processor where torchvision is missing), and a ChatML template."""
    from .processors import build_processor, default_video_processor

    cfg = model.config
    vision = cfg.vision_config
    placeholders = {"<|image_pad|>": cfg.image_token_id, "<|video_pad|>": cfg.video_token_id,
                    "<|vision_start|>": cfg.vision_start_token_id, "<|vision_end|>": cfg.vision_end_token_id}
    tokenizer = word_tokenizer(words or CHATML_WORDS, cfg.get_text_config().vocab_size, placeholders,
                               specials=CHATML_SPECIALS, eos="<|im_end|>")
    factor = vision.patch_size * vision.spatial_merge_size
    if image_size % factor:  # the processor would round it to another size, and another token count
        raise ValueError(f"image_size must be a multiple of patch_size * spatial_merge_size = {factor}")
    grid = dict(patch_size=vision.patch_size, merge_size=vision.spatial_merge_size,
                temporal_patch_size=vision.temporal_patch_size)
    image_processor = _image_processor_class("Qwen2VLImageProcessor")(min_pixels=image_size**2,
                                                                      max_pixels=image_size**2, **grid)
    video_processor = default_video_processor(
        "Qwen3VLProcessor", image_processor, size={"shortest_edge": image_size**2, "longest_edge": 8 * image_size**2})
    return build_processor("Qwen3VLProcessor", image_processor, tokenizer, video_processor,
                           chat_template=CHATML_TEMPLATE)


def tiny_gemma3_processor(model: PreTrainedModel, words: list[str] | None = None):
    """A `Gemma3Processor` matching a `tiny_gemma3` model: word tokenizer with its image, start- and end-of-image
    tokens, transformers' image processor (32-pixel images, no pan-and-scan), a ChatML template writing
    <start_of_image> for an image (which the processor expands to the image's tokens)."""
    from transformers import Gemma3Processor

    cfg = model.config
    tokens = {"<image_soft_token>": cfg.image_token_id, "<start_of_image>": cfg.boi_token_id,
              "<end_of_image>": cfg.eoi_token_id}
    tokenizer = word_tokenizer(words or CHATML_WORDS, cfg.get_text_config().vocab_size, tokens,
                               specials=CHATML_SPECIALS, eos="<|im_end|>",
                               named={"image_token": "<image_soft_token>", "boi_token": "<start_of_image>",
                                      "eoi_token": "<end_of_image>"})
    size = cfg.vision_config.image_size
    image_processor = _image_processor_class("Gemma3ImageProcessor")(size={"height": size, "width": size},
                                                                    do_pan_and_scan=False)
    return Gemma3Processor(image_processor=image_processor, tokenizer=tokenizer,
                           image_seq_length=cfg.mm_tokens_per_image,
                           chat_template=chatml_template("<start_of_image>", ""))


def tiny_mistral3_processor(model: PreTrainedModel, words: list[str] | None = None, image_size: int = 32):
    """A `PixtralProcessor` matching a `tiny_mistral3` model: word tokenizer with [IMG], [IMG_BREAK] and [IMG_END],
    transformers' Pixtral image processor (longest edge ``image_size``, sides in multiples of a merged patch), a ChatML
    template writing [IMG] for an image (which the processor expands row by row)."""
    from transformers import PixtralProcessor

    cfg = model.config
    vocab = cfg.get_text_config().vocab_size
    tokens = {"[IMG]": cfg.image_token_id, "[IMG_BREAK]": vocab - 2, "[IMG_END]": vocab - 3}
    tokenizer = word_tokenizer(words or CHATML_WORDS, vocab, tokens, specials=CHATML_SPECIALS, eos="<|im_end|>")
    patch, merge = cfg.vision_config.patch_size, cfg.spatial_merge_size
    step = patch * merge
    image_processor = _image_processor_class("PixtralImageProcessor")(
        size={"longest_edge": image_size}, patch_size={"height": step, "width": step})
    return PixtralProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=patch,
                            spatial_merge_size=merge, image_token="[IMG]", image_break_token="[IMG_BREAK]",
                            image_end_token="[IMG_END]", chat_template=chatml_template("[IMG]", ""))


def tiny_internvl_processor(model: PreTrainedModel, words: list[str] | None = None, tiles: bool = True):
    """An `InternVLProcessor` matching a `tiny_internvl` model: word tokenizer with <img>, </img>, <IMG_CONTEXT> and
    <video>, transformers' image processor (32-pixel tiles; ``tiles``: an image is cut into up to 4 tiles plus a
    thumbnail, as InternVL does) and video processor (frames resized to one tile; pmod's frame video processor where
    torchvision is missing), a ChatML template writing <IMG_CONTEXT> for an image and <video> for a video."""
    from .processors import build_processor, default_video_processor

    cfg = model.config
    vocab = cfg.get_text_config().vocab_size
    tokens = {"<IMG_CONTEXT>": cfg.image_token_id, "<video>": vocab - 2, "<img>": vocab - 3, "</img>": vocab - 4}
    tokenizer = word_tokenizer(words or CHATML_WORDS, vocab, tokens, specials=CHATML_SPECIALS, eos="<|im_end|>",
                               named={"start_image_token": "<img>", "end_image_token": "</img>",
                                      "context_image_token": "<IMG_CONTEXT>", "video_token": "<video>"})
    side = cfg.vision_config.image_size
    side = side[0] if isinstance(side, (list, tuple)) else side  # InternViT's config gives (height, width)
    image_processor = _image_processor_class("GotOcr2ImageProcessor")(
        size={"height": side, "width": side}, crop_to_patches=tiles, min_patches=1, max_patches=4)
    video_processor = default_video_processor("InternVLProcessor", image_processor,
                                              size={"height": side, "width": side})
    return build_processor("InternVLProcessor", image_processor, tokenizer, video_processor,
                           image_seq_length=cfg.image_seq_length,
                           chat_template=chatml_template("<IMG_CONTEXT>", "<video>"))


def tiny_llava_onevision_processor(model: PreTrainedModel, words: list[str] | None = None):
    """A LLaVA-OneVision processor matching a `tiny_llava_onevision` model: word tokenizer (``<image>`` and
    ``<video>`` at the model's ids), transformers' anyres image processor with the model's grid pinpoints, its
    video processor (pmod's frame video processor where torchvision is missing), and a ChatML template."""
    from .processors import build_processor

    image_processor_class = _image_processor_class("LlavaOnevisionImageProcessor")

    cfg = model.config
    vision = cfg.vision_config
    placeholders = {"<image>": cfg.image_token_id, "<video>": cfg.video_token_id}
    tokenizer = word_tokenizer(words or CHATML_WORDS, cfg.get_text_config().vocab_size, placeholders,
                               specials=CHATML_SPECIALS, eos="<|im_end|>")
    size = vision.image_size
    image_processor = image_processor_class(size={"height": size, "width": size},
                                            image_grid_pinpoints=cfg.image_grid_pinpoints)
    return build_processor(
        "LlavaOnevisionProcessor", image_processor, tokenizer, chat_template=chatml_template("<image>", "<video>"),
        num_image_tokens=(size // vision.patch_size) ** 2,
        vision_feature_select_strategy=cfg.vision_feature_select_strategy, vision_aspect_ratio=cfg.vision_aspect_ratio,
    )


def tiny_llava_next_video_processor(model: PreTrainedModel, words: list[str] | None = None):
    """A `LlavaNextVideoProcessor` matching a `tiny_llava_next_video` model: word tokenizer (``<image>`` and
    ``<video>`` at the model's ids), transformers' anyres image processor with the model's grid pinpoints and its video
    processor (shortest edge resized and centre cropped to the tower's size; pmod's frame video processor where
    torchvision is missing), a ChatML template."""
    from .processors import build_processor, default_video_processor

    cfg = model.config
    vision = cfg.vision_config
    placeholders = {"<image>": cfg.image_token_id, "<video>": cfg.video_token_id}
    tokenizer = word_tokenizer(words or CHATML_WORDS, cfg.get_text_config().vocab_size, placeholders,
                               specials=CHATML_SPECIALS, eos="<|im_end|>")
    size = vision.image_size
    image_processor = _image_processor_class("LlavaNextImageProcessor")(
        size={"shortest_edge": size}, crop_size={"height": size, "width": size},
        image_grid_pinpoints=cfg.image_grid_pinpoints)
    video_processor = default_video_processor("LlavaNextVideoProcessor", image_processor, size={"shortest_edge": size},
                                              crop_size={"height": size, "width": size})
    return build_processor("LlavaNextVideoProcessor", image_processor, tokenizer, video_processor,
                           chat_template=chatml_template("<image>", "<video>"), patch_size=vision.patch_size,
                           vision_feature_select_strategy=cfg.vision_feature_select_strategy,
                           num_additional_image_tokens=1)


def _idefics3_parts(model: PreTrainedModel, words: list[str] | None, image_processor: str):
    """The word tokenizer, image processor and image tokens a crop of `tiny_smolvlm_processor` and
    `tiny_idefics3_processor`: <image>, <end_of_utterance>, <fake_token_around_image>, <global-img> and the
    <row_i_col_j> of up to 2 x 2 crops at the model's ids; transformers' image processor with the model's crop size
    and no resizing to a longest edge (which would make every image the same number of crops), so an image of up to
    one crop (32 pixels by default) is one image and a larger one is cut into crops, row by row, then the whole image
    resized to one crop (the global image). Crops beyond 2 x 2 (images over two crops a side) have no row / column
    token."""
    cfg = model.config
    vocab = cfg.get_text_config().vocab_size
    vision = cfg.vision_config
    tokens = {"<image>": cfg.image_token_id, "<end_of_utterance>": vocab - 2, "<fake_token_around_image>": vocab - 3,
              "<global-img>": vocab - 4}
    tokens |= {f"<row_{i + 1}_col_{j + 1}>": vocab - 5 - 2 * i - j for i in range(2) for j in range(2)}
    tokenizer = word_tokenizer(words or CHATML_WORDS, vocab, tokens, specials=CHATML_SPECIALS, eos="<|im_end|>")
    crop = {"longest_edge": vision.image_size}
    processor = _image_processor_class(image_processor)(do_resize=False, max_image_size=crop)
    return tokenizer, processor, (vision.image_size // vision.patch_size // cfg.scale_factor) ** 2


def tiny_smolvlm_processor(model: PreTrainedModel, words: list[str] | None = None):
    """A `SmolVLMProcessor` matching a `tiny_smolvlm` model (``version="smolvlm"``): `_idefics3_parts`, a video
    processor taking each frame as one crop (`pmod.processors.default_video_processor`: pmod's frame video processor
    where torchvision is missing), a ChatML template writing <image> for an image. Its processor needs `num2words`."""
    from .processors import build_processor, default_video_processor

    tokenizer, image_processor, image_seq_len = _idefics3_parts(model, words, "SmolVLMImageProcessor")
    crop = {"longest_edge": model.config.vision_config.image_size}
    # frames are resized, unlike this image processor's images (do_resize=False): to one crop each
    video_processor = default_video_processor("SmolVLMProcessor", image_processor, size=crop, max_image_size=crop,
                                              do_resize=True)
    return build_processor("SmolVLMProcessor", image_processor, tokenizer, video_processor,
                           image_seq_len=image_seq_len, chat_template=chatml_template("<image>", "<video>"))


def tiny_idefics3_processor(model: PreTrainedModel, words: list[str] | None = None):
    """An `Idefics3Processor` matching a `tiny_smolvlm` model (``version="idefics3"``): `_idefics3_parts`, a ChatML
    template writing <image> for an image (no torchvision needed)."""
    from transformers import Idefics3Processor

    tokenizer, image_processor, image_seq_len = _idefics3_parts(model, words, "Idefics3ImageProcessor")
    return Idefics3Processor(image_processor=image_processor, tokenizer=tokenizer, image_seq_len=image_seq_len,
                             chat_template=chatml_template("<image>", ""))


TinyArch = Literal["llava", "llava-onevision", "llava-next-video", "qwen2-vl", "qwen2.5-vl", "qwen3-vl", "gemma3",
                   "internvl", "smolvlm", "idefics3"]
# the top ids each arch's tiny processor gives its placeholder tokens (see the builders), and the ids below them
# that the word tokenizer's specials (5: ChatML's, 4 for llava) and a spare id take
_RESERVED = {"llava": 6, "smolvlm": 14, "idefics3": 14}


@dataclass
class TinyModelSettings:
    """A tiny random model and processor to train instead of a checkpoint (the ``tiny_model:`` section of a training
    recipe; `build_tiny`).

    Attributes:
        arch: ``llava`` (`tiny_llava`), ``llava-onevision`` (`tiny_llava_onevision`), ``llava-next-video``
            (`tiny_llava_next_video`), ``qwen2-vl`` or ``qwen2.5-vl`` (`tiny_qwen2_vl`), ``qwen3-vl``
            (`tiny_qwen3_vl`), ``gemma3`` (`tiny_gemma3`), ``internvl`` (`tiny_internvl`, Qwen2 decoder),
            ``smolvlm`` or ``idefics3`` (`tiny_smolvlm`); each with its tiny processor and a ChatML template (Vicuna
            for llava).
        num_layers, hidden_size, seed: the builder's arguments.
        vocab_size: null fits the vocabulary to the words (the training data's, then ``words``).
        image_size: the vision encoder's image size (LLaVA family, default 28; Gemma 3, InternVL's tiles and
            SmolVLM / Idefics3's crops: default 32, an even multiple of ``patch_size``); for Qwen2-VL the processor
            resizes images to about ``image_size**2`` pixels (null: kept at their size), for Qwen3-VL to
            ``image_size**2`` (null: 28).
        patch_size: the vision encoder's patch size (null: the builder's default: 7, 2 for Qwen2-VL and Qwen3-VL, 8
            for Gemma 3, InternVL and SmolVLM / Idefics3).
        vision_hidden_size: the vision encoder's width (``arch: llava`` only; null: 32).
        family: the text model of ``arch: llava`` (`TEXT_CONFIGS`).
        words: vocabulary words beyond those of the training data.
    """

    arch: TinyArch = "llava"
    num_layers: int = 4
    hidden_size: int = 64
    vocab_size: int | None = None
    image_size: int | None = None
    patch_size: int | None = None
    vision_hidden_size: int | None = None
    family: str = "llama"
    seed: int = 0
    words: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.arch not in get_args(TinyArch):
            raise PModConfigError(f"tiny_model.arch must be one of {', '.join(get_args(TinyArch))}, got {self.arch!r}")
        for name in ("num_layers", "hidden_size", "vocab_size", "image_size", "patch_size", "vision_hidden_size"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise PModConfigError(f"tiny_model.{name} must be at least 1, got {getattr(self, name)}")
        # the text model has 4 attention heads of an even width (rotary embeddings), LLaVA's vision encoder 4 heads
        if self.hidden_size % 8:
            raise PModConfigError(f"tiny_model.hidden_size must be a multiple of 8 (4 attention heads, each of an even "
                                  f"width), got {self.hidden_size}")
        if self.vision_hidden_size is not None and self.vision_hidden_size % 4:
            raise PModConfigError(f"tiny_model.vision_hidden_size must be a multiple of 4 (4 attention heads), got "
                                  f"{self.vision_hidden_size}")
        if self.vision_hidden_size is not None and self.arch != "llava":
            raise PModConfigError(f"tiny_model.vision_hidden_size is for arch llava only (the others' vision "
                                  f"encoders have a fixed width), got arch {self.arch!r}")
        if self.family not in TEXT_CONFIGS or (self.family != "llama" and self.arch != "llava"):
            raise PModConfigError(f"tiny_model.family must be one of {', '.join(TEXT_CONFIGS)} with arch llava (the "
                                  f"others have their own text model), got {self.family!r} with arch {self.arch!r}")


def build_tiny(settings: TinyModelSettings, words: list[str],
               attn_implementation: str | None = None) -> tuple[PreTrainedModel, ProcessorMixin]:
    """A tiny random model and its processor, with a word-level vocabulary of the chat roles, ``words`` and
    ``settings.words``."""
    arch = settings.arch
    roles = ["USER", "ASSISTANT", ":"] if arch == "llava" else ["user", "assistant", "system"]
    words = roles + list(words) + settings.words
    reserved = _RESERVED.get(arch, 10)  # special and placeholder tokens, and a spare id
    vocab = settings.vocab_size or 8 * math.ceil((len(set(words)) + reserved) / 8)
    kwargs = {"num_layers": settings.num_layers, "hidden_size": settings.hidden_size, "vocab_size": vocab,
              "seed": settings.seed}
    kwargs |= {k: getattr(settings, k) for k in ("patch_size", "image_size", "vision_hidden_size")
               if getattr(settings, k) is not None}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    try:
        if arch in ("qwen2-vl", "qwen2.5-vl"):
            image_size = kwargs.pop("image_size", None)  # a processor setting: Qwen2-VL's encoder takes any size
            model = tiny_qwen2_vl(version=arch[4:-3], **kwargs)
            return model, tiny_qwen2_vl_processor(model, words, image_size=image_size)
        if arch == "qwen3-vl":
            image_size = kwargs.pop("image_size", 28)  # a processor setting, as Qwen2-VL's
            model = tiny_qwen3_vl(**kwargs)
            return model, tiny_qwen3_vl_processor(model, words, image_size=image_size)
        if arch == "llava":
            model = tiny_llava(family=settings.family, **kwargs)
            return model, tiny_llava_processor(model, words)
        if arch == "gemma3":
            model = tiny_gemma3(**kwargs)
            return model, tiny_gemma3_processor(model, words)
        if arch == "internvl":
            model = tiny_internvl(**kwargs)
            return model, tiny_internvl_processor(model, words)
        if arch in ("smolvlm", "idefics3"):
            model = tiny_smolvlm(version=arch, **kwargs)
            processor = tiny_smolvlm_processor if arch == "smolvlm" else tiny_idefics3_processor
            return model, processor(model, words)
        if arch == "llava-next-video":
            model = tiny_llava_next_video(**kwargs)
            return model, tiny_llava_next_video_processor(model, words)
        model = tiny_llava_onevision(**kwargs)
        return model, tiny_llava_onevision_processor(model, words)
    except (TypeError, ValueError, ArithmeticError) as exc:  # e.g. a hidden size the heads do not divide
        raise PModConfigError(f"tiny_model {settings}: {exc}") from exc
