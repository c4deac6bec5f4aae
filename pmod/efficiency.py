"""Efficiency accounting of p-MoD models.

- `kv_cache_report`: KV-cache bytes a live `PModCache` holds, per layer and in total, against the dense cache.
- `prefill_cost`: analytic prefill FLOPs (decoder layers, vision encoder, projector, LM head) and KV bytes,
  dense vs p-MoD, for a model shape (`PRESETS` or `shape_from_config`) and given token counts; `flops_ratio` is the
  decoder layers', `total_flops_ratio` the whole model's.
- `realized_cost`: the FLOP and KV ratios the most recent forward pass actually achieved, per example.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import torch

from .cache import PModCache, PModStaticCache
from .config import PModConfig, ResolvedPMod
from .errors import PModConfigError, PModInputError
from .routing import keep_count


@dataclass
class LayerKV:
    """KV-cache use of one layer.

    Attributes:
        entries: key/value entries holding a token, summed over the batch.
        slots: entries allocated, summed over the batch (``entries`` plus empty slots of rows that processed
            fewer tokens than the widest row).
        dense_entries: entries a dense model would hold (logical length x batch).
        bytes: bytes allocated for keys and values (``slots`` worth).
        dense_bytes: bytes a dense model's cache would take.
    """

    routed: bool
    entries: int
    slots: int
    dense_entries: int
    bytes: int
    dense_bytes: int


@dataclass
class KVCacheReport:
    layers: list[LayerKV]

    @property
    def bytes(self) -> int:
        return sum(layer.bytes for layer in self.layers)

    @property
    def dense_bytes(self) -> int:
        return sum(layer.dense_bytes for layer in self.layers)

    @property
    def ratio(self) -> float:
        """Allocated bytes, p-MoD over dense."""
        return self.bytes / self.dense_bytes if self.dense_bytes else 1.0

    @property
    def entry_ratio(self) -> float:
        """Entries that hold a token, p-MoD over dense (ignores empty slots of shorter rows)."""
        dense = sum(layer.dense_entries for layer in self.layers)
        return sum(layer.entries for layer in self.layers) / dense if dense else 1.0

    def to_dict(self) -> dict:
        return {
            "bytes": self.bytes,
            "dense_bytes": self.dense_bytes,
            "ratio": self.ratio,
            "entry_ratio": self.entry_ratio,
            "layers": [vars(layer) for layer in self.layers],
        }


def kv_cache_report(cache: PModCache | PModStaticCache) -> KVCacheReport:
    """Per-layer and total KV-cache bytes of ``cache`` against a dense model's cache for the same tokens (for a
    `PModStaticCache`, the bytes allocated against a dense static cache of the same length)."""
    if not isinstance(cache, (PModCache, PModStaticCache)):
        raise TypeError(f"kv_cache_report needs a pmod.PModCache or PModStaticCache, got {type(cache).__name__}.")
    layers = []
    for layer in cache.layers:
        if not layer.is_initialized or layer.keys is None or layer.keys.numel() == 0:
            # Nothing stored (a routed layer that processed no token, or an empty cache); the dense
            # size of such a layer is unknown without its shapes, so it is left out of both totals.
            layers.append(LayerKV(layer.columns is not None, 0, 0, 0, 0, 0))
            continue
        batch, _, slots, _ = layer.keys.shape
        per_entry = (layer.keys[:, :, :1].numel() + layer.values[:, :, :1].numel()) // batch * layer.keys.element_size()
        entries = int((layer.columns >= 0).sum()) if layer.columns is not None else batch * slots
        dense_entries = batch * (layer.max_cache_len if isinstance(cache, PModStaticCache) else layer.get_seq_length())
        layers.append(
            LayerKV(
                routed=layer.columns is not None,
                entries=entries,
                slots=batch * slots,
                dense_entries=dense_entries,
                bytes=batch * slots * per_entry,
                dense_bytes=dense_entries * per_entry,
            )
        )
    return KVCacheReport(layers)


# ====================================================================== analytic accounting
# Prefill cost model (method.md section 5). A multiply-add counts as 2 FLOPs. For a decoder layer that
# processes n tokens, with hidden size d, query width d_q = heads x head_dim (= d for Llama-style layers), key/value
# width d_kv = kv_heads x head_dim and SwiGLU MLP width f:
#     projections  2 n d (2 d_q + 2 d_kv)     Q and O are d x d_q, K and V are d x d_kv
#     attention    4 P d_q                    scores and weighted sum over P query-key pairs: n^2, the full matrix,
#                                             as the paper counts (causal kernels: n (n + 1) / 2; a sliding-window
#                                             layer's, at most n W)
#     MLP          6 n d f                    gate, up and down projections; a sparse MoE layer: 6 n d f_e for each
#                                             of the k experts a token uses, plus its router, 2 n d E
# A routed layer processes n = k_l + N_text tokens (k_l = trunc(R_l N_V)) and adds its router, 2 d per token.
# Norms, rotary embeddings, softmax and activations are not counted (well under 1% at these shapes).


@dataclass(frozen=True)
class DecoderShape:
    """A decoder's cost-model shape. ``head_dim`` 0: hidden / num_heads. MoE: ``moe_layers`` use ``experts_per_token``
    of ``num_experts`` experts of width ``moe_intermediate``; ``sliding_layers`` attend within ``sliding_window``."""

    num_layers: int
    hidden: int
    intermediate: int
    num_heads: int
    num_kv_heads: int
    vocab_size: int
    head_dim: int = 0
    moe_layers: tuple[int, ...] = ()
    num_experts: int = 0
    experts_per_token: int = 0
    moe_intermediate: int = 0
    sliding_layers: tuple[int, ...] = ()
    sliding_window: int = 0

    @property
    def head_width(self) -> int:
        return self.head_dim or self.hidden // self.num_heads

    @property
    def q_width(self) -> int:
        return self.num_heads * self.head_width

    @property
    def kv_width(self) -> int:
        return self.num_kv_heads * self.head_width


@dataclass(frozen=True)
class VisionShape:
    """A vision encoder (a ViT) and the projector that maps its patches into the decoder.

    Encoder: ``num_layers`` blocks of width ``hidden`` (QKVO projections, full attention within each crop or image, an
    MLP of width ``intermediate``: two matmuls, or three with ``gated_mlp``, Pixtral's SiLU-gated one) after a patch
    embedding of 3 x ``temporal_patch`` x ``patch_size``^2 values per patch; ``cls_token`` adds one token per crop
    (CLIP, InternViT); ``pool_head``: SigLIP's attention-pooling head (one probe query over the crop, then the MLP),
    computed where the config enables it even though the VLM uses the patch features only. ``window`` > 0:
    ``windowed_layers`` of the blocks attend within windows of ``window`` patches instead (Qwen2.5-VL; the others
    attend within the whole image).
    ``image_size`` 0: dynamic resolution (Qwen2-VL, Qwen2.5-VL, Qwen3-VL, Pixtral): an image's patches are not fixed
    but derived from its vision tokens, ``merge`` patches each.
    Projector: ``merge`` patches become one vision token (2 x 2 merge or pixel shuffle: 4; Gemma 3's 4 x 4 average
    pooling: 16), then each linear layer of ``projector`` (input, output widths) runs on every token; empty: LLaVA's
    2-layer MLP (hidden -> decoder width -> decoder width) on every patch. ``frame_pool``: video frames are pooled
    ``frame_pool`` x ``frame_pool`` before the projector (LLaVA-NeXT-Video).
    """

    num_layers: int
    hidden: int
    intermediate: int
    image_size: int
    patch_size: int
    cls_token: bool = True
    gated_mlp: bool = False
    temporal_patch: int = 1
    merge: int = 1
    projector: tuple[tuple[int, int], ...] = ()
    frame_pool: int = 1
    pool_head: bool = False
    window: int = 0
    windowed_layers: int = 0
    note: str = ""  # what the tower and projector are, for the printed assumptions

    @property
    def patches_per_crop(self) -> int:
        """Patches of one crop at ``image_size`` (0 for a dynamic-resolution encoder)."""
        return (self.image_size // self.patch_size) ** 2

    @property
    def tokens_per_crop(self) -> int:
        """Tokens the encoder's layers process per crop: the patches and the CLS token."""
        return self.patches_per_crop + self.cls_token

    @property
    def vision_tokens_per_crop(self) -> int:
        """Vision tokens (decoder positions) one crop gives, after merging (LLaVA: every patch)."""
        return self.patches_per_crop // self.merge


@dataclass(frozen=True)
class ModelShape:
    """A model's cost-model shape. ``crops``: crops (tiles, images) the vision encoder runs on per example: LLaVA-NeXT's
    anyres base image plus sub-images; None: as many fixed-size crops as the vision tokens fill (InternVL tiles, Gemma 3
    pan-and-scan crops, Idefics3 / SmolVLM crops); a dynamic-resolution encoder splits the vision tokens evenly over
    ``crops`` images. ``frames``: video frames the encoder also runs on (fixed-size encoders; LLaVA-NeXT-Video pools
    them)."""

    name: str
    decoder: DecoderShape
    vision: VisionShape | None = None
    crops: int | None = 1
    bytes_per_value: int = 2  # bf16/fp16 KV cache
    frames: int = 0

    def with_crops(self, crops: int | None) -> ModelShape:
        return replace(self, crops=crops)

    def with_frames(self, frames: int) -> ModelShape:
        return replace(self, frames=frames)


_VICUNA_7B = DecoderShape(32, 4096, 11008, 32, 32, 32000)
_VICUNA_13B = DecoderShape(40, 5120, 13824, 40, 40, 32000)
_CLIP_L_336 = VisionShape(24, 1024, 4096, 336, 14, note="CLIP ViT-L/14, LLaVA's 2-layer MLP projector")
_QWEN2_7B = DecoderShape(28, 3584, 18944, 28, 4, 152064)  # Qwen2-7B and Qwen2.5-7B language models
_SIGLIP_SO400M_384 = VisionShape(27, 1152, 4304, 384, 14, cls_token=False,
                                 note="SigLIP so400m (no CLS token), LLaVA's 2-layer MLP projector")
# the language models of newer VLMs, from their released config.json files
_QWEN3_8B = DecoderShape(36, 4096, 12288, 32, 8, 151936, head_dim=128)  # Qwen3-VL-8B
_QWEN3_30B_A3B = DecoderShape(48, 2048, 6144, 32, 4, 151936, head_dim=128, moe_layers=tuple(range(48)), num_experts=128,
                              experts_per_token=8, moe_intermediate=768)  # Qwen3-VL-30B-A3B: every layer sparse
_INTERNVL3_8B = DecoderShape(28, 3584, 18944, 28, 4, 151674)  # Qwen2.5-7B with InternVL's vocabulary
# Gemma 3 12B: five sliding-window layers (1024 tokens) to one global, head_dim 256 (queries wider than hidden / heads)
_GEMMA3_12B = DecoderShape(48, 3840, 15360, 16, 8, 262208, head_dim=256,
                           sliding_layers=tuple(i for i in range(48) if i % 6 != 5), sliding_window=1024)
_MISTRAL_SMALL_24B = DecoderShape(40, 5120, 32768, 32, 8, 131072, head_dim=128)  # Mistral-Small-3.1-24B


def _qwen_vl_vision(depth: int, hidden: int, intermediate: int, patch: int, temporal: int, merge: int,
                    out_hidden: int, deepstack: int = 0, window_size: int = 0, fullatt_blocks=()) -> VisionShape:
    """A Qwen-VL ViT and its patch merger (a norm, (4d x 4d), GELU, (4d x out) on every merged token, 2 x 2 merge).
    Qwen2-VL: GELU MLP, full attention within each image or frame pair. Qwen2.5-VL (``window_size``, pixels): SwiGLU
    MLP, and the blocks not in ``fullatt_blocks`` attend within windows of ``window_size`` px square. Qwen3-VL
    (``deepstack``): GELU MLP and a DeepStack merger, shaped as the patch merger, for each of ``deepstack`` layers."""
    wide = hidden * merge**2
    windowed = depth - len(set(fullatt_blocks) & set(range(depth))) if window_size else 0
    # a window is (window_size // merge // patch) merged cells a side, as transformers' get_vision_window_index has it
    window = (window_size // merge // patch * merge) ** 2 if window_size else 0
    note = (f"Qwen3-VL ViT, patch merger and {deepstack} DeepStack mergers" if deepstack
            else "Qwen2.5-VL ViT (window attention), patch merger" if window_size else "Qwen2-VL ViT, patch merger")
    return VisionShape(depth, hidden, intermediate, 0, patch, cls_token=False, gated_mlp=bool(window_size),
                       temporal_patch=temporal, merge=merge**2,
                       projector=((wide, wide), (wide, out_hidden)) * (1 + deepstack),
                       window=window, windowed_layers=windowed, note=note)


# Qwen/Qwen2-VL-7B-Instruct's config.json vision_config: depth 32, embed_dim 1280, mlp_ratio 4, num_heads 16, patch 14,
#   spatial_merge_size 2, temporal_patch_size 2, hidden_size (the merger's output) 3584 -- transformers'
#   Qwen2VLVisionConfig defaults to the same
_QWEN2_VL_7B_VISION = _qwen_vl_vision(32, 1280, 1280 * 4, 14, 2, 2, 3584)
# Qwen/Qwen2.5-VL-7B-Instruct's config.json vision_config: depth 32, hidden_size 1280, intermediate_size 3420,
#   num_heads 16, patch 14, spatial_merge_size 2, temporal_patch_size 2, window_size 112 (8 x 8 patches),
#   fullatt_block_indexes [7, 15, 23, 31], out_hidden_size 3584 -- transformers' Qwen2_5_VLVisionConfig defaults to
#   the same except hidden_size (3584 there)
_QWEN2_5_VL_7B_VISION = _qwen_vl_vision(32, 1280, 3420, 14, 2, 2, 3584, window_size=112,
                                        fullatt_blocks=(7, 15, 23, 31))


# vision towers of the newer presets, from the checkpoints' config.json (vision_config and the projector's settings):
# Qwen/Qwen3-VL-8B-Instruct and Qwen3-VL-30B-A3B-Instruct: depth 27, hidden 1152, intermediate 4304, patch 16,
#   temporal patch 2, spatial_merge_size 2, deepstack_visual_indexes [8, 16, 24], out_hidden_size 4096 / 2048
_QWEN3_VL_8B_VISION = _qwen_vl_vision(27, 1152, 4304, 16, 2, 2, 4096, deepstack=3)
_QWEN3_VL_30B_VISION = _qwen_vl_vision(27, 1152, 4304, 16, 2, 2, 2048, deepstack=3)
# OpenGVLab/InternVL3-8B-hf: InternViT-300M (24 layers, hidden 1024, intermediate 4096, 448 px tiles, patch 14, CLS),
#   downsample_ratio 0.5 (pixel shuffle: 4 patches a token, 256 a tile), projector LayerNorm, (4096 x 3584), GELU,
#   (3584 x 3584)
_INTERNVIT_300M = VisionShape(24, 1024, 4096, 448, 14, merge=4, projector=((4096, 3584), (3584, 3584)),
                              note="InternViT-300M, pixel shuffle 0.5, 2-layer MLP projector")
# google/gemma-3-12b-it: SigLIP so400m at 896 px (27 layers, hidden 1152, intermediate 4304, patch 14,
#   vision_use_head false), mm_tokens_per_image 256 (64 x 64 patches average-pooled 4 x 4), projector RMSNorm and
#   (1152 x 3840)
_GEMMA3_SIGLIP = VisionShape(27, 1152, 4304, 896, 14, cls_token=False, merge=16, projector=((1152, 3840),),
                             note="SigLIP so400m, 4 x 4 average pooling, linear projector")
# mistralai/Mistral-Small-3.1-24B-Instruct-2503: Pixtral ViT (24 layers, hidden 1024, intermediate 4096, SiLU-gated MLP,
#   patch 14, up to 1540 px), spatial_merge_size 2 (patch merger (4096 x 1024)), projector (1024 x 5120), GELU,
#   (5120 x 5120), vision_feature_layer -1
_PIXTRAL_MISTRAL_SMALL = VisionShape(24, 1024, 4096, 0, 14, cls_token=False, gated_mlp=True, merge=4,
                                     projector=((4096, 1024), (1024, 5120), (5120, 5120)),
                                     note="Pixtral ViT, 2 x 2 patch merger, 2-layer MLP projector")
PRESETS: dict[str, ModelShape] = {
    "llava-1.5-7b": ModelShape("llava-1.5-7b", _VICUNA_7B, _CLIP_L_336, crops=1),
    "llava-1.5-13b": ModelShape("llava-1.5-13b", _VICUNA_13B, _CLIP_L_336, crops=1),
    # anyres with a 2x2 grid: the base image and four sub-images go through the vision tower
    "llava-next-7b": ModelShape("llava-next-7b", _VICUNA_7B, _CLIP_L_336, crops=5),
    "llava-next-13b": ModelShape("llava-next-13b", _VICUNA_13B, _CLIP_L_336, crops=5),
    # anyres_max_9: up to nine sub-images plus the base image
    "llava-onevision-7b": ModelShape("llava-onevision-7b", _QWEN2_7B, _SIGLIP_SO400M_384, crops=10),
    # dynamic resolution: one image of (vision tokens x 4) patches (Qwen2.5-VL: its grid fills whole windows)
    "qwen2-vl-7b": ModelShape("qwen2-vl-7b", _QWEN2_7B, _QWEN2_VL_7B_VISION, crops=1),
    "qwen2.5-vl-7b": ModelShape("qwen2.5-vl-7b", _QWEN2_7B, _QWEN2_5_VL_7B_VISION, crops=1),
    "qwen3-vl-8b": ModelShape("qwen3-vl-8b", _QWEN3_8B, _QWEN3_VL_8B_VISION, crops=1),
    "qwen3-vl-30b-a3b": ModelShape("qwen3-vl-30b-a3b", _QWEN3_30B_A3B, _QWEN3_VL_30B_VISION, crops=1),
    # fixed-size tiles / crops: as many as the vision tokens fill (256 tokens each)
    "internvl3-8b": ModelShape("internvl3-8b", _INTERNVL3_8B, _INTERNVIT_300M, crops=None),
    "gemma-3-12b": ModelShape("gemma-3-12b", _GEMMA3_12B, _GEMMA3_SIGLIP, crops=None),
    "mistral-small-3.1-24b": ModelShape("mistral-small-3.1-24b", _MISTRAL_SMALL_24B, _PIXTRAL_MISTRAL_SMALL, crops=1),
}

# configs whose vision tower the cost model counts as LLaVA's: a ViT on fixed-size crops and a 2-layer MLP projector
_LLAVA_VISION = ("llava", "llava_next", "llava_onevision", "llava_next_video")


def _side(value) -> int:
    """An image or patch size that a config gives as an int or as (height, width) (InternVL); square assumed."""
    return int(value[0] if isinstance(value, (list, tuple)) else value)


def _vision_from_config(config, llm_hidden: int) -> tuple[VisionShape | None, int | None]:
    """The vision tower and projector of a VLM config and its crops per example (see `ModelShape`), or (None, 1)
    for a config whose tower the cost model does not count (plain decoders, families it does not know)."""
    kind = config.model_type.removeprefix("pmod_")
    vc = getattr(config, "vision_config", None)
    if vc is None:
        return None, 1
    # SigLIP computes its attention-pooling head where the config enables it (transformers' default), used or not
    head = getattr(vc, "model_type", "") == "siglip_vision_model" and bool(getattr(vc, "vision_use_head", True))
    if kind in ("qwen3_vl", "qwen3_vl_moe"):
        deepstack = len(getattr(vc, "deepstack_visual_indexes", None) or ())
        vision = _qwen_vl_vision(vc.depth, vc.hidden_size, vc.intermediate_size, vc.patch_size,
                                 vc.temporal_patch_size, vc.spatial_merge_size, vc.out_hidden_size, deepstack=deepstack)
        return vision, 1
    if kind == "qwen2_vl":  # the ViT's width is embed_dim, hidden_size the merger's output
        vision = _qwen_vl_vision(vc.depth, vc.embed_dim, int(vc.embed_dim * vc.mlp_ratio), vc.patch_size,
                                 vc.temporal_patch_size, vc.spatial_merge_size, vc.hidden_size)
        return vision, 1
    if kind == "qwen2_5_vl":
        vision = _qwen_vl_vision(vc.depth, vc.hidden_size, vc.intermediate_size, vc.patch_size,
                                 vc.temporal_patch_size, vc.spatial_merge_size, vc.out_hidden_size,
                                 window_size=vc.window_size, fullatt_blocks=tuple(vc.fullatt_block_indexes))
        return vision, 1
    if kind == "internvl":  # pixel shuffle by downsample_ratio, then LayerNorm + 2-layer MLP on every token
        shuffle = round(1 / config.downsample_ratio) ** 2
        wide = vc.hidden_size * shuffle
        return VisionShape(vc.num_hidden_layers, vc.hidden_size, vc.intermediate_size, _side(vc.image_size),
                           _side(vc.patch_size), merge=shuffle,
                           projector=((wide, llm_hidden), (llm_hidden, llm_hidden)),
                           note="InternViT, pixel shuffle, 2-layer MLP projector"), None
    if kind == "gemma3":  # average pooling down to mm_tokens_per_image, then RMSNorm + one matmul
        side = vc.image_size // vc.patch_size
        kernel = side // math.isqrt(config.mm_tokens_per_image)
        return VisionShape(vc.num_hidden_layers, vc.hidden_size, vc.intermediate_size, vc.image_size, vc.patch_size,
                           cls_token=False, merge=kernel**2, projector=((vc.hidden_size, llm_hidden),), pool_head=head,
                           note=f"SigLIP, {kernel} x {kernel} average pooling, linear projector"), None
    if kind == "mistral3":  # RMSNorm, patch merger (m^2 d -> d), then a 2-layer MLP on every merged token
        m, d = config.spatial_merge_size, vc.hidden_size
        return VisionShape(vc.num_hidden_layers, d, vc.intermediate_size, 0, vc.patch_size, cls_token=False,
                           gated_mlp=True, merge=m * m,
                           projector=((d * m * m, d), (d, llm_hidden), (llm_hidden, llm_hidden)),
                           note=f"Pixtral ViT, {m} x {m} patch merger, 2-layer MLP projector"), 1
    if kind in ("smolvlm", "idefics3"):  # pixel shuffle by scale_factor, then one matmul
        shuffle = config.scale_factor**2
        return VisionShape(vc.num_hidden_layers, vc.hidden_size, vc.intermediate_size, vc.image_size, vc.patch_size,
                           cls_token=False, merge=shuffle, projector=((vc.hidden_size * shuffle, llm_hidden),),
                           note="SigLIP, pixel shuffle, linear projector"), None
    if kind not in _LLAVA_VISION or not all(hasattr(vc, k) for k in ("image_size", "intermediate_size",
                                                                       "num_hidden_layers")):
        return None, 1
    siglip = getattr(vc, "model_type", "") == "siglip_vision_model"
    # LLaVA-NeXT-Video pools each video frame (average or max pooling; the "conv" mode's convolution is not counted)
    pool = (getattr(config, "spatial_pool_stride", None) or 1) if kind == "llava_next_video" else 1
    vision = VisionShape(vc.num_hidden_layers, vc.hidden_size, vc.intermediate_size, vc.image_size, vc.patch_size,
                         cls_token=not siglip, frame_pool=pool, pool_head=head,
                         note=f"{'SigLIP' if siglip else 'CLIP'} ViT, LLaVA's 2-layer MLP projector")
    # anyres: the largest tiling plus the base image (LLaVA-NeXT: 4 + 1); an upper bound per image
    pinpoints, size = getattr(config, "image_grid_pinpoints", None), vc.image_size
    return vision, (1 + max((h // size) * (w // size) for h, w in pinpoints)) if pinpoints else 1


def shape_from_config(config, name: str = "model") -> ModelShape:
    """The cost-model shape of a transformers config (any supported family, dense or p-MoD, or a plain decoder): the
    decoder with its head size, sparse MoE layers and sliding-window layers, and the vision tower and projector of the
    LLaVA family, Qwen2-VL, Qwen2.5-VL, Qwen3-VL, InternVL, Gemma 3, Mistral 3, SmolVLM and Idefics3."""
    text = config.get_text_config(decoder=True)
    layers = text.num_hidden_layers
    moe: dict = {}
    if getattr(text, "num_experts", 0) and getattr(text, "moe_intermediate_size", 0):
        step, dense_only = getattr(text, "decoder_sparse_step", 1) or 1, set(getattr(text, "mlp_only_layers", ()) or ())
        moe = dict(moe_layers=tuple(i for i in range(layers) if i not in dense_only and (i + 1) % step == 0),
                   num_experts=text.num_experts, experts_per_token=text.num_experts_per_tok,
                   moe_intermediate=text.moe_intermediate_size)
    types = getattr(text, "layer_types", None) or ()
    window = getattr(text, "sliding_window", None) or 0
    sliding = tuple(i for i, t in enumerate(types) if t == "sliding_attention") if window else ()
    decoder = DecoderShape(
        layers,
        text.hidden_size,
        text.intermediate_size,
        text.num_attention_heads,
        getattr(text, "num_key_value_heads", None) or text.num_attention_heads,
        text.vocab_size,
        head_dim=getattr(text, "head_dim", None) or 0,
        sliding_layers=sliding,
        sliding_window=window if sliding else 0,
        **moe,
    )
    vision, crops = _vision_from_config(config, text.hidden_size)
    return ModelShape(name, decoder, vision, crops)


def decoder_layer_flops(n: float, shape: DecoderShape, causal: bool = False, layer: int | None = None) -> float:
    """Prefill FLOPs of decoder layer ``layer`` (None: a dense, full-attention one) processing ``n`` tokens.

    ``causal=True`` counts only the pairs block-skipping kernels (sdpa / flash) compute: the lower triangle of the
    attention matrix (n (n + 1) / 2 pairs), within the window in a sliding-window layer; the paper counts the full
    n x n (what an eager layer computes, masked or not).
    """
    d = shape.hidden
    pairs = n * (n + 1) / 2 if causal else n * n
    if causal and layer in shape.sliding_layers:
        pairs = min(pairs, n * shape.sliding_window)
    if layer in shape.moe_layers:
        mlp = 6 * n * d * shape.moe_intermediate * shape.experts_per_token + 2 * n * d * shape.num_experts
    else:
        mlp = 6 * n * d * shape.intermediate
    return 2 * n * d * (2 * shape.q_width + 2 * shape.kv_width) + 4 * pairs * shape.q_width + mlp


# Vision side (the same in the dense and the p-MoD model), per crop or image of p patches and t = p (+ 1 CLS) encoder
# tokens, width d, MLP width f:
#     patch embedding    2 p (3 T P^2) d              a matmul on each patch's pixels (P: patch size; T: temporal patch,
#                                                     Qwen-VL's 2 for a still image)
#     each layer         8 t d^2 + 4 t^2 d + 4 t d f  QKVO, attention within the crop (all t^2 pairs), MLP (6 t d f
#                                                     with a gated MLP); a windowed layer (Qwen2.5-VL) attends
#                                                     within windows of w patches: 4 t min(w, t) d, its grid assumed
#                                                     to fill whole windows (eager attention runs each window apart)
#     projector          2 n sum(in x out)            every linear layer of the projector on each of its n tokens
# Norms, position embeddings, pixel shuffles, pooling and activations are not counted.
def vision_encoder_flops(shape: VisionShape, crops: float, patches: float | None = None) -> float:
    """Encoder FLOPs of ``crops`` crops (images) of ``patches`` patches each (default: a crop at ``image_size``)."""
    p = shape.patches_per_crop if patches is None else patches
    t, d, f = p + shape.cls_token, shape.hidden, shape.intermediate
    patch_embed = 2 * p * 3 * shape.temporal_patch * shape.patch_size**2 * d
    mlp = (6 if shape.gated_mlp else 4) * t * d * f
    per_layer = 8 * t * d * d + 4 * t * t * d + mlp
    # windowed layers: each patch attends to the w patches of its window instead of the whole image's t
    windowed = shape.windowed_layers * 4 * t * (t - min(shape.window, t)) * d if shape.window else 0
    # SigLIP's pooling head: K and V of every token, Q and out projections of the one probe, its attention, an MLP
    head = 4 * t * d * d + 4 * d * d + 4 * t * d + 4 * d * f if shape.pool_head else 0
    return crops * (patch_embed + shape.num_layers * per_layer - windowed + head)


def projector_flops(shape: VisionShape, llm_hidden: int, crops: float, tokens: float | None = None) -> float:
    """Projector FLOPs on ``tokens`` tokens (default: those of ``crops`` crops at ``image_size``); LLaVA's MLP
    (``projector`` empty) runs on every patch into a decoder of width ``llm_hidden``."""
    n = crops * shape.vision_tokens_per_crop if tokens is None else tokens
    layers = shape.projector or ((shape.hidden, llm_hidden), (llm_hidden, llm_hidden))
    return 2 * n * sum(i * o for i, o in layers)


def vision_inputs(shape: ModelShape, vision_tokens: int) -> tuple[float, float, float]:
    """What the vision side of ``shape`` processes for an example of ``vision_tokens`` vision tokens: (crops, images
    and frames through the encoder; patches in each; tokens the projector's layers run on).

    Fixed-size encoders: ``shape.crops`` crops (None: as many as the vision tokens fill, rounded up) plus
    ``shape.frames`` video frames, each at ``image_size``; a frame gives its patches pooled by ``frame_pool``^2.
    Dynamic resolution (Qwen2-VL, Qwen2.5-VL, Qwen3-VL, Pixtral): the patch count follows from the vision tokens
    asked for (tokens x ``merge``, the merge being 2 x 2): ``shape.crops`` images (None: 1) and the video frames in
    groups of ``temporal_patch`` (the Qwen-VLs attend within each pair of frames) share them evenly, attention within
    each (Qwen2.5-VL's windowed layers: within each window of the image or frame pair, the grid assumed to fill whole
    windows). With several images Pixtral's eager and sdpa attention compute one masked matrix over all of them (flash
    attention, per image); the count is per image.
    """
    vision = shape.vision
    if vision is None:
        return 0, 0, 0
    if not vision.image_size:
        images = max(1, (1 if shape.crops is None else shape.crops) + -(-shape.frames // vision.temporal_patch))
        return images, vision_tokens * vision.merge / images, vision_tokens
    per_crop = vision.vision_tokens_per_crop
    per_frame = per_crop // vision.frame_pool**2
    crops = shape.crops
    if crops is None:
        crops = -(-max(0, vision_tokens - shape.frames * per_frame) // per_crop)  # ceiling
    return crops + shape.frames, vision.patches_per_crop, crops * per_crop + shape.frames * per_frame


@dataclass
class PrefillCost:
    """Analytic prefill cost, dense vs p-MoD, for one example. FLOPs in FLOPs, KV in bytes."""

    model: str
    vision_tokens: int
    text_tokens: int
    layer_ratios: list[float]
    routed_layers: list[int]
    kept_vision: list[int]  # vision tokens processed by each layer (p-MoD)
    dense_layer_flops: list[float]
    pmod_layer_flops: list[float]
    vision_encoder_flops: float
    projector_flops: float
    lm_head_flops: float
    dense_kv_bytes: int
    pmod_kv_bytes: int
    assumptions: list[str] = field(default_factory=list)

    @property
    def dense_flops(self) -> float:
        return sum(self.dense_layer_flops)

    @property
    def pmod_flops(self) -> float:
        return sum(self.pmod_layer_flops)

    @property
    def flops_ratio(self) -> float:
        """Decoder-layer prefill FLOPs, p-MoD over dense."""
        return self.pmod_flops / self.dense_flops

    @property
    def shared_flops(self) -> float:
        """Vision encoder, projector and LM head: the same in the dense and the p-MoD model."""
        return self.vision_encoder_flops + self.projector_flops + self.lm_head_flops

    @property
    def total_flops_ratio(self) -> float:
        """Whole-model prefill FLOPs (decoder layers, vision encoder, projector, LM head), p-MoD over dense: above
        `flops_ratio` by what the vision side costs both."""
        return (self.pmod_flops + self.shared_flops) / (self.dense_flops + self.shared_flops)

    @property
    def kv_ratio(self) -> float:
        """Vision-token KV entries, p-MoD over dense (with integer k, as the model runs)."""
        return sum(self.kept_vision) / (len(self.kept_vision) * self.vision_tokens) if self.vision_tokens else 1.0

    @property
    def kv_ratio_nominal(self) -> float:
        """Mean keep ratio over all layers (dense layers count 1): the paper's KV figure."""
        return sum(self.layer_ratios) / len(self.layer_ratios)

    def to_dict(self) -> dict:
        return {
            "model": self.model,
            "vision_tokens": self.vision_tokens,
            "text_tokens": self.text_tokens,
            "flops_ratio": self.flops_ratio,
            "total_flops_ratio": self.total_flops_ratio,
            "kv_ratio": self.kv_ratio,
            "kv_ratio_nominal": self.kv_ratio_nominal,
            "decoder_tflops": {"dense": self.dense_flops / 1e12, "pmod": self.pmod_flops / 1e12},
            "total_tflops": {"dense": (self.dense_flops + self.shared_flops) / 1e12,
                             "pmod": (self.pmod_flops + self.shared_flops) / 1e12},
            "vision_encoder_tflops": self.vision_encoder_flops / 1e12,
            "projector_tflops": self.projector_flops / 1e12,
            "lm_head_tflops": self.lm_head_flops / 1e12,
            "kv_cache_bytes": {"dense": self.dense_kv_bytes, "pmod": self.pmod_kv_bytes,
                               "ratio": self.pmod_kv_bytes / self.dense_kv_bytes},
            "layers": [
                {"layer": i, "keep_ratio": r, "routed": i in self.routed_layers, "vision_tokens_kept": k,
                 "dense_gflops": df / 1e9, "pmod_gflops": pf / 1e9}
                for i, (r, k, df, pf) in enumerate(
                    zip(self.layer_ratios, self.kept_vision, self.dense_layer_flops, self.pmod_layer_flops)
                )
            ],
            "assumptions": self.assumptions,
        }


def _vision_assumption(shape: ModelShape, vision_tokens: int, crops: float, patches: float, projected: float) -> str:
    vision = shape.vision
    tower = f"{vision.num_layers}-layer ViT (d={vision.hidden})"
    if vision.window:  # Qwen2.5-VL
        side = math.isqrt(vision.window)
        tower = (f"{vision.num_layers}-layer ViT (d={vision.hidden}; {vision.windowed_layers} of its layers attend "
                 f"within windows of {side}x{side} patches, the others within the whole image or frame pair; the "
                 f"grid assumed to fill whole windows, as a side of a multiple of {side} patches does: windows cut "
                 f"short at an edge cost less)")
    if vision.image_size:
        what = f"{crops - shape.frames:g} crop(s)"
        if shape.crops is None:
            what += f" (as many as {vision_tokens} vision tokens fill, {vision.vision_tokens_per_crop} a crop)"
        if shape.frames:
            what = (what + " and " if crops > shape.frames else "") + f"{shape.frames} video frame(s)"
        what += f" of {vision.image_size}px, {patches + vision.cls_token:g} tokens each"
    else:
        groups = -(-shape.frames // vision.temporal_patch)
        parts = [f"{crops - groups:g} image(s)"] if crops > groups else []
        if shape.frames:
            parts.append(f"{shape.frames} video frame(s)" + (f" in {groups} group(s) of {vision.temporal_patch}"
                                                             if vision.temporal_patch > 1 else ""))
        what = (" and ".join(parts) + f", {patches:g} patches each (dynamic resolution: the {vision_tokens} vision "
                f"tokens x {vision.merge} patches, shared evenly; attention within each)")
    pool = vision.frame_pool
    pooled = f"; video frames pooled {pool}x{pool}" if shape.frames and pool > 1 else ""
    if vision.projector:
        layers, repeats = vision.projector, 1
        for period in range(1, len(layers)):  # Qwen3-VL's identical mergers once, with their count
            if len(layers) % period == 0 and layers == layers[:period] * (len(layers) // period):
                layers, repeats = layers[:period], len(layers) // period
                break
        projector = (f"projector on {projected:g} tokens ({vision.merge} patches merged into each): "
                     + ", ".join(f"{i}x{o}" for i, o in layers) + (f" ({repeats} times)" if repeats > 1 else ""))
    else:
        projector = f"projector 2-layer MLP on {projected:g} tokens" + ("" if pooled else " (every patch)")
    head = "; SigLIP's pooling head counted (the config computes it)" if vision.pool_head else ""
    return (f"vision encoder{f' ({vision.note})' if vision.note else ''}: {what} through a {tower}, {projector}"
            f"{pooled}{head}; the same in both models (total_flops_ratio counts them, flops_ratio does not)")


def prefill_cost(
    shape: ModelShape,
    vision_tokens: int,
    text_tokens: int,
    pmod_config: PModConfig | None = None,
    resolved: ResolvedPMod | None = None,
    causal: bool = False,
) -> PrefillCost:
    """Analytic prefill FLOPs and KV bytes of one example, dense vs p-MoD.

    The schedule comes from ``resolved`` (a model's own ``model.pmod``) or else ``pmod_config``
    (default `PModConfig()`), resolved for the decoder's depth. ``causal`` counts attention as causal
    kernels compute it (half the matrix) instead of the paper's full n x n.
    """
    for name, count in (("vision_tokens", vision_tokens), ("text_tokens", text_tokens)):
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise PModInputError(f"{name} must be a whole number of tokens >= 0, got {count!r}.")
    if vision_tokens + text_tokens == 0:
        raise PModInputError("An example with no tokens has no prefill cost; give vision_tokens or text_tokens.")
    dec = shape.decoder
    if resolved is None:
        resolved = ResolvedPMod.resolve(pmod_config or PModConfig(), dec.num_layers)
    if len(resolved.layer_ratios) != dec.num_layers:
        raise PModConfigError(f"Schedule has {len(resolved.layer_ratios)} layers, the model {dec.num_layers}.")
    n_dense = vision_tokens + text_tokens
    kept, dense_f, pmod_f = [], [], []
    for i, ratio in enumerate(resolved.layer_ratios):
        k = keep_count(vision_tokens, ratio) if i in resolved.routed_layers else vision_tokens
        kept.append(k)
        dense_f.append(decoder_layer_flops(n_dense, dec, causal, i))
        router = 2 * n_dense * dec.hidden if i in resolved.routed_layers else 0
        pmod_f.append(decoder_layer_flops(k + text_tokens, dec, causal, i) + router)
    per_entry = 2 * dec.kv_width * shape.bytes_per_value
    vision = shape.vision
    assumptions = [
        "decoder FLOPs per layer with n tokens: 2nd(2d_q+2d_kv) + 4P d_q + 6ndf with P = "
        + ("n(n+1)/2 (causal kernels; at most nW in a sliding-window layer)" if causal
           else "n^2 (full attention matrix, as the paper counts)")
        + " (multiply-add = 2 FLOPs; norms, rotary, softmax not counted)",
        f"p-MoD layers process trunc(R_l x {vision_tokens}) vision tokens + all {text_tokens} text tokens, plus a "
        "router (2d per token)",
        "batch 1, no padding; LM head on the last position only (generation prefill)",
        f"KV cache in {8 * shape.bytes_per_value}-bit values, keys and values of every processed token",
    ]
    crops, patches, projected = vision_inputs(shape, vision_tokens)
    if vision is not None:
        assumptions.append(_vision_assumption(shape, vision_tokens, crops, patches, projected))
    else:
        assumptions.append("the vision encoder and projector are not counted (only the decoder and the LM head)")
    if dec.moe_layers:
        assumptions.append(f"{len(dec.moe_layers)} sparse MoE layers: {dec.experts_per_token} of {dec.num_experts} "
                           f"experts (width {dec.moe_intermediate}) per token, plus the expert router")
    return PrefillCost(
        model=shape.name,
        vision_tokens=vision_tokens,
        text_tokens=text_tokens,
        layer_ratios=list(resolved.layer_ratios),
        routed_layers=list(resolved.routed_layers),
        kept_vision=kept,
        dense_layer_flops=dense_f,
        pmod_layer_flops=pmod_f,
        vision_encoder_flops=vision_encoder_flops(vision, crops, patches) if vision else 0.0,
        projector_flops=projector_flops(vision, dec.hidden, crops, projected) if vision else 0.0,
        lm_head_flops=2.0 * dec.hidden * dec.vocab_size,
        dense_kv_bytes=dec.num_layers * n_dense * per_entry,
        pmod_kv_bytes=sum(k + text_tokens for k in kept) * per_entry,
        assumptions=assumptions,
    )


# ====================================================================== runtime accounting
@dataclass
class RealizedCost:
    """FLOP and KV ratios realised by the most recent forward pass of a p-MoD model, per example.

    Attributes:
        flops_ratio: (B,) decoder-layer FLOPs, p-MoD over the dense model on the same example.
        kv_ratio: (B,) vision-token KV entries kept, p-MoD over dense (1.0 for rows without vision tokens).
        processed: (L, B) tokens each layer processed per example.
    """

    flops_ratio: list[float]
    kv_ratio: list[float]
    processed: list[list[int]]

    @property
    def mean_flops_ratio(self) -> float:
        return sum(self.flops_ratio) / len(self.flops_ratio)

    @property
    def mean_kv_ratio(self) -> float:
        return sum(self.kv_ratio) / len(self.kv_ratio)


def realized_cost(model) -> RealizedCost:
    """Realised per-example FLOP and KV ratios from the routing records of the model's last forward pass."""
    routing = model.routing()
    if not routing:
        raise PModInputError("No routing records: run a forward pass of the p-MoD model first.")
    shape = shape_from_config(model.config).decoder
    first = next(iter(routing.values()))
    valid = (first.processed | first.target).sum(dim=1)  # (B,) non-padding tokens
    n_vision = first.target.sum(dim=1)  # (B,)
    processed, kept = [], []
    for i in range(shape.num_layers):
        if i in routing:
            processed.append(routing[i].processed.sum(dim=1))
            kept.append(routing[i].selected.sum(dim=1))
        else:
            processed.append(valid)
            kept.append(n_vision)
    proc = torch.stack(processed).tolist()  # (L, B)
    kept_t = torch.stack(kept).sum(dim=0)  # (B,)
    dense_n, nv = valid.tolist(), n_vision.tolist()
    flops, kv = [], []
    for b in range(len(dense_n)):
        dense = sum(decoder_layer_flops(dense_n[b], shape, layer=i) for i in range(shape.num_layers))
        routed = sum(decoder_layer_flops(proc[i][b], shape, layer=i) for i in range(shape.num_layers))
        routed += 2 * dense_n[b] * shape.hidden * len(routing)
        flops.append(routed / dense if dense else 1.0)
        kv.append(float(kept_t[b]) / (shape.num_layers * nv[b]) if nv[b] else 1.0)
    return RealizedCost(flops, kv, proc)
