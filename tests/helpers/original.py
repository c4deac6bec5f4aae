"""Tiny checkpoints in the layout of the original p-MoD code (LLaVA): random weights, the released settings, and
sharded safetensors files as the original's save_pretrained writes them."""

import json

import torch
from safetensors.torch import save_file
from transformers import CLIPVisionModel

from pmod.integrations.convert import parse_original_settings
from pmod.tiny import vision_config

L, D, H, KV, FF, V = 32, 32, 4, 2, 64, 96
HD = D // H


def _original_state(seed=0):
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=0.2):
        return torch.randn(*shape, generator=gen) * scale

    settings = parse_original_settings({"mod_target_layers": "shiftedcos_decay_0.85_0.15"}, L)
    state = {"model.embed_tokens.weight": rnd(V, D, scale=1.0), "model.norm.weight": 1 + rnd(D, scale=0.1),
             "lm_head.weight": rnd(V, D)}
    for i in range(L):
        p = f"model.layers.{i}." + ("decoder_layer." if i in settings.routed_layers else "")
        state.update({
            p + "self_attn.q_proj.weight": rnd(D, D), p + "self_attn.k_proj.weight": rnd(KV * HD, D),
            p + "self_attn.v_proj.weight": rnd(KV * HD, D), p + "self_attn.o_proj.weight": rnd(D, D),
            p + "mlp.gate_proj.weight": rnd(FF, D), p + "mlp.up_proj.weight": rnd(FF, D),
            p + "mlp.down_proj.weight": rnd(D, FF), p + "input_layernorm.weight": 1 + rnd(D, scale=0.1),
            p + "post_attention_layernorm.weight": 1 + rnd(D, scale=0.1),
        })
        if i in settings.routed_layers:
            state[f"model.layers.{i}.router.router.weight"] = rnd(1, D, scale=1.0)
            state[f"model.layers.{i}.router.router.bias"] = rnd(1, scale=0.1)
    torch.manual_seed(seed)
    vision = CLIPVisionModel(vision_config(28, 7, hidden_size=32)).eval()
    # transformers 4.x named CLIP's weights vision_model.*, which is what the original checkpoints hold
    state.update({"model.vision_tower.vision_tower.vision_model." + k.removeprefix("vision_model."): v.clone()
                  for k, v in vision.state_dict().items()})
    state.update({"model.mm_projector.0.weight": rnd(D, 32), "model.mm_projector.0.bias": rnd(D),
                  "model.mm_projector.2.weight": rnd(D, D), "model.mm_projector.2.bias": rnd(D)})
    return state, vision, settings


def _original_config():
    return {
        "model_type": "pmod_llava_llama", "architectures": ["PMoDLlavaLlamaForCausalLM"],
        "vocab_size": V, "hidden_size": D, "intermediate_size": FF, "num_hidden_layers": L, "num_attention_heads": H,
        "num_key_value_heads": KV, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 512,
        "hidden_act": "silu", "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0,
        "mm_vision_tower": "openai/clip-vit-large-patch14-336", "mm_projector_type": "mlp2x_gelu", "mm_hidden_size": 32,
        "mm_vision_select_layer": -2, "mm_vision_select_feature": "patch", "image_aspect_ratio": "pad",
        "mm_patch_merge_type": "flat",
        # exactly the released checkpoints' settings (their training scripts)
        "mod_target_layers": "shiftedcos_decay_0.85_0.15", "mod_target_token_type": "vision_all",
        "mod_router_factor": 0.5, "mod_weight_norm": "tanh_0.2_1", "mod_bias_enabled": True, "mod_special_init": True,
    }


def write_original(path, state, config):
    """Two safetensors shards plus an index, as the original's save_pretrained writes them."""
    path.mkdir(parents=True, exist_ok=True)
    keys = sorted(state)
    shards = {"model-00001-of-00002.safetensors": keys[: len(keys) // 2],
              "model-00002-of-00002.safetensors": keys[len(keys) // 2 :]}
    for name, names in shards.items():
        save_file({k: state[k].contiguous() for k in names}, path / name, metadata={"format": "pt"})
    index = {"weight_map": {k: name for name, names in shards.items() for k in names}}
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    (path / "config.json").write_text(json.dumps(config))
