"""The supported model families, each described once: the family table (`FAMILIES`) and the p-MoD classes.

A family is the transformers model class p-MoD converts (``dense``), its p-MoD subclass (``pmod``: `PModModelMixin`
in front, its own config class with a ``pmod`` field and a ``pmod_*`` model type), the Auto class that loads it, and
the decoder layers it can route (each with its routed class, `PModLayerMixin` in front). Adding a family is a config
class, a model class, its routed decoder layer if new, and one table entry; what the family does differently (where
its vision tokens are, its positions and masks) is stated in the comment of its entry and handled in the routed layer
or the model's forward.

``import pmod`` registers every p-MoD model type with transformers' Auto classes (`register`), so saved p-MoD folders
load with ``AutoModelForImageTextToText.from_pretrained`` too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    Gemma3Config,
    Gemma3ForConditionalGeneration,
    Idefics3Config,
    Idefics3ForConditionalGeneration,
    InternVLConfig,
    InternVLForConditionalGeneration,
    LlamaConfig,
    LlamaForCausalLM,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextVideoConfig,
    LlavaNextVideoForConditionalGeneration,
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    Mistral3Config,
    Mistral3ForConditionalGeneration,
    MistralConfig,
    MistralForCausalLM,
    PreTrainedModel,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
    Qwen3VLMoeConfig,
    Qwen3VLMoeForConditionalGeneration,
    SmolVLMConfig,
    SmolVLMForConditionalGeneration,
)
from transformers.models.gemma3.modeling_gemma3 import Gemma3DecoderLayer
from transformers.models.llama.modeling_llama import LlamaDecoderLayer
from transformers.models.ministral3.modeling_ministral3 import Ministral3DecoderLayer
from transformers.models.mistral.modeling_mistral import MistralDecoderLayer
from transformers.models.qwen2.modeling_qwen2 import Qwen2DecoderLayer
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLDecoderLayer
from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VLDecoderLayer
from transformers.models.qwen3.modeling_qwen3 import Qwen3DecoderLayer
from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLTextDecoderLayer
from transformers.models.qwen3_vl_moe.modeling_qwen3_vl_moe import Qwen3VLMoeTextDecoderLayer

from .errors import PModConfigError, UnsupportedModelError
from .layer import PModLayerMixin, attention_backends
from .modeling import PModModelMixin


# ---------------------------------------------------------------------- routed decoder layers
# Pre-norm layers (input_layernorm -> self_attn -> residual, post_attention_layernorm -> mlp -> residual): the
# routed forward of `PModLayerMixin` as it is.
class PModLlamaDecoderLayer(PModLayerMixin, LlamaDecoderLayer):
    pass


class PModQwen2DecoderLayer(PModLayerMixin, Qwen2DecoderLayer):
    pass


class PModMistralDecoderLayer(PModLayerMixin, MistralDecoderLayer):
    pass


class PModQwen3DecoderLayer(PModLayerMixin, Qwen3DecoderLayer):
    pass


class PModMinistral3DecoderLayer(PModLayerMixin, Ministral3DecoderLayer):
    # its attention scales queries by a function of the position ids (Llama 4's length scaling): they are gathered
    # with the tokens
    reads_position_ids = True


class PModQwen2VLDecoderLayer(PModLayerMixin, Qwen2VLDecoderLayer):
    pass


class PModGemma3DecoderLayer(PModLayerMixin, Gemma3DecoderLayer):
    """Gemma 3's sandwich norms: each branch is normed before and after, h = x + norm(Attn(norm(x))) and the MLP branch
    norm(MLP(norm(h))), which the routed layer weights by g for targets as it weights a pre-norm layer's MLP."""

    def _attention_mlp(self, xs, mask, position_ids, position_embeddings, attend: dict):
        with attention_backends(xs.device):
            attn_out, _ = self.self_attn(
                hidden_states=self.input_layernorm(xs),
                attention_mask=mask,
                position_ids=position_ids,
                position_embeddings=position_embeddings,
                **attend,
            )
        h = xs + self.post_attention_layernorm(attn_out)
        return h, self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(h)))


class PModQwen2_5_VLDecoderLayer(PModLayerMixin, Qwen2_5_VLDecoderLayer):
    pass


class PModQwen3VLTextDecoderLayer(PModLayerMixin, Qwen3VLTextDecoderLayer):
    pass


class PModQwen3VLMoeTextDecoderLayer(PModLayerMixin, Qwen3VLMoeTextDecoderLayer):
    pass


# ---------------------------------------------------------------------- configs and models
class PModLlavaConfig(LlavaConfig):
    model_type = "pmod_llava"
    pmod: dict | None = None


