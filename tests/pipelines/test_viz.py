import dataclasses
import random

import numpy as np
import pytest
import torch
from PIL import Image

import pmod
from pmod.cli import build_parser
from pmod.data.synthetic import SyntheticConfig, make_sample
from pmod.errors import PModInputError
from pmod.pipelines.viz import kept_token_maps, plot_routing, vision_layout, visualize
from pmod.routing import LayerRouting
from pmod.tiny import randomize_routers, tiny_llava, tiny_llava_next, tiny_llava_processor

G = 8  # 56 px images, 7 px patches: an 8 x 8 token grid


@pytest.fixture(scope="module")
def llava():
    model = pmod.apply_pmod(tiny_llava(num_layers=6, image_size=56, patch_size=7), pmod.PModConfig())
    randomize_routers(model)
    return model, tiny_llava_processor(model)


@pytest.fixture(scope="module")
def shapes_image():
    image, _, _ = make_sample(random.Random(0), SyntheticConfig())
    return image


def raster_kept(routing: LayerRouting, vision: torch.Tensor, example: int) -> set[int]:
    """Raster indices (within the image) of the kept vision tokens, from the routing alone."""
    positions = vision[example].nonzero().flatten().tolist()
    return {positions.index(p) for p in routing.kept_positions(example)}


def test_llava_maps_match_routing(llava, shapes_image):
    model, processor = llava
    prompts = ["what is in the image ?", "is the circle red ?"]
    texts = [
        processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": p}]}], add_generation_prompt=True
        )
        for p in prompts
    ]
    other = Image.new("RGB", (70, 50), (20, 200, 30))
    inputs = processor(images=[shapes_image, other], text=texts, return_tensors="pt", padding=True)
    assert (inputs["attention_mask"] == 0).any()  # left padding: the rows' vision tokens sit at different positions
    with torch.no_grad():
        model(**inputs)
    routing = model.routing()
    assert sorted(routing) == [2, 3, 4, 5]
    vision = inputs["input_ids"] == model.config.image_token_id
    for example in range(2):
        maps = kept_token_maps(model, routing, inputs["input_ids"], example=example)
        assert maps.keys() == routing.keys()
        for index, m in maps.items():
            r = routing[index]
            assert m.base.shape == (G, G) and m.highres is None and m.total == G * G
            assert m.kept == int((r.selected[example] & vision[example]).sum()) == int(G * G * r.keep_ratio)
            assert set(np.flatnonzero(m.base).tolist()) == raster_kept(r, vision, example)
            assert m.keep_ratio == r.keep_ratio
        # The default vision mask is the routing's target mask: the same maps.
        default = kept_token_maps(model, example=example)
        assert all(np.array_equal(default[i].base, maps[i].base) for i in maps)
    # Rows are routed independently: the two images keep different tokens in some layer.
    a = kept_token_maps(model, routing, inputs["input_ids"], 0)
    b = kept_token_maps(model, routing, inputs["input_ids"], 1)
    assert any(not np.array_equal(a[i].base, b[i].base) for i in a)


def test_layout_of_full_strategy():
    model = tiny_llava(num_layers=2, image_size=56, patch_size=7)
    model.config.vision_feature_select_strategy = "full"
    layout = vision_layout(model.config)
    assert layout.prefix == 1 and layout.num_tokens == G * G + 1


def next_inputs(model, size: tuple[int, int], n_text=(3, 4), seed=0):
    """One LLaVA-NeXT example: text, an image of (height, width) = size, text."""
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    gen = torch.Generator().manual_seed(seed)
    base = model.config.vision_config.image_size
    image_sizes = torch.tensor([size])
    crops = image_size_to_num_patches(size, model.config.image_grid_pinpoints, base)
    pixel_values = torch.randn(1, crops, 3, base, base, generator=gen)
    with torch.no_grad():
        n_vision = model.model.get_image_features(pixel_values, image_sizes).pooler_output[0].shape[0]
    ids = torch.cat([
        torch.randint(4, 100, (n_text[0],), generator=gen),
        torch.full((n_vision,), model.config.image_token_id),
        torch.randint(4, 100, (n_text[1],), generator=gen),
    ])[None]
    mask = torch.ones_like(ids)
    inputs = {"input_ids": ids, "attention_mask": mask, "pixel_values": pixel_values, "image_sizes": image_sizes}
    return inputs, crops


