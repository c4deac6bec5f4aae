"""Checkpoints are untrusted input: conversion and loading refuse bad files with one clear pmod error (the CLI says
`pmod convert: error: ...` and exits 2), and writing an output folder never destroys what was there."""

import json
import os
import stat
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, LlavaForConditionalGeneration

import pmod
from pmod.cli import main
from pmod.errors import CheckpointError
from pmod.files import write_dir_atomic
from pmod.integrations.convert import ConversionError, convert_dense, convert_original
from pmod.tiny import tiny_causal_lm, tiny_llava, tiny_llava_next, tiny_qwen2_vl
from tests.helpers.original import _original_config, _original_state, write_original

DEAD_PID = 2**31 - 2  # above any pid_max: no process has it


@pytest.fixture
def dense_dir(tmp_path):
    tiny_llava(num_layers=2).save_pretrained(tmp_path / "dense")
    return tmp_path / "dense"


@pytest.fixture
def pmod_dir(tmp_path):
    pmod.apply_pmod(tiny_llava(num_layers=2), pmod.PModConfig(schedule=[0.5, 0.5])).save_pretrained(tmp_path / "pmod")
    return tmp_path / "pmod"


def _hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def _convert_error(capsys, args) -> str:
    """Run `pmod convert ARGS`; it must fail cleanly (exit 2, no exception) with one error line."""
    assert main(["convert", *args]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert lines[-1].startswith("pmod convert: error:")  # the message is the last line, and only one line
    assert sum(line.startswith("pmod convert: error:") for line in lines) == 1
    return lines[-1]


# ---------------------------------------------------------------------- 1. nothing written before everything is checked
def test_convert_dense_invalid_settings_create_nothing(dense_dir, tmp_path, capsys):
    out = tmp_path / "new" / "out"
    # layer ratios above 1 after the derivation (max_ratio 5, average 0.9); refused by the argument parser or later
    try:
        code = main(["convert", "dense", str(dense_dir), str(out), "--max-ratio", "5", "--average-ratio", "0.9"])
    except SystemExit as exc:
        code = exc.code
    assert code == 2 and "error:" in capsys.readouterr().err
    # settings changed after construction: caught before writing, as loading the output would catch them
    settings = pmod.PModConfig(schedule=[0.5, 0.5])
    settings.alpha = float("nan")
    with pytest.raises(pmod.PModError):
        convert_dense(dense_dir, out, settings)
    assert not (tmp_path / "new").exists()


def test_failed_write_removes_staging_and_created_parents(dense_dir, tmp_path, monkeypatch):
    def fail(self, *args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("transformers.PreTrainedModel.save_pretrained", fail)
    with pytest.raises(OSError, match="disk full"):
        convert_dense(dense_dir, tmp_path / "a" / "b" / "out")
    assert not (tmp_path / "a").exists()
    assert _hidden(tmp_path) == []


# ---------------------------------------------------------------------- 2. --force: rename, then delete
def test_force_interrupted_at_the_swap_keeps_the_old_output(dense_dir, tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    rename, moves = os.rename, []

    def interrupted(src, dst, *args, **kwargs):
        if Path(dst) == out and not moves:  # the first move to OUT: the new folder moving into place
            moves.append(src)
            raise KeyboardInterrupt
        return rename(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "rename", interrupted)
    with pytest.raises(KeyboardInterrupt):
        convert_dense(dense_dir, out, force=True)
    monkeypatch.undo()
    assert moves and (out / "notes.txt").read_text() == "mine"
    assert _hidden(tmp_path) == []  # the staging folder is gone, the old folder back in place
    convert_dense(dense_dir, out, force=True)
    assert not (out / "notes.txt").exists() and (out / "config.json").exists()
    assert _hidden(tmp_path) == []


def test_leftovers_of_a_killed_conversion_are_recovered(dense_dir, tmp_path, capsys):
    out = tmp_path / "out"
    # killed between moving the old OUT aside and renaming the new one into place, with its staging folder
    aside = tmp_path / f".out.pmod-replaced-{DEAD_PID}-0a1b2c3d"
    aside.mkdir()
    (aside / "notes.txt").write_text("mine")
    staging = tmp_path / f".out.pmod-staging-{DEAD_PID}-4e5f6a7b"
    staging.mkdir()
    (staging / "config.json").write_text("{")
    running = tmp_path / f".out.pmod-staging-{os.getppid()}-00000000"  # another conversion still at work
    running.mkdir()
    # the old OUT is put back: without --force it is not replaced
    assert "already exists" in _convert_error(capsys, ["dense", str(dense_dir), str(out)])
    assert (out / "notes.txt").read_text() == "mine"
    assert _hidden(tmp_path) == [running.name]
    # killed after the new OUT was in place, before the old one was deleted: the old one is deleted
    stale = tmp_path / f".out.pmod-replaced-{DEAD_PID}-99999999"
    stale.mkdir()
    convert_dense(dense_dir, out, force=True)
    assert not (out / "notes.txt").exists()
    assert _hidden(tmp_path) == [running.name]


def test_write_dir_atomic_replaces_files_and_links_whole(tmp_path):
    out = tmp_path / "out"
    out.write_text("a file")
    write_dir_atomic(out, lambda d: (d / "x").write_text("1"))
    assert (out / "x").read_text() == "1"
    target = tmp_path / "target"
    target.mkdir()
    (target / "keep").write_text("k")
    link = tmp_path / "link"
    link.symlink_to(target)
    write_dir_atomic(link, lambda d: (d / "y").write_text("2"))
    assert not link.is_symlink() and (link / "y").read_text() == "2"
    assert (target / "keep").read_text() == "k"  # the link is replaced, not what it pointed to
    assert _hidden(tmp_path) == []


# ---------------------------------------------------------------------- 3. permissions of a plain mkdir
def test_converted_folder_has_umask_permissions(dense_dir, tmp_path):
    old = os.umask(0o027)
    try:
        convert_dense(dense_dir, tmp_path / "out")
        write_dir_atomic(tmp_path / "plain", lambda d: None)
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "out").stat().st_mode) == 0o750
    assert stat.S_IMODE((tmp_path / "plain").stat().st_mode) == 0o750


# ---------------------------------------------------------------------- 4. p-MoD checkpoints load whole or not at all
@pytest.mark.parametrize("build", [tiny_llava, tiny_llava_next, tiny_qwen2_vl], ids=["llava", "llava_next", "qwen2_vl"])
def test_pmod_checkpoint_with_missing_or_unexpected_tensors_is_refused(build, tmp_path):
    model = pmod.apply_pmod(build(num_layers=2), pmod.PModConfig(schedule=[0.5, 0.5]))
    model.save_pretrained(tmp_path)
    _, info = pmod.load_model(tmp_path, output_loading_info=True)  # non-persistent buffers are not missing
    assert not info["missing_keys"] and not info["unexpected_keys"]
    weights = tmp_path / "model.safetensors"
    state = load_file(weights)
    dropped = sorted(k for k in state if k.endswith("mlp.down_proj.weight"))
    save_file({k: v for k, v in state.items() if k not in dropped}, weights, metadata={"format": "pt"})
    for load in (pmod.load_model, AutoModelForImageTextToText.from_pretrained):
        with pytest.raises(CheckpointError,
                           match=r"missing model\..*layers\.0\.mlp\.down_proj\.weight, .* \(2 in all\)"):
            load(tmp_path)
    save_file({**state, "model.extra.weight": torch.zeros(2)}, weights, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"unexpected model\.(language_model\.)?extra\.weight \(1 in all\)"):
        pmod.load_model(tmp_path)


@pytest.mark.parametrize("version", ["2", "2.5"])
def test_converted_qwen2_vl_loads_every_weight(version, tmp_path):
    """A dense Qwen2-VL checkpoint is saved in transformers' legacy key layout and so is its conversion; loading the
    p-MoD checkpoint must rename the keys as for the dense class (they used to load as random weights)."""
    tiny_qwen2_vl(num_layers=2, version=version).save_pretrained(tmp_path / "dense")
    convert_dense(tmp_path / "dense", tmp_path / "out", pmod.PModConfig(schedule=[0.5, 0.5]))
    converted = pmod.load_model(tmp_path / "dense", pmod.PModConfig(schedule=[0.5, 0.5])).state_dict()
    loaded = pmod.load_model(tmp_path / "out").state_dict()
    assert loaded.keys() == converted.keys() and all(torch.equal(loaded[k], converted[k]) for k in loaded)


def test_tied_lm_head_is_not_missing(tmp_path):
    lm = pmod.apply_pmod(tiny_causal_lm("llama", num_layers=2, tie_word_embeddings=True),
                         pmod.PModConfig(schedule=[0.5, 1.0], targets="all"))
    lm.save_pretrained(tmp_path)
    assert not any("lm_head" in k for k in load_file(tmp_path / "model.safetensors"))
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()


def test_dense_checkpoint_with_missing_tensor_is_refused_on_conversion(dense_dir):
    weights = dense_dir / "model.safetensors"
    state = load_file(weights)
    save_file({k: v for k, v in state.items() if not k.endswith("layers.1.mlp.up_proj.weight")}, weights,
              metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"missing .*layers\.1\.mlp\.up_proj\.weight"):
        pmod.load_model(dense_dir, pmod.PModConfig(schedule=[0.5, 0.5]))
    from pmod.loading import load_pretrained

    with pytest.raises(CheckpointError, match=r"missing .*layers\.1\.mlp\.up_proj\.weight"):
        load_pretrained(dense_dir)  # the dense baseline of an evaluation


def test_wrong_shape_or_dtype_in_pmod_checkpoint_is_refused(pmod_dir):
    weights = pmod_dir / "model.safetensors"
    state = load_file(weights)
    key = next(k for k in state if k.endswith("layers.0.mlp.down_proj.weight"))
    save_file({**state, key: torch.zeros(3, 3)}, weights, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"wrong shapes .*down_proj\.weight \(3, 3\) instead of \(64, 128\)"):
        pmod.load_model(pmod_dir)
    save_file({**state, key: state[key].to(torch.int64)}, weights, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"not floating point .*down_proj\.weight"):
        AutoModelForImageTextToText.from_pretrained(pmod_dir)


def test_non_finite_weights_are_refused_by_name(pmod_dir, dense_dir):
    """A NaN router weight made every answer empty, with exit code 0: every loader refuses it, naming the tensor."""
    weights = pmod_dir / "model.safetensors"
    state = load_file(weights)
    key = next(k for k in state if k.endswith(".router.weight"))
    bad = state[key].clone()
    bad[0, 0] = float("nan")
    save_file({**state, key: bad}, weights, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"not finite \(NaN or inf\) in .*router\.weight \(1 in all\)"):
        pmod.load_model(pmod_dir)
    weights = dense_dir / "model.safetensors"
    state = load_file(weights)
    key = next(k for k in state if k.endswith("layers.1.mlp.up_proj.weight"))
    save_file({**state, key: torch.full_like(state[key], float("inf"))}, weights, metadata={"format": "pt"})
    for load in (pmod.load_model, pmod.loading.load_pretrained):
        with pytest.raises(CheckpointError, match=r"not finite .*up_proj\.weight"):
            load(dense_dir)


def test_damaged_pmod_weight_files_are_refused(pmod_dir):
    weights = pmod_dir / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: not a valid \.safetensors file"):
        pmod.load_model(pmod_dir)
    weights.write_bytes(data)
    state = load_file(weights)
    keys = sorted(state)
    save_file({k: state[k] for k in keys[:10]}, pmod_dir / "model-00001-of-00002.safetensors",
              metadata={"format": "pt"})
    weights.unlink()
    index = {"weight_map": {**dict.fromkeys(keys[:10], "model-00001-of-00002.safetensors"),
                            **dict.fromkeys(keys[10:], "model-00002-of-00002.safetensors")}}
    (pmod_dir / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="missing weight shards .*model-00002-of-00002.safetensors"):
        pmod.load_model(pmod_dir)
    (pmod_dir / "model.safetensors.index.json").write_text(json.dumps({"weight_map": ["a", "b"]}))
    with pytest.raises(CheckpointError, match="weight_map must be a non-empty mapping"):
        pmod.load_model(pmod_dir)
    (pmod_dir / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "../model.safetensors"}}))
    with pytest.raises(CheckpointError, match="invalid shard files"):
        pmod.load_model(pmod_dir)


