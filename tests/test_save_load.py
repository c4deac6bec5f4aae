import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

import pmod
from pmod.config import RoutedLayerSpec
from pmod.tiny import randomize_routers, tiny_causal_lm, tiny_llava, tiny_llava_next
from tests.helpers.inputs import all_routed, llava_inputs, next_inputs


def _state_equal(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    return all(torch.equal(sa[k], sb[k]) for k in sa)


def test_round_trip_llava(tmp_path):
    model = pmod.apply_pmod(tiny_llava(num_layers=6), pmod.PModConfig(alpha=0.3))
    randomize_routers(model)
    inputs, _ = llava_inputs(model)
    with torch.no_grad():
        expected = model(**inputs).logits
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == "pmod_llava"
    assert saved["pmod"]["routed_layers"] == [2, 3, 4, 5]
    assert saved["pmod"]["settings"]["alpha"] == 0.3
    assert len(saved["pmod"]["layer_ratios"]) == 6

    for loaded in (pmod.load_model(tmp_path), AutoModelForImageTextToText.from_pretrained(tmp_path)):
        loaded.eval()
        assert type(loaded) is type(model)
        assert loaded.pmod == model.pmod
        assert _state_equal(loaded, model)
        with torch.no_grad():
            assert torch.equal(loaded(**inputs).logits, expected)


# config.json's "pmod" entry as pmod wrote it before issue 17 (settings kept on the model): checkpoints hold this
SAVED_PMOD = {
    "layer_ratios": [1.0, 1.0, 0.6545084971874737, 0.34549150281252633, 0.15, 0.15],
    "routed_layers": [2, 3, 4, 5],
    "settings": {"alpha": 0.3, "average_ratio": 0.5, "beta": 1.0, "constant_end": -1, "constant_start": 2,
                 "max_ratio": 0.85, "min_ratio": 0.15, "routed_layers": None, "router_bias": True,
                 "router_zero_init": True, "schedule": "shifted_cos", "string": False, "tanh_norm": True,
                 "targets": "vision"},
}


def test_checkpoint_in_the_saved_format_loads_into_layer_specs(tmp_path):
    pmod.apply_pmod(tiny_llava(num_layers=6), pmod.PModConfig(alpha=0.3, string=False)).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["pmod"] == SAVED_PMOD  # what is written has not changed...
    config["pmod"] = SAVED_PMOD
    (tmp_path / "config.json").write_text(json.dumps(config))
    loaded = pmod.load_model(tmp_path)  # ...and what was written loads
    assert loaded.pmod.to_dict() == SAVED_PMOD
    specs = {i: layer.pmod_spec for i, layer in loaded.routed_layers().items()}
    assert specs[3] == RoutedLayerSpec(index=3, keep_ratio=0.34549150281252633, alpha=0.3, beta=1.0, tanh_norm=True,
                                       string=False, router_bias=True, router_zero_init=True)
    # the routing plan reads the layers' own spec objects: one source for each keep ratio
    assert list(specs.values()) == list(loaded.pmod.layers)
    assert all(specs[spec.index] is spec for spec in loaded.pmod.layers)


def test_round_trip_llava_next_and_causal_lm(tmp_path):
    model = pmod.apply_pmod(tiny_llava_next(num_layers=4), pmod.PModConfig())
    randomize_routers(model)
    inputs, _ = next_inputs(model, [(28, 56), None], [(2, 3), (4, 1)])
    with torch.no_grad():
        expected = model(**inputs).logits
    model.save_pretrained(tmp_path / "next")
    loaded = pmod.load_model(tmp_path / "next").eval()
    with torch.no_grad():
        assert torch.equal(loaded(**inputs).logits, expected)

    lm = pmod.apply_pmod(tiny_causal_lm("qwen2", num_layers=3), pmod.PModConfig(schedule=[0.5, 1, 0.5], targets="all"))
    randomize_routers(lm)
    ids = torch.randint(1, 127, (2, 9))
    with torch.no_grad():
        expected = lm(input_ids=ids).logits
    lm.save_pretrained(tmp_path / "lm")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "lm").eval()
    assert type(loaded) is type(lm)
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, expected)