def packed_coordinates(model, size, crops):
    """(N, 3) per vision token in sequence order: (crop, row, col) inside its crop, or (-1, -1, -1) for a newline.

    Runs the model's own `pack_image_features` on features that encode their coordinates.
    """
    g = model.config.vision_config.image_size // model.config.vision_config.patch_size
    crop, row, col = torch.meshgrid(torch.arange(crops), torch.arange(g), torch.arange(g), indexing="ij")
    feats = torch.stack([crop, row, col], dim=-1).float().reshape(crops, g * g, 3)  # (crops, g*g, 3)
    newline = torch.full((3,), -1.0)
    packed, _ = model.model.pack_image_features([feats], torch.tensor([size]), "default", image_newline=newline)
    return packed[0].long(), g


# High-res maps cut from the crop grid to 4 x 8 (rows cut), 4 x 10 and 8 x 6 (columns cut), 8 x 8 (uncut), 2 x 12.
@pytest.mark.parametrize("size", [(30, 50), (40, 90), (56, 40), (40, 40), (20, 100)])
def test_llava_next_layout_matches_packing(size):
    model = pmod.apply_pmod(tiny_llava_next(num_layers=4), pmod.PModConfig())
    randomize_routers(model)
    inputs, crops = next_inputs(model, size)
    coords, g = packed_coordinates(model, size, crops)
    n_vision = int((inputs["input_ids"] == model.config.image_token_id).sum())
    assert coords.shape[0] == n_vision
    newline = coords[:, 0] == -1
    layout = vision_layout(model.config, size)
    assert layout.num_tokens == n_vision
    assert layout.base == (g, g)
    h, w = layout.highres
    assert int(newline.sum()) == h and h * w == n_vision - g * g - h  # newline tokens dropped from the grid

    with torch.no_grad():
        model(**inputs)
    routing = model.routing()
    maps = kept_token_maps(model, routing, inputs["input_ids"], image_sizes=inputs["image_sizes"])
    vision = (inputs["input_ids"] == model.config.image_token_id)[0]
    for index, m in maps.items():
        selected = routing[index].selected[0]
        assert m.kept == int(selected[vision].sum()) == int(n_vision * routing[index].keep_ratio)
        assert m.kept == int(m.base.sum() + m.highres.sum() + m.newline.sum())
        assert m.highres.shape == (h, w) and m.newline.shape == (h,)

    # Place every token by the coordinates the packing gave it (crops row-major over the best-fit grid) and
    # mark a pattern of them as kept: the maps must show the pattern at the same image places.
    from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape

    base = model.config.vision_config.image_size
    _, crops_w = get_anyres_image_grid_shape(size, model.config.image_grid_pinpoints, base)
    glob_r = torch.where(coords[:, 0] > 0, (coords[:, 0] - 1) // crops_w * g + coords[:, 1], coords[:, 1])
    glob_c = torch.where(coords[:, 0] > 0, (coords[:, 0] - 1) % crops_w * g + coords[:, 2], coords[:, 2])
    pattern = (2 * glob_r + glob_c) % 5 == 0  # not symmetric: a transposed map differs
    pattern[newline] = True
    selected = torch.zeros_like(inputs["input_ids"], dtype=torch.bool)
    selected[0, vision.nonzero().flatten()] = pattern
    fake = {7: LayerRouting(target=vision[None], processed=selected, selected=selected,
                            router_logits=torch.zeros(selected.shape), keep_ratio=0.5)}
    m = kept_token_maps(model, fake, inputs["input_ids"], image_sizes=size)[7]
    highres = coords[:, 0] > 0
    off_r, off_c = int(glob_r[highres].min()), int(glob_c[highres].min())  # the unpadding crop's offset
    rr, cc = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    assert np.array_equal(m.highres, (2 * (rr + off_r) + (cc + off_c)) % 5 == 0)
    rr, cc = np.meshgrid(np.arange(g), np.arange(g), indexing="ij")
    assert np.array_equal(m.base, (2 * rr + cc) % 5 == 0)
    assert m.newline.all()


def test_llava_next_bad_sizes_raise():
    model = pmod.apply_pmod(tiny_llava_next(num_layers=4), pmod.PModConfig())
    inputs, _ = next_inputs(model, (30, 50))
    with torch.no_grad():
        model(**inputs)
    with pytest.raises(PModInputError, match="height, width"):
        kept_token_maps(model, input_ids=inputs["input_ids"])
    with pytest.raises(PModInputError, match="vision tokens, but one image needs"):
        kept_token_maps(model, input_ids=inputs["input_ids"], image_sizes=(50, 30))
    with pytest.raises(PModInputError, match="rows for a batch"):
        kept_token_maps(model, input_ids=inputs["input_ids"], image_sizes=torch.tensor([[30, 50], [40, 40]]))


def test_bad_inputs_raise(llava, shapes_image):
    model, processor = llava
    fresh = pmod.apply_pmod(tiny_llava(num_layers=6, image_size=56, patch_size=7), pmod.PModConfig())
    with pytest.raises(PModInputError, match="No routing"):
        kept_token_maps(fresh)
    inputs = processor(images=shapes_image, text="<image>\nwhat is in the image ?", return_tensors="pt")
    with torch.no_grad():
        model(**inputs)
    with pytest.raises(PModInputError, match="out of range"):
        kept_token_maps(model, example=1)
    with pytest.raises(PModInputError, match="shape"):
        kept_token_maps(model, input_ids=inputs["input_ids"][:, 1:])
    # Two images in one example: the maps need exactly one.
    two = processor(images=[shapes_image, shapes_image], text="<image> <image>\nwhat ?", return_tensors="pt")
    with torch.no_grad():
        model(**two)
    with pytest.raises(PModInputError, match="exactly one image"):
        kept_token_maps(model, input_ids=two["input_ids"])
    # A text-only forward: no vision tokens.
    text = processor(text="what is in the image ?", return_tensors="pt")
    with torch.no_grad():
        model(**text)
    with pytest.raises(PModInputError, match="no vision tokens"):
        kept_token_maps(model, input_ids=text["input_ids"])
    with pytest.raises(PModInputError, match="No token maps"):
        plot_routing(shapes_image, {}, "unused.png")
    dense = tiny_llava(num_layers=2, image_size=56, patch_size=7)
    with pytest.raises(PModInputError, match="not a p-MoD model"):
        visualize(dense, processor, shapes_image, "what ?", "unused.png")


def test_plot_writes_png(llava, shapes_image, tmp_path):
    model, processor = llava
    inputs = processor(images=shapes_image, text="<image>\nwhat is in the image ?", return_tensors="pt")
    with torch.no_grad():
        model(**inputs)
    maps = kept_token_maps(model, input_ids=inputs["input_ids"])
    from matplotlib.figure import Figure

    legends = []
    original = Figure.legend
    Figure.legend = lambda fig, *a, **kw: (legends.append([h.get_label() for h in kw["handles"]])
                                           or original(fig, *a, **kw))
    try:
        out = plot_routing(shapes_image, maps, tmp_path / "sub" / "routing.png", title="tiny")
    finally:
        Figure.legend = original
    assert legends and legends[0][0].startswith("kept") and legends[0][1].startswith("skipped (darkened)")
    with Image.open(out) as img:
        img.verify()
    with Image.open(out) as img:
        assert img.format == "PNG" and 500 <= img.width <= 2000 and 150 <= img.height <= 1000
        pixels = np.asarray(img.convert("RGB"))
    assert pixels.std() > 10  # not a blank canvas


def test_plot_next_panels(tmp_path):
    """LLaVA-NeXT figures hold the high-res and the base maps: twice the panels of a base-only figure."""
    model = pmod.apply_pmod(tiny_llava_next(num_layers=4), pmod.PModConfig())
    randomize_routers(model)
    inputs, _ = next_inputs(model, (30, 50))
    with torch.no_grad():
        model(**inputs)
    maps = kept_token_maps(model, input_ids=inputs["input_ids"], image_sizes=inputs["image_sizes"])
    image = Image.new("RGB", (50, 30), (240, 240, 240))
    both = plot_routing(image, maps, tmp_path / "next.png", columns=20)
    base_only = {i: dataclasses.replace(m, highres=None, newline=None) for i, m in maps.items()}
    single = plot_routing(image, base_only, tmp_path / "base.png", columns=20)
    with Image.open(both) as a, Image.open(single) as b:
        # Rows of 1 + layers panels: input and high-res maps, then base view and base maps.
        assert a.width == b.width and a.height == 2 * b.height


def test_visualize_end_to_end_and_cli(llava, shapes_image, tmp_path):
    model, processor = llava
    model_dir = tmp_path / "model"
    model.save_pretrained(model_dir)
    processor.save_pretrained(model_dir)
    image_path = tmp_path / "shapes.png"
    shapes_image.save(image_path)

    maps = visualize(str(model_dir), None, image_path, "what colour is the circle ?", tmp_path / "viz.png")
    assert sorted(maps) == [2, 3, 4, 5] and (tmp_path / "viz.png").stat().st_size > 1000
    # The in-memory model gives the same maps (the saved routers round-trip).
    again = visualize(model, processor, shapes_image, "what colour is the circle ?", tmp_path / "viz2.png")
    assert all(np.array_equal(maps[i].base, again[i].base) for i in maps)
    # Without a chat template the prompt is the one pmod chat and pmod eval would give (LLaVA-1.5's, with a warning),
    # and the caller's processor is left without one.
    processor.chat_template, template = None, processor.chat_template
    tokenizer_template, processor.tokenizer.chat_template = processor.tokenizer.chat_template, None
    try:
        plain = visualize(model, processor, shapes_image, "what colour is the circle ?", tmp_path / "viz3.png")
        assert processor.chat_template is None
    finally:
        processor.chat_template, processor.tokenizer.chat_template = template, tokenizer_template
    assert all(m.total == G * G for m in plain.values())

    parser = build_parser()
    args = parser.parse_args(["viz", str(model_dir), "--image", str(image_path), "--prompt", "what ?", "--out",
                              str(tmp_path / "cli.png")])
    assert args.func(args) == 0 and (tmp_path / "cli.png").is_file()

    # A model directory without a processor, and a missing image, are input errors.
    bare = tmp_path / "bare"
    model.save_pretrained(bare)
    args = parser.parse_args(["viz", str(bare), "--image", str(image_path), "--prompt", "what ?"])
    with pytest.raises(PModInputError, match="processor"):
        args.func(args)
    args = parser.parse_args(["viz", str(model_dir), "--image", str(tmp_path / "missing.png"), "--prompt", "what ?"])
    with pytest.raises(PModInputError, match="not found"):
        args.func(args)


def test_gemma3_layout_is_the_pooled_grid():
    """Gemma 3 average-pools its (p, p) patch grid to mm_tokens_per_image tokens, in raster order."""
    from pmod.tiny import tiny_gemma3

    model = tiny_gemma3(num_layers=2, hidden_size=32, image_size=56, patch_size=7)  # 8 x 8 patches, pooled 2 x 2
    layout = vision_layout(model.config)
    assert layout.base == (4, 4) and layout.highres is None and layout.num_tokens == model.config.mm_tokens_per_image
