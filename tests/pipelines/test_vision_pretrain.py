"""Stage 0 of the demo: pretraining a tiny LLaVA's vision tower on per-cell labels."""

import pytest
import torch
from PIL import Image

from pmod.data.synthetic import SyntheticConfig, write_dataset
from pmod.errors import PModConfigError
from pmod.pipelines.vision_pretrain import _cell_index, pretrain_vision_tower, vision_tokens
from pmod.tiny import TinyModelSettings, build_tiny


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("vp") / "data",
                         SyntheticConfig(image_size=56, grid=2, max_shapes=3, n_train=360, n_val=0, n_test=0, seed=5))


def tiny(data, seed=0):
    return build_tiny(TinyModelSettings(num_layers=2, hidden_size=32, image_size=56, patch_size=7,
                                        vision_hidden_size=32, seed=seed), data.vocabulary())


def images_and_labels(data):
    labels = data.cell_labels("train")
    images = []
    for sample_id in labels:
        with Image.open(data.image_dir / "images" / f"{sample_id}.png") as image:
            images.append(image.convert("RGB"))
    return images, list(labels.values())


def test_cell_index_is_the_raster_cell_of_each_patch():
    side, grid = 8, 2
    expected = [(r // (side // grid)) * grid + c // (side // grid) for r in range(side) for c in range(side)]
    assert _cell_index(side, grid).tolist() == expected
    assert _cell_index(6, 3).tolist()[:6] == [0, 0, 1, 1, 2, 2]


def test_vision_tokens_are_what_the_projector_receives(data):
    model, processor = tiny(data)
    images, _ = images_and_labels(data)
    pixels = processor.image_processor(images[:3], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        tokens = vision_tokens(model, pixels)  # (3, 64, 32)
        features = model.model.get_image_features(pixel_values=pixels)
        features = getattr(features, "pooler_output", features)
        features = torch.cat(list(features)) if isinstance(features, (list, tuple)) else features.flatten(0, 1)
    assert tokens.shape == (3, 64, 32)
    torch.testing.assert_close(model.model.multi_modal_projector(tokens).flatten(0, 1), features)


def test_pretraining_teaches_the_tower_colours_and_positions_and_touches_nothing_else(data):
    model, processor = tiny(data)
    images, labels = images_and_labels(data)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    metrics = pretrain_vision_tower(model, processor, images, labels, grid=2, steps=150, batch_size=16, lr=2e-3,
                                    held_out=60)
    # colour fills whole patches and the position embedding is learned: both become near perfect on held-out images;
    # shapes need more steps than a unit test can spend (the demo's report gives them)
    assert metrics["colour_accuracy"] > 0.9 and metrics["position_accuracy"] > 0.9, metrics
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(".vision_tower." in f".{n}" for n in changed), sorted(changed)[:5]
    assert any("embeddings" in n for n in changed)


def test_a_random_tower_knows_neither(data):
    model, processor = tiny(data)
    images, labels = images_and_labels(data)
    metrics = pretrain_vision_tower(model, processor, images, labels, grid=2, steps=1, held_out=60)
    assert metrics["position_accuracy"] < 0.6 and metrics["colour_accuracy"] < 0.6


def test_bad_labels_are_refused_with_the_reason(data):
    model, processor = tiny(data)
    images, labels = images_and_labels(data)
    with pytest.raises(PModConfigError, match="one label list per image"):
        pretrain_vision_tower(model, processor, images, labels[:-1], grid=2, steps=1)
    with pytest.raises(PModConfigError, match="4 cell labels"):
        pretrain_vision_tower(model, processor, images, [c[:3] for c in labels], grid=2, steps=1)
    with pytest.raises(PModConfigError, match="do not split into a 3 x 3 grid"):
        pretrain_vision_tower(model, processor, images, [c * 2 + c[:1] for c in labels], grid=3, steps=1)