# ---------------------------------------------------------------------- 5. damaged source checkpoints: one clear line
@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_convert_dense_damaged_safetensors(dense_dir, tmp_path, capsys, damage):
    weights = dense_dir / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) - 100] if damage == "truncated" else b"\x00" * 64)
    line = _convert_error(capsys, ["dense", str(dense_dir), str(tmp_path / "out")])
    assert str(weights) in line and "not a valid .safetensors file" in line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("text, message", [("{not json", "not a valid JSON file"),
                                           ('{"model_type": "llava", "text_config": 5}', "text_config")])
def test_convert_dense_damaged_config(dense_dir, tmp_path, capsys, text, message):
    (dense_dir / "config.json").write_text(text)
    line = _convert_error(capsys, ["dense", str(dense_dir), str(tmp_path / "out")])
    assert f"Cannot read {dense_dir / 'config.json'}" in line and message in line


@pytest.fixture(scope="module")
def original_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("original")
    state, vision, _ = _original_state()
    write_original(root / "src", state, _original_config())
    vision.config.save_pretrained(root / "clip")
    return root / "src"


def _damaged_copy(original_dir, tmp_path, config=None, config_text=None, index=None):
    src = tmp_path / "src"
    src.mkdir()
    for item in original_dir.iterdir():
        (src / item.name).symlink_to(item)
    (src / "config.json").unlink()
    (src / "config.json").write_text(
        config_text if config_text is not None else json.dumps(config or _original_config())
    )
    if index is not None:
        (src / "model.safetensors.index.json").unlink()
        (src / "model.safetensors.index.json").write_text(json.dumps(index))
    return src


