"""LoRA fine-tuning with PEFT: routed layers under PEFT equal the merged model, `pmod train` with ``lora:`` trains the
adapters, routers and projector only, and the saved adapter on its base equals the saved merged model."""

import copy
import json
from pathlib import Path

import pytest
import torch

import pmod
from pmod.errors import PModConfigError
from pmod.loading import load_processor
from pmod.pipelines.lora import LoraSettings, apply_lora, load_adapter
from pmod.pipelines.recipe import TrainConfig, load_config
from pmod.pipelines.train import train
from pmod.tiny import randomize_routers, tiny_llava, tiny_llava_processor
from tests.helpers.inputs import llava_inputs
from tests.helpers.llava_data import colour_records, write_records
from tests.helpers.train import StopAfter

peft = pytest.importorskip("peft")
CONFIGS = Path(__file__).resolve().parents[2] / "configs"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("data")
    return write_records(folder, colour_records(folder, n=32)), folder


@pytest.fixture(scope="module")
def dense_base(tmp_path_factory):
    """A saved tiny dense LLaVA with its processor: the recipe converts it to p-MoD, as for a real base model."""
    folder = tmp_path_factory.mktemp("dense")
    model = tiny_llava(num_layers=4)
    model.save_pretrained(folder)
    words = ["what", "colour", "is", "the", "circle", "?", "red", "green", "blue"]
    tiny_llava_processor(model, ["USER", "ASSISTANT", ":", *words]).save_pretrained(folder)
    return folder


def _config(data, base, out, **overrides) -> TrainConfig:
    path, folder = data
    values = {
        "output_dir": str(out), "model_name_or_path": str(base), "pmod": {}, "data_path": str(path),
        "image_folder": str(folder), "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
        "trainer": {"learning_rate": 3e-3, "per_device_train_batch_size": 8, "max_steps": 4, "logging_steps": 1,
                    "save_steps": 2, "warmup_steps": 0, "report_to": []},
    }
    return TrainConfig(**{**values, **overrides})


@pytest.fixture(scope="module")
def lora_run(data, dense_base, tmp_path_factory):
    out = tmp_path_factory.mktemp("lora")
    return train(_config(data, dense_base, out)), out


def _perturbed_lora_model():
    model = pmod.apply_pmod(tiny_llava(num_layers=4), pmod.PModConfig(schedule=[0.5, 1.0, 0.3, 0.6]))
    wrapped = apply_lora(model, LoraSettings(r=4, alpha=8))
    randomize_routers(wrapped.get_base_model())  # reaches the routers' trained copies through PEFT's wrappers
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():  # LoRA's B starts at zero, which would make the adapter a no-op
        for name, param in wrapped.named_parameters():
            if param.requires_grad and ".router." not in name:
                param.add_(torch.randn(param.shape, generator=gen) * 0.05)
    return wrapped.eval()


def test_routed_forward_under_peft_equals_the_merged_model():
    wrapped = _perturbed_lora_model()
    layers = wrapped.get_base_model().routed_layers()
    assert all(isinstance(layer.router, peft.utils.ModulesToSaveWrapper) for layer in layers.values())
    assert not any("vision_tower" in n for n, p in wrapped.named_parameters() if p.requires_grad)
    merged = copy.deepcopy(wrapped).merge_and_unload()
    assert type(merged).__name__ == "PModLlavaForConditionalGeneration"
    assert all(type(layer.router).__name__ == "Router" for layer in merged.routed_layers().values())
    inputs, _ = llava_inputs(merged)  # left padding, rows with 0 to 2 images
    with torch.no_grad():
        got, want = wrapped(**inputs).logits, merged(**inputs).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    routing, merged_routing = pmod.get_routing(wrapped), pmod.get_routing(merged)
    assert routing.keys() == merged_routing.keys() == {0, 2, 3}
    assert all(torch.equal(routing[i].selected, merged_routing[i].selected) for i in routing)
    assert routing[0].selected.sum() < routing[0].target.sum()  # tokens really were skipped
    inputs.pop("position_ids")
    kw = {"max_new_tokens": 4, "do_sample": False, "suppress_tokens": [merged.config.image_token_id]}
    assert torch.equal(wrapped.generate(**inputs, **kw), merged.generate(**inputs, **kw))