class PModLlavaForConditionalGeneration(PModModelMixin, LlavaForConditionalGeneration):
    config_class = PModLlavaConfig


class PModLlavaNextConfig(LlavaNextConfig):
    model_type = "pmod_llava_next"
    pmod: dict | None = None


class PModLlavaNextForConditionalGeneration(PModModelMixin, LlavaNextForConditionalGeneration):
    config_class = PModLlavaNextConfig


class PModLlavaOnevisionConfig(LlavaOnevisionConfig):
    model_type = "pmod_llava_onevision"
    pmod: dict | None = None


class PModLlavaOnevisionForConditionalGeneration(PModModelMixin, LlavaOnevisionForConditionalGeneration):
    config_class = PModLlavaOnevisionConfig


class PModLlavaNextVideoConfig(LlavaNextVideoConfig):
    model_type = "pmod_llava_next_video"
    pmod: dict | None = None


class PModLlavaNextVideoForConditionalGeneration(PModModelMixin, LlavaNextVideoForConditionalGeneration):
    config_class = PModLlavaNextVideoConfig


class PModInternVLConfig(InternVLConfig):
    model_type = "pmod_internvl"
    pmod: dict | None = None


class PModInternVLForConditionalGeneration(PModModelMixin, InternVLForConditionalGeneration):
    config_class = PModInternVLConfig


class PModMistral3Config(Mistral3Config):
    model_type = "pmod_mistral3"
    pmod: dict | None = None


class PModMistral3ForConditionalGeneration(PModModelMixin, Mistral3ForConditionalGeneration):
    config_class = PModMistral3Config


class PModIdefics3Config(Idefics3Config):
    model_type = "pmod_idefics3"
    pmod: dict | None = None


class PModIdefics3ForConditionalGeneration(PModModelMixin, Idefics3ForConditionalGeneration):
    config_class = PModIdefics3Config


class PModSmolVLMConfig(SmolVLMConfig):
    model_type = "pmod_smolvlm"
    pmod: dict | None = None


class PModSmolVLMForConditionalGeneration(PModModelMixin, SmolVLMForConditionalGeneration):
    config_class = PModSmolVLMConfig


class PModGemma3Config(Gemma3Config):
    model_type = "pmod_gemma3"
    pmod: dict | None = None


class PModGemma3ForConditionalGeneration(PModModelMixin, Gemma3ForConditionalGeneration):
    config_class = PModGemma3Config


class PModQwen2VLConfig(Qwen2VLConfig):
    model_type = "pmod_qwen2_vl"
    pmod: dict | None = None


class PModQwen2VLForConditionalGeneration(PModModelMixin, Qwen2VLForConditionalGeneration):
    config_class = PModQwen2VLConfig


class PModQwen2_5_VLConfig(Qwen2_5_VLConfig):
    model_type = "pmod_qwen2_5_vl"
    pmod: dict | None = None


class PModQwen2_5_VLForConditionalGeneration(PModModelMixin, Qwen2_5_VLForConditionalGeneration):
    config_class = PModQwen2_5_VLConfig


class PModQwen3VLConfig(Qwen3VLConfig):
    model_type = "pmod_qwen3_vl"
    pmod: dict | None = None


class PModQwen3VLForConditionalGeneration(PModModelMixin, Qwen3VLForConditionalGeneration):
    config_class = PModQwen3VLConfig


class PModQwen3VLMoeConfig(Qwen3VLMoeConfig):
    model_type = "pmod_qwen3_vl_moe"
    pmod: dict | None = None


class PModQwen3VLMoeForConditionalGeneration(PModModelMixin, Qwen3VLMoeForConditionalGeneration):
    config_class = PModQwen3VLMoeConfig


class PModLlamaConfig(LlamaConfig):
    model_type = "pmod_llama"
    pmod: dict | None = None


class PModLlamaForCausalLM(PModModelMixin, LlamaForCausalLM):
    config_class = PModLlamaConfig


class PModQwen2Config(Qwen2Config):
    model_type = "pmod_qwen2"
    pmod: dict | None = None


class PModQwen2ForCausalLM(PModModelMixin, Qwen2ForCausalLM):
    config_class = PModQwen2Config


class PModMistralConfig(MistralConfig):
    model_type = "pmod_mistral"
    pmod: dict | None = None


class PModMistralForCausalLM(PModModelMixin, MistralForCausalLM):
    config_class = PModMistralConfig