@pytest.mark.parametrize(
    "damage, message",
    [
        ({"index": {"weight_map": ["model-00001-of-00002.safetensors"]}}, "weight_map must be a non-empty mapping"),
        ({"index": {"weight_map": {"a": 5}}}, "weight_map names invalid shard files: 5 "),
        ({"index": [1, 2]}, "is not a valid shard index"),
        ({"config": {k: v for k, v in _original_config().items() if k != "vocab_size"}}, "has no vocab_size"),
        ({"config": {**_original_config(), "num_hidden_layers": "32"}},
         "num_hidden_layers must be a positive integer, got '32'"),
        ({"config_text": "not json {"}, "it is not a JSON file"),
        ({"config_text": "[1, 2]"}, "must hold a JSON object"),
        ({"config": {**_original_config(), "mod_weight_norm": "tanh_x_1"}},
         "mod_weight_norm 'tanh_x_1': 'x' is not a finite number"),
        ({"config": {**_original_config(), "mod_target_layers": "shiftedcos_decay_nan_0.15"}},
         "'nan' is not a finite number"),
        ({"config": {**_original_config(), "mod_bias_enabled": "false"}}, "mod_bias_enabled must be true or false"),
        ({"config": {**_original_config(), "mm_patch_merge_type": 3}}, "mm_patch_merge_type must be a string"),
        ({"config": {**_original_config(), "image_aspect_ratio": "anyres", "mm_patch_merge_type": "spatial_unpad",
                     "image_grid_pinpoints": [[28, "56"]]}}, "image_grid_pinpoints must be a list of"),
    ],
)
def test_convert_original_damaged_checkpoint(original_dir, tmp_path, capsys, damage, message):
    src = _damaged_copy(original_dir, tmp_path, **damage)
    line = _convert_error(capsys, ["original", str(src), str(tmp_path / "out")])
    assert message in line or pytest.fail(line)
    named = "model.safetensors.index.json" if "index" in damage else "config.json"
    assert named in line
    assert not (tmp_path / "out").exists()


