"""Big-model loading: device_map="auto" never splits a routed decoder layer across devices."""

import torch

import pmod
from pmod.tiny import randomize_routers, tiny_llava
from tests.helpers.inputs import llava_inputs


def test_device_map_auto_keeps_routed_layers_whole(tmp_path):
    """A memory budget that forces offloading: accelerate places whole decoder layers only (a routed layer's router,
    attention and MLP must run together), and the offloaded model computes what the unsplit one does."""
    model = pmod.apply_pmod(tiny_llava(num_layers=6, hidden_size=128),
                            pmod.PModConfig(schedule=[1.0, 1.0, 0.5, 0.3, 0.6, 0.2]))
    randomize_routers(model)
    model.save_pretrained(tmp_path / "model")
    routed = {f"model.language_model.layers.{i}" for i in model.routed_layers()}
    assert {type(layer).__name__ for layer in model.routed_layers().values()} <= set(model._no_split_modules)
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    split = pmod.load_model(tmp_path / "model", device_map="auto", max_memory={"cpu": size // 2},
                            offload_folder=str(tmp_path / "offload")).eval()
    placed = split.hf_device_map
    assert "disk" in placed.values()  # the budget forced offloading
    inside = [name for name in placed if any(name.startswith(layer + ".") for layer in routed)]
    assert not inside, f"routed layers split across devices: {inside}"
    inputs, _ = llava_inputs(model)
    with torch.no_grad():
        expected = model.eval()(**inputs).logits
        got = split(**inputs).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