def test_dense_model_adapter_round_trip(tmp_path):
    """LoRA on a dense model (a baseline): the projector is trained in full, there are no routers."""
    from pmod.pipelines.lora import save_adapter, trainable_parameters

    base = tiny_llava(num_layers=2)
    base.save_pretrained(tmp_path / "base")
    wrapped = apply_lora(base, LoraSettings(r=4, alpha=8, target_modules=["q_proj", "down_proj"]))
    assert set(trainable_parameters(wrapped)) == {"lora", "projector"}
    with torch.no_grad():
        for param in (p for n, p in wrapped.named_parameters() if "lora_B" in n):
            param.normal_(0, 0.05)
    save_adapter(wrapped.eval(), tmp_path / "adapter")
    loaded = load_adapter(tmp_path / "base", tmp_path / "adapter")
    assert type(loaded.get_base_model()).__name__ == "LlavaForConditionalGeneration"
    inputs, _ = llava_inputs(base)
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).logits, wrapped(**inputs).logits, rtol=1e-5, atol=1e-5)


def test_router_scores_stay_fp32_under_peft_in_bf16():
    wrapped = _perturbed_lora_model().to(torch.bfloat16)
    inputs, _ = llava_inputs(wrapped.get_base_model())
    with torch.no_grad():
        wrapped(**{**inputs, "pixel_values": inputs["pixel_values"].bfloat16()})
    assert all(r.router_logits.dtype == torch.float32 for r in pmod.get_routing(wrapped.get_base_model()).values())