def test_convert_original_tensor_problems(original_dir, tmp_path):
    state, _, _ = _original_state()
    clip = original_dir.parent / "clip"
    write_original(tmp_path / "int", {**state, "model.mm_projector.0.bias": torch.zeros(32, dtype=torch.int64)},
                   _original_config())
    with pytest.raises(ConversionError, match=r"not floating point model\.multi_modal_projector\.linear_1\.bias"):
        convert_original(tmp_path / "int", tmp_path / "out", vision_tower=clip)
    write_original(tmp_path / "noname", {**state, "model.layers.3": torch.zeros(2)}, _original_config())
    with pytest.raises(ConversionError, match=r"unexpected model\.layers\.3 \(1 in all\)"):
        convert_original(tmp_path / "noname", tmp_path / "out", vision_tower=clip)
    # a tensor in two shards: which copy is meant?
    write_original(tmp_path / "twice", state, _original_config())
    first, second = (tmp_path / "twice" / "model-00001-of-00002.safetensors",
                     tmp_path / "twice" / "model-00002-of-00002.safetensors")
    extra = next(iter(load_file(second).items()))
    save_file({**load_file(first), extra[0]: extra[1]}, first, metadata={"format": "pt"})
    with pytest.raises(ConversionError,
                       match=rf"{second.name}: tensors also stored in {first.name}: {extra[0]} \(1 in all\)"):
        convert_original(tmp_path / "twice", tmp_path / "out", vision_tower=clip)
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------- 6. local paths are local
@pytest.mark.parametrize("path", ["/no/such/pmod-dir", "./no-such-pmod-dir", "../no-such-pmod-dir",
                                  "~/no-such-pmod-dir", Path("no-such/pmod-dir")])