# ---------------------------------------------------------------------- the table
@dataclass(frozen=True)
class Family:
    """One supported model family.

    Attributes:
        name: what users call it (messages, the README's table).
        dense: the transformers class p-MoD converts from (``apply_pmod`` takes an instance of exactly this class).
        pmod: its p-MoD subclass.
        auto_class: the transformers Auto class that loads both.
        layers: the decoder layer classes this family's language models use, each with its routed class.
    """

    name: str
    dense: type[PreTrainedModel]
    pmod: type[PreTrainedModel]
    auto_class: Any
    layers: dict[type[nn.Module], type[nn.Module]]

    @property
    def model_type(self) -> str:
        return self.pmod.config_class.model_type

    @property
    def dense_model_type(self) -> str:
        return self.dense.config_class.model_type


_LLM_LAYERS = {LlamaDecoderLayer: PModLlamaDecoderLayer, Qwen2DecoderLayer: PModQwen2DecoderLayer,
               MistralDecoderLayer: PModMistralDecoderLayer}

FAMILIES: tuple[Family, ...] = (
    # LLaVA-1.5: a fixed number of image tokens per image (one image token id), Llama / Qwen2 / Mistral decoders
    Family("LLaVA", LlavaForConditionalGeneration, PModLlavaForConditionalGeneration, AutoModelForImageTextToText,
           _LLM_LAYERS),
    # LLaVA-NeXT: anyres grids (base image + high-resolution crops + newline tokens, all the image token id);
    # targets="vision_hr" routes only the high-resolution part (pmod/layout.py)
    Family("LLaVA-NeXT", LlavaNextForConditionalGeneration, PModLlavaNextForConditionalGeneration,
           AutoModelForImageTextToText, _LLM_LAYERS),
    # LLaVA-OneVision: anyres images, multi-image rows (base grids only) and videos (their own token id)
    Family("LLaVA-OneVision", LlavaOnevisionForConditionalGeneration, PModLlavaOnevisionForConditionalGeneration,
           AutoModelForImageTextToText, _LLM_LAYERS),
    # LLaVA-NeXT-Video: LLaVA-NeXT's anyres images, and videos whose frames are pooled (spatial_pool_stride) into one
    # run of video tokens (their own token id); targets="vision_hr" routes the high-resolution part of images only
    Family("LLaVA-NeXT-Video", LlavaNextVideoForConditionalGeneration, PModLlavaNextVideoForConditionalGeneration,
           AutoModelForImageTextToText, _LLM_LAYERS),
    # InternVL (InternVL3 / 3.5 -hf): pixel-shuffled tiles, each image_seq_length image tokens (<IMG_CONTEXT>) between
    # <img> and </img> text tokens; Qwen2 / Qwen3 / Llama decoders
    Family("InternVL", InternVLForConditionalGeneration, PModInternVLForConditionalGeneration,
           AutoModelForImageTextToText, {**_LLM_LAYERS, Qwen3DecoderLayer: PModQwen3DecoderLayer}),
    # Mistral 3 (Mistral-Small-3.x, Ministral 3): Pixtral images of any size, each row of [IMG] tokens followed by an
    # [IMG_BREAK] text token (the last by [IMG_END]); Mistral decoders, or Ministral 3's, whose attention reads the
    # position ids (gathered with the tokens)
    Family("Mistral 3", Mistral3ForConditionalGeneration, PModMistral3ForConditionalGeneration,
           AutoModelForImageTextToText,
           {MistralDecoderLayer: PModMistralDecoderLayer, Ministral3DecoderLayer: PModMinistral3DecoderLayer}),
    # SmolVLM / Idefics3: an image split into crops, each crop's tokens after a <row_i_col_j> text token and the whole
    # image's after <global-img>; the image tokens are the targets. The decoder is model.text_model.
    Family("SmolVLM", SmolVLMForConditionalGeneration, PModSmolVLMForConditionalGeneration,
           AutoModelForImageTextToText, _LLM_LAYERS),
    Family("Idefics3", Idefics3ForConditionalGeneration, PModIdefics3ForConditionalGeneration,
           AutoModelForImageTextToText, _LLM_LAYERS),
    # Gemma 3: sandwich norms (its own routed layer); an image's tokens attend to each other both ways and
    # sliding-window layers alternate with global ones: the routed layer takes its rows and columns of the model's own
    # mask for the layer, so both hold; each layer type has its own rotary tables. Embeddings are scaled by
    # sqrt(hidden).
    Family("Gemma 3", Gemma3ForConditionalGeneration, PModGemma3ForConditionalGeneration, AutoModelForImageTextToText,
           {Gemma3DecoderLayer: PModGemma3DecoderLayer}),
    # Qwen2-VL / Qwen2.5-VL: M-RoPE. The rotary tables reaching the decoder layers are already per token (B, T, d),
    # so kept tokens keep their 3-D positions by the same row gather as 1-D RoPE; images and videos have token ids.
    Family("Qwen2-VL", Qwen2VLForConditionalGeneration, PModQwen2VLForConditionalGeneration,
           AutoModelForImageTextToText, {Qwen2VLDecoderLayer: PModQwen2VLDecoderLayer}),
    Family("Qwen2.5-VL", Qwen2_5_VLForConditionalGeneration, PModQwen2_5_VLForConditionalGeneration,
           AutoModelForImageTextToText, {Qwen2_5_VLDecoderLayer: PModQwen2_5_VLDecoderLayer}),
    # Qwen3-VL: interleaved M-RoPE, per token (B, T, d) as Qwen2-VL's. DeepStack adds vision features to the visual
    # positions after the first decoder layers, outside the layers: a routed layer among them leaves a skipped
    # token's hidden state as it was and the features are added to it as to every visual token. Videos are frames
    # separated by timestamp text; their tokens are targets, the timestamps text.
    Family("Qwen3-VL", Qwen3VLForConditionalGeneration, PModQwen3VLForConditionalGeneration,
           AutoModelForImageTextToText, {Qwen3VLTextDecoderLayer: PModQwen3VLTextDecoderLayer}),
    # Qwen3-VL-MoE: the same, with sparse MoE MLPs (routing is per token, so a routed layer's experts see only the
    # tokens it processes); the load-balancing loss over routed layers is refused (modeling.py).
    Family("Qwen3-VL-MoE", Qwen3VLMoeForConditionalGeneration, PModQwen3VLMoeForConditionalGeneration,
           AutoModelForImageTextToText, {Qwen3VLMoeTextDecoderLayer: PModQwen3VLMoeTextDecoderLayer}),
    # text-only language models: targets given as target_mask, or targets="all"
    Family("Llama", LlamaForCausalLM, PModLlamaForCausalLM, AutoModelForCausalLM,
           {LlamaDecoderLayer: PModLlamaDecoderLayer}),
    Family("Qwen2", Qwen2ForCausalLM, PModQwen2ForCausalLM, AutoModelForCausalLM,
           {Qwen2DecoderLayer: PModQwen2DecoderLayer}),
    Family("Mistral", MistralForCausalLM, PModMistralForCausalLM, AutoModelForCausalLM,
           {MistralDecoderLayer: PModMistralDecoderLayer}),
)


