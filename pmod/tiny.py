"""Small random-weight models built from configs, for tests, benchmarks and the demo (no hub needed)."""

from __future__ import annotations

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
    Qwen2Config,
)

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
) -> LlavaForConditionalGeneration:
    """A LLaVA-1.5-shaped model: (image_size / patch_size)^2 image tokens per image; image token = vocab_size - 1."""
    torch.manual_seed(seed)
    cfg = LlavaConfig(
        vision_config=vision_config(image_size, patch_size),
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


def tiny_qwen2_vl(
    num_layers: int = 4,
    hidden_size: int = 64,
    vocab_size: int = 128,
    version: str = "2",
    attn_implementation: str = "sdpa",
    seed: int = 0,
) -> PreTrainedModel:
    """A Qwen2-VL (``version="2"``) or Qwen2.5-VL (``"2.5"``) shaped model: patch 2, temporal patch 2, 2x2 merge
    (one token per 4 patches of a frame pair), M-RoPE sections [2, 3, 3]; image / video / vision-start /
    vision-end tokens are vocab_size - 1 .. vocab_size - 4."""
    import transformers

    torch.manual_seed(seed)
    vision = dict(depth=2, num_heads=4, patch_size=2, spatial_merge_size=2, temporal_patch_size=2, in_channels=3)
    if version == "2":
        vision.update(embed_dim=32, hidden_size=hidden_size, mlp_ratio=2)
        config_cls, model_cls = transformers.Qwen2VLConfig, transformers.Qwen2VLForConditionalGeneration
    elif version == "2.5":
        vision.update(hidden_size=32, intermediate_size=64, out_hidden_size=hidden_size, window_size=8,
                      fullatt_block_indexes=[1])
        config_cls, model_cls = transformers.Qwen2_5_VLConfig, transformers.Qwen2_5_VLForConditionalGeneration
    else:
        raise ValueError(f"version must be '2' or '2.5', got {version!r}")
    text = dict(vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=num_layers, num_attention_heads=4,
                num_key_value_heads=2, intermediate_size=2 * hidden_size, bos_token_id=2, eos_token_id=3, pad_token_id=0,
                rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0})
    cfg = config_cls(
        vision_config=vision, text_config=text, image_token_id=vocab_size - 1, video_token_id=vocab_size - 2,
        vision_start_token_id=vocab_size - 3, vision_end_token_id=vocab_size - 4,
    )
    cfg._attn_implementation = attn_implementation
    cfg.get_text_config()._attn_implementation = attn_implementation
    return model_cls(cfg).eval()


def tiny_causal_lm(family: str = "llama", num_layers: int = 4, attn_implementation: str = "sdpa", seed: int = 0, **kwargs) -> PreTrainedModel:
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


VICUNA_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER: "
    "{% for c in message['content'] %}{% if c['type'] == 'image' %}<image>\n{% else %}{{ c['text'] }}{% endif %}{% endfor %} "
    "{% else %}ASSISTANT: {% for c in message['content'] %}{{ c['text'] }}{% endfor %}</s>{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


def word_tokenizer(words: list[str], vocab_size: int):
    """A word-level fast tokenizer: ids 0-3 are <pad> <unk> <s> </s>, then ``words``; ``<image>`` is vocab_size - 1."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<unk>", "<s>", "</s>"]
    vocab = {w: i for i, w in enumerate(specials + [w for w in dict.fromkeys(words) if w not in specials])}
    if len(vocab) >= vocab_size:
        raise ValueError(f"{len(vocab)} words do not fit a vocabulary of {vocab_size} (the last id is <image>).")
    vocab["<image>"] = vocab_size - 1
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
        additional_special_tokens=["<image>"], padding_side="left",
    )
    return fast


def tiny_llava_processor(model: LlavaForConditionalGeneration, words: list[str] | None = None):
    """A `LlavaProcessor` matching a `tiny_llava` model: word tokenizer, CLIP image processor, Vicuna chat template."""
    from transformers import LlavaProcessor

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
        chat_template=VICUNA_CHAT_TEMPLATE,
    )