def test_load_missing_local_path_says_no_such_directory(path):
    from pmod.loading import load_pretrained

    for load in (pmod.load_model, load_pretrained):
        with pytest.raises(CheckpointError,
                           match=r"No such directory: \S*pmod-dir\. Pass a local checkpoint directory"):
            load(path)


def test_load_file_or_folder_without_config(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError, match="is a file; pass the checkpoint directory"):
        pmod.load_model(tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match="has no config.json"):
        pmod.load_model(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"Cannot read .*config\.json"):
        pmod.load_model(tmp_path)


# ---------------------------------------------------------------------- 7. a malformed pmod entry names its file
@pytest.mark.parametrize(
    "entry, error, message",
    [
        ("garbage", CheckpointError, "needs a 'pmod' object"),
        (None, CheckpointError, "needs a 'pmod' object"),
        ({"settings": {}, "layer_ratios": [0.5], "routed_layers": [0]}, pmod.PModConfigError,
         "1 entries for a model with 2"),
        ({"settings": {}, "layer_ratios": [0.5, 0.5]}, pmod.PModConfigError, "malformed"),
    ],
)
def test_malformed_pmod_entry_names_the_file(pmod_dir, entry, error, message):
    config = json.loads((pmod_dir / "config.json").read_text())
    config["pmod"] = entry
    (pmod_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(error, match=message) as caught:
        pmod.load_model(pmod_dir)
    assert str(pmod_dir / "config.json") in str(caught.value)


def test_a_folder_that_appears_while_converting_is_never_replaced_without_force(dense_dir, tmp_path, monkeypatch):
    """OUT was missing when the conversion started and holds a user's files when it ends: without --force they stay."""
    out = tmp_path / "out"
    real = LlavaForConditionalGeneration.save_pretrained

    def meanwhile(self, *args, **kwargs):  # someone writes to OUT while the converted model is being saved
        out.mkdir(exist_ok=True)
        (out / "precious.txt").write_text("mine")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(LlavaForConditionalGeneration, "save_pretrained", meanwhile)
    with pytest.raises(ConversionError, match="appeared while it was being written.*--force"):
        convert_dense(dense_dir, out, pmod.PModConfig(schedule=[0.5, 0.5]))
    assert sorted(p.name for p in out.iterdir()) == ["precious.txt"] and _hidden(tmp_path) == []


def test_converted_folder_keeps_the_pmod_model_card(dense_dir, tmp_path):
    """The dense folder's own README (hub checkpoints have one) is not copied over the card that says to import pmod."""
    (dense_dir / "README.md").write_text("# llava-hf model card")
    (dense_dir / "special_tokens_map.json").write_text("{}")
    out = convert_dense(dense_dir, tmp_path / "out", pmod.PModConfig(schedule=[0.5, 0.5]))
    assert "import pmod" in (out / "README.md").read_text()
    assert (out / "special_tokens_map.json").read_text() == "{}"  # other files still come along


def test_an_output_over_its_input_is_refused_before_anything_is_written(dense_dir, pmod_dir, tmp_path, capsys):
    """`pmod convert dense D D --force` replaced the dense checkpoint with its conversion. Every writer refuses an
    output that is its input or lies inside it (and, replacing a folder whole, one that holds it)."""
    before = sorted(p.name for p in dense_dir.iterdir())
    for out in (dense_dir, dense_dir / "converted", dense_dir.parent):
        assert "would destroy what this command reads" in _convert_error(capsys, ["dense", str(dense_dir), str(out),
                                                                                  "--force"])
    assert sorted(p.name for p in dense_dir.iterdir()) == before
    from pmod.files import check_output_apart

    check_output_apart(tmp_path / "eval", {"model folder": pmod_dir}, ValueError)  # apart: fine
    check_output_apart(tmp_path, {"model folder": pmod_dir}, ValueError)  # holds it, but only adds files: fine
    capsys.readouterr()
    assert main(["eval", str(pmod_dir), "--data", str(tmp_path / "d.json"), "--out", str(pmod_dir / "eval")]) == 2
    assert "lies inside the model folder" in capsys.readouterr().err and not (pmod_dir / "eval").exists()


def test_a_second_run_into_a_held_output_is_refused(dense_dir, pmod_dir, tmp_path, capsys):
    """Two runs into one output folder both "succeeded" with a mix of their files: the folder is held while a run
    writes it, and a second run is refused naming the holder; the lock goes with the holder."""
    from pmod.files import output_lock

    out = tmp_path / "out"
    data = tmp_path / "d.json"
    data.write_text(json.dumps([{"id": "a", "conversations": [{"from": "human", "value": "hi ?"},
                                                             {"from": "gpt", "value": "yes"}]}]))
    with output_lock(out, "pmod train", CheckpointError):
        assert "is being written by another pmod run (pmod train, pid" in _convert_error(
            capsys, ["dense", str(dense_dir), str(out)])
        assert main(["eval", str(pmod_dir), "--data", str(data), "--out", str(out)]) == 2
        assert "being written by another pmod run" in capsys.readouterr().err
        with pytest.raises(CheckpointError, match="being written"), output_lock(out, "pmod eval", CheckpointError):
            pass
    with output_lock(out, "pmod eval", CheckpointError):  # released
        pass
    assert main(["convert", "dense", str(dense_dir), str(out)]) == 0 and (out / "config.json").is_file()


def test_a_full_disk_is_said_to_be_one(dense_dir, tmp_path, capsys, monkeypatch):
    """safetensors reports a full disk as its own error type: it was "unexpected ... please report it" and never
    said "disk"."""
    import pmod.integrations.convert as convert

    def full(*args, **kwargs):
        try:
            raise OSError(28, "No space left on device")
        except OSError as cause:
            raise RuntimeError("Error while serializing: I/O error") from cause

    monkeypatch.setattr(convert, "write_dir_atomic", full)
    message = _convert_error(capsys, ["dense", str(dense_dir), str(tmp_path / "out")])
    assert "the disk is full" in message and "unexpected" not in message


def test_data_files_nested_too_deeply_or_named_in_upper_case(tmp_path):
    from pmod.data.records import load_records

    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(pmod.PModInputError, match="nested too deeply"):
        load_records(deep)
    upper = tmp_path / "DATA.JSONL"
    upper.write_text('{"id": "a", "conversations": []}\n{"id": "b", "conversations": []}\n')
    assert [r["id"] for r in load_records(upper)] == ["a", "b"]  # JSON lines, whatever the case of the suffix


def test_paths_are_named_as_paths(dense_dir, tmp_path, capsys):
    """Local paths that do not exist were called malformed hub ids, a link loop retried the hub for 25 s, a name near
    the file-name limit failed after the conversion's work."""
    for missing in (f"{tmp_path}/nope/", "nope/", "runs/a/b"):
        with pytest.raises(CheckpointError, match="No such directory"):
            pmod.loading.read_checkpoint_config(missing)
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    with pytest.raises(CheckpointError, match="symbolic link that leads nowhere"):
        pmod.load_model(loop)
    assert main(["info", f"{tmp_path}/nope/"]) == 2 and "No such directory" in capsys.readouterr().err
    long_name = tmp_path / "outputs" / ("m" * 240)
    message = _convert_error(capsys, ["dense", str(dense_dir), str(long_name)])
    assert "Choose a shorter name" in message