def family_of(model: nn.Module) -> Family:
    """The family of a dense transformers model that p-MoD converts; `UnsupportedModelError` for any other."""
    for family in FAMILIES:
        if type(model) is family.dense:
            return family
    if isinstance(model, PModModelMixin):
        raise PModConfigError(f"{type(model).__name__} is already a p-MoD model.")
    supported = ", ".join(f.dense.__name__ for f in FAMILIES)
    raise UnsupportedModelError(f"p-MoD does not support {type(model).__name__}; supported models: {supported}.")


def family_of_model_type(model_type: str) -> Family | None:
    """The family of a p-MoD (``pmod_*``) or dense checkpoint's ``model_type``; None if p-MoD has none."""
    return next((f for f in FAMILIES if model_type in (f.model_type, f.dense_model_type)), None)


def register() -> None:
    """Register every p-MoD config and model class with transformers' Auto classes, and transformers' key renaming
    of each dense class (legacy checkpoint layouts) for its p-MoD class."""
    try:
        from transformers.conversion_mapping import (
            get_checkpoint_conversion_mapping,
            register_checkpoint_conversion_mapping,
        )
    except ImportError:  # older transformers 5.x without user-registered conversions: keys are not renamed either
        get_checkpoint_conversion_mapping = None

    for family in FAMILIES:
        AutoConfig.register(family.model_type, family.pmod.config_class, exist_ok=True)
        family.auto_class.register(family.pmod.config_class, family.pmod, exist_ok=True)
        if get_checkpoint_conversion_mapping is None:
            continue
        # transformers renames legacy checkpoint keys (e.g. LLaVA's language_model.lm_head) only for its own classes,
        # keyed by model_type (LLaVA) or by class name (Qwen2-VL, Qwen2.5-VL); without the same mapping for the p-MoD
        # class, such weights would silently load random, and a model converted from a dense checkpoint (saved in the
        # legacy layout) would find every language-model tensor missing when loaded again.
        for key, pmod_key in ((family.dense_model_type, family.model_type),
                              (family.dense.__name__, family.pmod.__name__)):
            mapping = get_checkpoint_conversion_mapping(key)
            if mapping is not None:
                register_checkpoint_conversion_mapping(pmod_key, mapping, overwrite=True)


register()