def test_lora_fine_tune_trains_adapters_routers_and_projector(lora_run, dense_base, data):
    result, out = lora_run
    assert set(result.trainable_parameters) == {"lora", "router", "projector"}
    assert result.losses[-1] < result.losses[0] and result.adapter_dir == out / "adapter"
    adapter_config = json.loads((out / "adapter/adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == str(dense_base)
    base = pmod.load_model(dense_base, pmod.PModConfig())  # what the recipe trained on
    merged = pmod.load_model(out)  # the merged model at the top of output_dir
    before, after = dict(base.named_parameters()), dict(merged.named_parameters())
    changed = {n for n in after if not torch.equal(after[n], before[n])}
    last = f"layers.{merged.config.text_config.num_hidden_layers - 1}.router"  # gets no gradient (see test_train)
    routers = {n for n in after if ".router." in n and last not in n}
    assert routers and routers <= changed  # they started at zero
    assert any("multi_modal_projector" in n for n in changed) and any("self_attn.q_proj" in n for n in changed)
    assert not any("vision_tower" in n or "embed_tokens" in n or "norm" in n for n in changed)

    # the adapter on its (dense) base equals the merged model, and leaves the base weights as they were
    adapted = load_adapter(dense_base, out / "adapter")
    processor = load_processor(out)
    path, folder = data
    records = json.loads(Path(path).read_text())[:2]
    from PIL import Image

    images = [Image.open(folder / r["image"]).convert("RGB") for r in records]
    texts = ["USER: <image>\nwhat colour is the circle ? ASSISTANT:", "USER: <image>\nwhat colour ? ASSISTANT: red"]
    inputs = processor(text=texts, images=images, padding=True, return_tensors="pt")
    assert inputs["attention_mask"].min() == 0  # padded
    with torch.no_grad():
        torch.testing.assert_close(adapted(**inputs).logits, merged(**inputs).logits, rtol=1e-5, atol=1e-5)
        routed = pmod.get_routing(adapted.get_base_model())
        assert all(torch.equal(routed[i].selected, r.selected) for i, r in pmod.get_routing(merged).items())
    # the base weights under the adapter (LoRA's base_layer, the routers' and projector's original_module)
    frozen = {n.removeprefix("base_model.model.").replace(".base_layer.", ".").replace(".original_module.", "."): p
              for n, p in adapted.named_parameters() if "lora_" not in n and ".modules_to_save." not in n}
    assert frozen.keys() == before.keys()
    assert all(torch.equal(p, before[n]) for n, p in frozen.items())


def test_lora_run_resumes_from_an_adapter_checkpoint(lora_run, dense_base, data, tmp_path):
    full, _ = lora_run
    killed = train(_config(data, dense_base, tmp_path), callbacks=[StopAfter(2)])
    assert (tmp_path / "checkpoint-2/adapter_model.safetensors").is_file()
    resumed = train(_config(data, dense_base, tmp_path))
    assert resumed.resumed_from.endswith("checkpoint-2") and len(killed.losses) == 2
    torch.testing.assert_close(torch.tensor(resumed.losses[2:]), torch.tensor(full.losses[2:]), rtol=1e-4, atol=1e-5)


def test_adapter_for_other_pmod_settings_is_refused(lora_run, dense_base, tmp_path):
    _, out = lora_run
    other = pmod.apply_pmod(tiny_llava(num_layers=4), pmod.PModConfig(schedule="constant", average_ratio=0.3))
    other.save_pretrained(tmp_path)
    with pytest.raises(pmod.CheckpointError, match="trained on a p-MoD model"):
        load_adapter(tmp_path, out / "adapter")
    with pytest.raises(pmod.CheckpointError, match="no adapter_config.json"):
        load_adapter(dense_base, out)


@pytest.mark.parametrize("lora, match", [
    ({"alpah": 8}, r"unknown lora setting 'alpah' \(did you mean 'alpha'\?\).*known lora settings: alpha, bias"),
    ({"r": 0}, "lora.r"),
    ({"r": "eight"}, "lora.r must be a whole number"),
    ({"dropout": 1.0}, "lora.dropout"),
    ({"alpha": -1}, "lora.alpha"),
    ({"target_modules": ["q_proj", "router"]}, "must not name the router"),
    ({"target_modules": []}, "non-empty list"),
    ({"bias": "all"}, "lora.bias"),
    ([8], "lora must be a mapping or null"),
])
def test_bad_lora_settings_are_clear_errors(data, dense_base, tmp_path, lora, match):
    with pytest.raises(PModConfigError, match=match):
        _config(data, dense_base, tmp_path, lora=lora)


def test_lora_settings_from_recipes(data, dense_base, tmp_path):
    config = _config(data, dense_base, tmp_path, lora={"r": "16", "alpha": "32", "target_modules": ["q_proj"]})
    assert config.lora == LoraSettings(r=16, alpha=32.0, target_modules=["q_proj"])
    with pytest.raises(PModConfigError, match="stage: pretrain"):
        _config(data, dense_base, tmp_path, stage="pretrain")
    with pytest.raises(PModConfigError, match="freeze_vision_tower"):
        _config(data, dense_base, tmp_path, freeze_vision_tower=False)
    with pytest.raises(PModConfigError, match=r"name no linear layer.*q_proj"):
        apply_lora(tiny_llava(num_layers=2), LoraSettings(target_modules=["qkv"]))
    big = load_config(CONFIGS / "pmod-llava-1.5-7b-lora.yaml")
    assert big.lora == LoraSettings(r=128, alpha=256, dropout=0.05) and big.trainer["learning_rate"] == 2e-4
    assert big.projector_learning_rate == 2e-5 and big.stage == "finetune" and big.freeze_vision_tower
    tiny = load_config(CONFIGS / "tiny-cpu-lora.yaml", ["lora.r=4"])
    assert tiny.lora.r == 4 and tiny.tiny_model is not None


def test_tiny_cpu_lora_recipe_runs(tmp_path):
    """configs/tiny-cpu-lora.yaml end to end, shortened, with activation checkpointing: the random tiny base is saved
    beside the adapter; the projector's own learning rate (0 here) holds it still while the routers learn."""
    config = load_config(CONFIGS / "tiny-cpu-lora.yaml", [
        f"output_dir={tmp_path}", "trainer.max_steps=2", "synthetic_data.n_train=8", "synthetic_data.n_val=2",
        "synthetic_data.n_test=2", "trainer.report_to=[]", "tiny_model.num_layers=4", "tiny_model.hidden_size=64",
        "projector_learning_rate=0", "trainer.activation_checkpointing=true",
    ])
    train(config)
    merged = pmod.load_model(tmp_path)
    adapted = load_adapter(tmp_path / "base", tmp_path / "adapter", merge=True)
    for (name, p), q in zip(merged.named_parameters(), adapted.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-6, msg=name)
    base = dict(pmod.load_model(tmp_path / "base").named_parameters())
    changed = {n for n, p in merged.named_parameters() if not torch.equal(p, base[n])}
    assert any(".router." in n for n in changed) and not any("multi_modal_projector" in n for n in changed)