def test_dense_checkpoint_loads_into_pmod_with_zero_routers(tmp_path):
    dense = tiny_llava(num_layers=4)
    dense.save_pretrained(tmp_path)
    inputs, _ = llava_inputs(dense, [(3, 1, 4), (3, 1, 4)])
    inputs.pop("attention_mask")
    with torch.no_grad():
        expected = dense(**inputs).logits
    model = pmod.load_model(tmp_path, all_routed(4))
    assert all(torch.count_nonzero(layer.router.weight) == 0 and torch.count_nonzero(layer.router.bias) == 0
               for layer in model.routed_layers().values())
    dense_keys = set(dense.state_dict())
    assert set(model.state_dict()) - dense_keys == {
        f"model.language_model.layers.{i}.router.{p}" for i in range(4) for p in ("weight", "bias")
    }
    with torch.no_grad():
        assert torch.equal(model.eval()(**inputs).logits, expected)
    assert _state_equal(dense, _without_routers(model, dense))


def _without_routers(model, like):
    state = {k: v for k, v in model.state_dict().items() if ".router." not in k}
    clone = type(like)(like.config)
    clone.load_state_dict(state)
    return clone


def test_missing_routers_in_pmod_checkpoint_are_refused(tmp_path):
    """Routers start at zero only when a dense checkpoint is converted; a p-MoD checkpoint without them is damaged."""
    model = pmod.apply_pmod(tiny_llava(num_layers=4), pmod.PModConfig(schedule=[0.5, 0.5, 0.5, 0.5]))
    randomize_routers(model)
    model.save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    state = load_file(weights)
    dropped = [k for k in state if "layers.1.router" in k]
    assert dropped
    save_file({k: v for k, v in state.items() if k not in dropped}, weights, metadata={"format": "pt"})
    for load in (pmod.load_model, AutoModelForImageTextToText.from_pretrained):
        with pytest.raises(pmod.PModError, match=(r"missing model\.language_model\.layers\.1\.router\.bias, "
                                                  r"model\.language_model\.layers\.1\.router\.weight \(2 in all\)"
                                                  r".*load_model\(DENSE_DIR")):
            load(tmp_path)


def test_load_model_rejects_wrong_inputs(tmp_path):
    model = pmod.apply_pmod(tiny_llava(num_layers=2), pmod.PModConfig(schedule=[0.5, 1.0]))
    model.save_pretrained(tmp_path)
    with pytest.raises(pmod.PModConfigError, match="already a p-MoD checkpoint"):
        pmod.load_model(tmp_path, pmod.PModConfig())
    config = json.loads((tmp_path / "config.json").read_text())
    config["pmod"]["routed_layers"] = [5]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(pmod.PModConfigError, match="out of range"):
        pmod.load_model(tmp_path)


def test_load_pretrained_keeps_dense_checkpoints_dense(tmp_path):
    from pmod.loading import load_pretrained
    from pmod.tiny import tiny_llava

    dense = tiny_llava(num_layers=4)
    dense.save_pretrained(tmp_path / "dense")
    loaded = load_pretrained(tmp_path / "dense")
    assert type(loaded).__name__ == "LlavaForConditionalGeneration"
    routed = pmod.apply_pmod(tiny_llava(num_layers=4), pmod.PModConfig())
    routed.save_pretrained(tmp_path / "pmod")
    assert load_pretrained(tmp_path / "pmod").config.model_type == "pmod_llava"


def test_saved_folder_says_how_to_load_it(tmp_path):
    """A p-MoD folder opens only after `import pmod`: its model card says so, and a user's own README is kept."""
    model = pmod.apply_pmod(tiny_llava(num_layers=2), pmod.PModConfig(schedule=[0.5, 1.0]))
    model.save_pretrained(tmp_path / "a")
    card = (tmp_path / "a" / "README.md").read_text()
    assert "import pmod" in card and "pmod_llava" in card and "LlavaForConditionalGeneration" in card
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "README.md").write_text("mine")
    model.save_pretrained(tmp_path / "b")
    assert (tmp_path / "b" / "README.md").read_text() == "mine"
