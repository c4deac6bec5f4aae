import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoProcessor

import pmod
from pmod.cli import main
from pmod.integrations.convert import ConversionError, convert_dense
from pmod.tiny import tiny_llava, tiny_llava_processor
from tests.helpers.inputs import all_routed, llava_inputs


@pytest.fixture
def dense_dir(tmp_path):
    model = tiny_llava(num_layers=4)
    model.save_pretrained(tmp_path / "dense")
    tiny_llava_processor(model).save_pretrained(tmp_path / "dense")
    return tmp_path / "dense", model


def test_convert_dense_keeps_every_weight_and_equals_dense_at_ratio_one(dense_dir, tmp_path):
    src, dense = dense_dir
    for leftover in ("test_metrics.json", "predictions.jsonl", "train_summary.json", "demo_stamp.json"):
        (src / leftover).write_text("{}")  # a run's outputs beside the checkpoint are not the model's
    out = convert_dense(src, tmp_path / "out", all_routed(4))
    assert not any((out / leftover).exists() for leftover in ("test_metrics.json", "predictions.jsonl",
                                                              "train_summary.json", "demo_stamp.json"))
    model, info = pmod.load_model(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert all(torch.count_nonzero(layer.router.weight) == 0 for layer in model.routed_layers().values())
    inputs, _ = llava_inputs(model, [(3, 1, 4), (3, 1, 4)])
    inputs.pop("attention_mask")
    with torch.no_grad():
        assert torch.equal(model.eval()(**inputs).logits, dense(**inputs).logits)
    assert AutoProcessor.from_pretrained(out).tokenizer.convert_tokens_to_ids("<image>") == model.config.image_token_id


def test_convert_dense_cli_and_output_protection(dense_dir, tmp_path, capsys):
    src, _ = dense_dir
    out = tmp_path / "out"
    assert main(["convert", "dense", str(src), str(out), "--schedule", "shifted_linear"]) == 0
    saved = json.loads((out / "config.json").read_text())
    assert saved["model_type"] == "pmod_llava" and saved["pmod"]["settings"]["schedule"] == "shifted_linear"
    (out / "notes.txt").write_text("mine")
    assert main(["convert", "dense", str(src), str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert (out / "notes.txt").read_text() == "mine"  # untouched without --force
    assert main(["convert", "dense", str(src), str(out), "--force"]) == 0
    assert not (out / "notes.txt").exists()
    assert main(["convert", "dense", str(out), str(tmp_path / "again")]) == 2
    assert "already a p-MoD checkpoint" in capsys.readouterr().err


def test_convert_dense_rejects_broken_checkpoints(dense_dir, tmp_path):
    src, _ = dense_dir
    weights = src / "model.safetensors"
    state = load_file(weights)
    # a wrong shape
    bad = dict(state)
    key = next(k for k in bad if k.endswith("mlp.down_proj.weight"))
    bad[key] = torch.zeros(3, 3)
    save_file(bad, weights, metadata={"format": "pt"})
    with pytest.raises(ConversionError, match="down_proj"):
        convert_dense(src, tmp_path / "out")
    # a missing tensor
    save_file({k: v for k, v in state.items() if not k.endswith("layers.1.mlp.up_proj.weight")}, weights,
              metadata={"format": "pt"})
    with pytest.raises(ConversionError, match="missing .*layers.1.mlp.up_proj.weight"):
        convert_dense(src, tmp_path / "out")
    # a missing shard
    weights.unlink()
    (src / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"a": "model-00001-of-00002.safetensors"}})
    )
    with pytest.raises(ConversionError, match="missing weight shards"):
        convert_dense(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    # an unknown architecture
    config = json.loads((src / "config.json").read_text())
    config["model_type"] = "gpt2"
    (src / "config.json").write_text(json.dumps(config))
    with pytest.raises(pmod.PModError):
        convert_dense(src, tmp_path / "out")


@pytest.mark.parametrize("family", ["qwen3_vl", "qwen3_vl_moe", "internvl", "mistral3", "llava_next_video", "gemma3",
                                    "smolvlm", "idefics3"])
def test_convert_dense_takes_every_family_of_the_table(family, tmp_path):
    """`pmod convert dense` on a tiny dense folder of each newer family: a p-MoD checkpoint of its own model type, every
    tensor kept, routers at zero (keep ratio 1 everywhere: the dense model's logits, tests/test_families.py)."""
    from pmod import tiny

    build = {"qwen3_vl": tiny.tiny_qwen3_vl, "qwen3_vl_moe": lambda: tiny.tiny_qwen3_vl(moe=True),
             "internvl": tiny.tiny_internvl, "mistral3": tiny.tiny_mistral3,
             "llava_next_video": tiny.tiny_llava_next_video, "gemma3": tiny.tiny_gemma3, "smolvlm": tiny.tiny_smolvlm,
             "idefics3": lambda: tiny.tiny_smolvlm(version="idefics3")}[family]
    build().save_pretrained(tmp_path / "dense")
    assert main(["convert", "dense", str(tmp_path / "dense"), str(tmp_path / "out")]) == 0
    model, info = pmod.load_model(tmp_path / "out", output_loading_info=True)
    assert model.config.model_type == f"pmod_{family}" and not info["missing_keys"] and not info["unexpected_keys"]
    assert model.routed_layers() and all(torch.count_nonzero(layer.router.weight) == 0
                                         for layer in model.routed_layers().values())
