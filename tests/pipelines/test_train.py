"""Training: losses fall, resuming is exact, routers learn, stages freeze the right parts, recipes parse."""

import json
from pathlib import Path

import pytest
import torch
import yaml

import pmod
from pmod.errors import PModConfigError
from pmod.loading import load_processor
from pmod.pipelines.recipe import load_config
from pmod.pipelines.train import train
from pmod.tiny import TinyModelSettings, build_tiny
from tests.helpers.llava_data import colour_records, write_records
from tests.helpers.train import StopAfter, _config

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("data")
    records = colour_records(folder, n=48)
    return write_records(folder, records), folder


def _params(model, part):
    return {n: p.detach().clone() for n, p in model.named_parameters() if part in n}


def test_loss_falls_and_routers_learn_and_the_model_loads(data, tmp_path):
    config = _config(data, tmp_path, max_steps=24, learning_rate=5e-3)
    result = train(config)
    first, last = sum(result.losses[:3]) / 3, sum(result.losses[-3:]) / 3
    assert last < 0.6 * first, result.losses
    model = pmod.load_model(tmp_path)
    assert model.config.model_type == "pmod_llava"
    routers = _params(model, ".router.")
    last = f"layers.{model.config.text_config.num_hidden_layers - 1}."
    # they started at zero; the last layer's router gets no gradient: its image-token outputs only reach the
    # logits at image positions, which have no labels
    assert routers and all((w.abs().sum() > 0) == (last not in n) for n, w in routers.items())
    logs = [h for h in result.log_history if "routing/kept_fraction" in h]
    assert len(logs) == 24
    # the realised kept fraction is the mean of the routed layers' ratios (every example has 16 image tokens)
    ratios = model.config.pmod["layer_ratios"]
    expected = sum(int(r * 16) / 16 for r in ratios if r < 1) / sum(r < 1 for r in ratios)
    assert logs[0]["routing/kept_fraction"] == pytest.approx(expected, abs=1e-4)
    assert logs[0]["routing/router_weight"] == pytest.approx(1.0)  # zero routers: g = beta
    assert logs[-1]["routing/router_weight"] != pytest.approx(1.0, abs=1e-5)
    assert (tmp_path / "processor_config.json").is_file()
    saved = load_config(tmp_path / "pmod_train.yaml")  # the recipe beside the model reproduces the run
    assert saved == config and saved.to_dict() == config.to_dict() and isinstance(saved.pmod, pmod.PModConfig)


def test_resume_reproduces_the_uninterrupted_run(data, tmp_path):
    full = train(_config(data, tmp_path / "full", max_steps=10))
    killed = train(_config(data, tmp_path / "resumed", max_steps=10), callbacks=[StopAfter(6)])
    assert len(killed.losses) == 6 and (tmp_path / "resumed/checkpoint-6").is_dir()
    # stopped by a callback before its last step: an interruption, so no final model is written over the checkpoint
    assert full.completed and not killed.completed and not (tmp_path / "resumed/config.json").exists()
    resumed = train(_config(data, tmp_path / "resumed", max_steps=10))
    assert resumed.resumed_from.endswith("checkpoint-6")
    torch.testing.assert_close(torch.tensor(resumed.losses[6:]), torch.tensor(full.losses[6:]), rtol=1e-4, atol=1e-5)
    a, b = pmod.load_model(tmp_path / "full"), pmod.load_model(tmp_path / "resumed")
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5, msg=name)


def test_router_learning_rate_and_pretrain_stage(data, tmp_path):
    from pmod.pipelines.train import build_model, set_trainable

    frozen = train(_config(data, tmp_path / "a", max_steps=3, router_learning_rate=0.0))
    model = pmod.load_model(frozen.output_dir)
    assert all(w.abs().sum() == 0 for w in _params(model, ".router.").values())  # lr 0: still zero

    config = _config(data, tmp_path / "b", max_steps=3, stage="pretrain")
    before, _ = build_model(config, json.loads(Path(config.data_path).read_text()))
    result = train(config)
    after = pmod.load_model(result.output_dir)
    assert set(result.trainable_parameters) == {"projector"}
    changed = {n for n, p in after.named_parameters() if not torch.equal(p, dict(before.named_parameters())[n])}
    assert changed and all("multi_modal_projector" in n for n in changed)
    with pytest.raises(PModConfigError, match="nothing to train"):
        set_trainable(pmod.tiny.tiny_causal_lm(), "pretrain")


def test_finetune_keeps_the_vision_tower_frozen(data, tmp_path):
    result = train(_config(data, tmp_path, max_steps=2, freeze_vision_tower=True))  # a tiny model's default: trained
    assert "vision_tower" not in result.trainable_parameters
    assert {"language_model", "projector", "router"} <= set(result.trainable_parameters)


def test_pad_images_is_saved_with_the_processor(data, tmp_path):
    from transformers import AutoProcessor

    result = train(_config(data, tmp_path, max_steps=1, pad_images=True))
    saved = AutoProcessor.from_pretrained(result.output_dir).image_processor
    assert type(saved).__name__.startswith("LlavaImageProcessor") and saved.do_pad  # evaluation pads like training


def test_dense_baseline(data, tmp_path):
    result = train(_config(data, tmp_path, pmod=None, max_steps=2))
    from transformers import AutoConfig

    assert AutoConfig.from_pretrained(result.output_dir).model_type == "llava"
    assert not any("routing/" in k for h in result.log_history for k in h)


def test_bad_images_are_counted_not_fatal(tmp_path):
    folder = tmp_path / "data"
    records = colour_records(folder, n=16)
    (folder / "img/3.png").write_bytes(b"broken")
    records[5]["image"] = "img/gone.png"
    path = write_records(folder, records)
    result = train(_config((path, folder), tmp_path / "run", max_steps=2, num_train_epochs=1, group_by_length=False))
    assert result.skipped_records == 2
    assert result.log_history[-2]["skipped_records"] == 2


def test_activation_checkpointing_gives_the_same_losses(data, tmp_path):
    plain = train(_config(data, tmp_path / "a", max_steps=3))
    ckpt = train(_config(data, tmp_path / "b", max_steps=3, activation_checkpointing=True))
    torch.testing.assert_close(torch.tensor(ckpt.losses), torch.tensor(plain.losses), rtol=1e-4, atol=1e-5)


def test_tensorboard_events_are_written(data, tmp_path):
    pytest.importorskip("tensorboard")
    train(_config(data, tmp_path, max_steps=2, report_to=["tensorboard"]))
    assert list(tmp_path.glob("runs/**/events.out.tfevents.*"))


def test_load_config_overrides_and_errors(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"tiny_model": {"num_layers": 2}, "data_path": "x.json", "pmod": {},
                                      "trainer": {"max_steps": 5}}))
    config = load_config(recipe, ["trainer.learning_rate=1e-4", "pmod.average_ratio=0.3", "trainer.report_to=[]",
                                  "tiny_model.seed=3"])
    assert (config.pmod == pmod.PModConfig(average_ratio=0.3)
            and config.tiny_model == TinyModelSettings(num_layers=2, seed=3))
    # the recipe's trainer settings over pmod's defaults, which differ from TrainingArguments' own
    assert config.trainer == {**pmod.pipelines.recipe.TRAINER_DEFAULTS, "max_steps": 5, "learning_rate": 1e-4,
                              "report_to": []}
    assert load_config(recipe, ["pmod=null"]).pmod is None  # the dense baseline
    with pytest.raises(PModConfigError, match="did you mean 'learning_rate'"):
        load_config(recipe, ["trainer.learning_rat=1"])
    with pytest.raises(PModConfigError, match=r"learning_rate: Trainer settings go in the trainer mapping.*"
                                              r"trainer.learning_rate=\.\.\."):
        load_config(recipe, ["learning_rate=1"])
    with pytest.raises(PModConfigError, match="unknown trainer setting 'warmup_ratio'.*warmup_steps below 1"):
        load_config(recipe, ["trainer.warmup_ratio=0.1"])
    with pytest.raises(PModConfigError, match="key=value"):
        load_config(recipe, ["learning_rate"])
    with pytest.raises(PModConfigError, match="min_ratio"):
        load_config(recipe, ["pmod.min_ratio=0.9", "pmod.max_ratio=0.5"])
    with pytest.raises(PModConfigError, match="exactly one of"):
        load_config(None, ["data_path=x.json"])
    with pytest.raises(PModConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")


@pytest.mark.parametrize("name", ["pmod-llava-1.5-7b.yaml", "pmod-llava-next-7b.yaml", "pmod-qwen2-vl-7b.yaml",
                                  "tiny-cpu.yaml", "tiny-cpu-qwen3-vl.yaml", "tiny-cpu-gemma3.yaml"])
def test_recipes_parse(name):
    config = load_config(CONFIGS / name)
    trainer = config.trainer
    if trainer.get("deepspeed"):
        ds = json.loads((CONFIGS.parent / trainer["deepspeed"]).read_text())
        assert ds["zero_optimization"]["stage"] in (2, 3)
    if name.startswith("pmod-llava"):
        assert trainer["learning_rate"] == 2e-5 and trainer["lr_scheduler_type"] == "cosine" and trainer["bf16"]
        assert trainer["per_device_train_batch_size"] * 8 == 128 and trainer["num_train_epochs"] == 1
        assert trainer["warmup_steps"] == 0.03 and config.pmod.average_ratio == 0.5  # 3% of the steps
    if name.startswith("pmod-qwen"):
        assert config.chat_template is None and not config.pad_images and trainer["bf16"]  # the processor's own
        assert trainer["per_device_train_batch_size"] * trainer["gradient_accumulation_steps"] * 8 == 128


def test_deepspeed_and_fsdp_configs_name_real_classes():
    for name in ("zero2.json", "zero3.json"):
        assert json.loads((CONFIGS / "deepspeed" / name).read_text())["train_micro_batch_size_per_gpu"] == "auto"
    fsdp = yaml.safe_load((CONFIGS / "accelerate/fsdp.yaml").read_text())
    wrapped = set(fsdp["fsdp_config"]["fsdp_transformer_layer_cls_to_wrap"].split(","))
    model = pmod.apply_pmod(pmod.tiny.tiny_llava(num_layers=4), pmod.PModConfig())
    classes = {type(m).__name__ for m in model.modules()}
    assert wrapped <= classes | {"LlamaDecoderLayer"}
    layer_classes = {type(layer).__name__ for layer in model.model.language_model.layers}
    assert layer_classes <= wrapped and "CLIPEncoderLayer" in classes


def test_cli_train(data, tmp_path, capsys):
    from pmod.cli import main

    path, folder = data
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({
        "tiny_model": {"num_layers": 2, "hidden_size": 32}, "pmod": {}, "data_path": str(path),
        "image_folder": str(folder), "output_dir": str(tmp_path / "out"), "trainer": {"report_to": []},
    }))
    assert main(["train", str(recipe), "trainer.max_steps=2", "trainer.per_device_train_batch_size=4"]) == 0
    assert "trained 2 steps" in capsys.readouterr().out
    assert pmod.load_model(tmp_path / "out").config.model_type == "pmod_llava"
    assert main(["train", str(recipe), "no_such_setting=1"]) == 2


def test_cli_reports_a_run_stopped_before_its_end(data, tmp_path, capsys, monkeypatch):
    """A callback that stops the run (the Trainer's checkpoint-on-SIGTERM does) leaves no final model: the command
    says so and how to resume, and fails, instead of printing "model saved"."""
    import pmod.pipelines.train
    from pmod.cli import main

    real = pmod.pipelines.train.train
    monkeypatch.setattr(pmod.pipelines.train, "train", lambda config: real(config, callbacks=[StopAfter(1)]))
    path, folder = data
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({
        "tiny_model": {"num_layers": 2, "hidden_size": 32}, "pmod": {}, "data_path": str(path),
        "image_folder": str(folder), "output_dir": str(tmp_path / "out"),
        "trainer": {"report_to": [], "max_steps": 3, "save_steps": 1, "per_device_train_batch_size": 4},
    }))
    assert main(["train", str(recipe)]) == 1
    captured = capsys.readouterr()
    assert "stopped at step 1 of 3" in captured.err and "resume" in captured.err and "model saved" not in captured.out
    assert (tmp_path / "out/checkpoint-1").is_dir() and not (tmp_path / "out/config.json").exists()


def test_resume_skips_incomplete_checkpoints_and_refuses_other_recipes(data, tmp_path):
    train(_config(data, tmp_path, max_steps=6, save_steps=2), callbacks=[StopAfter(4)])
    # a kill while saving checkpoint-6: weights written, trainer state not yet
    partial = tmp_path / "checkpoint-6"
    partial.mkdir()
    (partial / "model.safetensors").write_bytes(b"truncated")
    resumed = train(_config(data, tmp_path, max_steps=6, save_steps=2))
    assert resumed.resumed_from.endswith("checkpoint-4") and resumed.global_step == 6
    with pytest.raises(PModConfigError, match="different recipe.*learning_rate"):
        train(_config(data, tmp_path, max_steps=6, save_steps=2, learning_rate=1e-4))
    # settings that do not change what is trained may differ
    train(_config(data, tmp_path, max_steps=6, save_steps=3, logging_steps=2))


def test_trainer_settings_pass_through_and_router_lr_with_a_deepspeed_optimizer(data, tmp_path):
    from pmod.pipelines.train import _check_router_optimizer, _training_arguments

    with pytest.raises(PModConfigError, match="trainer.output_dir is set by pmod: set output_dir at the top level"):
        _config(data, tmp_path, output_dir=str(tmp_path), trainer={"output_dir": "elsewhere"})
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"optimizer": {"type": "AdamW"}, "zero_optimization": {"stage": 2}}))
    with pytest.raises(PModConfigError, match="router_learning_rate"):
        _check_router_optimizer(_config(data, tmp_path, router_learning_rate=1e-3, deepspeed=str(ds)))
    # any TrainingArguments field, with its own name and meaning, DeepSpeed and FSDP settings included
    fsdp = {"fsdp_version": 2, "reshard_after_forward": True}
    args = _training_arguments(_config(data, tmp_path, adam_beta2=0.95, fsdp_config=fsdp, report_to="no_such_tracker",
                                       gradient_checkpointing=True))
    assert args.adam_beta2 == 0.95 and args.fsdp_config["reshard_after_forward"] and args.report_to == []
    assert args.output_dir == str(tmp_path) and args.remove_unused_columns is False
    assert args.data_seed == args.seed == 42  # the data order from the recipe's seed, not torch's initial one
    assert _training_arguments(_config(data, tmp_path, seed=3, data_seed=5)).data_seed == 5
    assert getattr(args, "activation_checkpointing", args.gradient_checkpointing)  # either name, this version's
    assert _config(data, tmp_path, deepspeed=str(ds)).trainer["deepspeed"] == str(ds)


def test_bf16_autocast_training(data, tmp_path):
    """bf16 mixed precision (on the CPU here): routers score in fp32 inside autocast, the loss falls."""
    fp32 = train(_config(data, tmp_path / "a", max_steps=6))
    bf16 = train(_config(data, tmp_path / "b", max_steps=6, bf16=True))
    assert bf16.losses[-1] < bf16.losses[0]
    torch.testing.assert_close(torch.tensor(bf16.losses[:2]), torch.tensor(fp32.losses[:2]), rtol=0.05, atol=0.05)


@pytest.mark.parametrize(("name", "model_type"), [("tiny-cpu.yaml", "pmod_llava"),
                                                  ("tiny-cpu-qwen3-vl.yaml", "pmod_qwen3_vl"),
                                                  ("tiny-cpu-gemma3.yaml", "pmod_gemma3")])
def test_tiny_cpu_recipe_runs(tmp_path, name, model_type):
    """configs/tiny-cpu*.yaml end to end (generated data, tiny model), shortened."""
    config = load_config(CONFIGS / name, [
        f"output_dir={tmp_path}", "trainer.max_steps=2", "synthetic_data.n_train=16", "synthetic_data.n_val=2",
        "synthetic_data.n_test=2", "trainer.report_to=[]",
    ])
    result = train(config)
    assert result.global_step == 2 and (tmp_path / "data/train.json").is_file()
    model = pmod.load_model(tmp_path)
    assert model.config.get_text_config().num_hidden_layers == 8 and model.config.model_type == model_type
    assert load_processor(tmp_path) is not None  # the saved processor loads back


def test_every_tiny_cpu_recipe_is_tested():
    """A new configs/tiny-cpu*.yaml joins `test_tiny_cpu_recipe_runs` (the LoRA one has its own test)."""
    params = next(m for m in test_tiny_cpu_recipe_runs.pytestmark if m.name == "parametrize").args[1]
    tested = {name for name, _ in params} | {"tiny-cpu-lora.yaml"}
    assert {p.name for p in CONFIGS.glob("tiny-cpu*.yaml")} == tested


@pytest.mark.parametrize(("arch", "model_type", "processor"), [
    ("qwen3-vl", "qwen3_vl", "Qwen3VLProcessor"), ("gemma3", "gemma3", "Gemma3Processor"),
    ("internvl", "internvl", "InternVLProcessor"), ("smolvlm", "smolvlm", "SmolVLMProcessor"),
    ("idefics3", "idefics3", "Idefics3Processor"), ("llava-next-video", "llava_next_video", "LlavaNextVideoProcessor"),
])
def test_tiny_model_arches_build_with_their_processor(arch, model_type, processor):
    """Every `tiny_model.arch`: the family's model with the settings' sizes, and its processor over the words."""
    words = "what colour is the circle ? red".split()
    model, proc = build_tiny(TinyModelSettings(arch=arch, num_layers=2, hidden_size=32, seed=1), words)
    assert model.config.model_type == model_type and type(proc).__name__ == processor
    text = model.config.get_text_config()
    assert text.num_hidden_layers == 2 and text.hidden_size == 32
    assert all(proc.tokenizer.convert_tokens_to_ids(w) != proc.tokenizer.unk_token_id for w in words)


@pytest.mark.parametrize(("settings", "message"), [
    ({"arch": "gemma3", "image_size": 56, "patch_size": 8}, "even multiple of patch_size"),
    ({"arch": "internvl", "image_size": 21, "patch_size": 7}, "even multiple of patch_size"),
    ({"arch": "qwen3-vl", "image_size": 30, "patch_size": 7}, "multiple of patch_size"),
])
def test_tiny_model_sizes_an_arch_cannot_take_are_refused(settings, message):
    with pytest.raises(PModConfigError, match=message):
        build_tiny(TinyModelSettings(num_layers=2, hidden_size=32, **settings), ["red"])


def test_training_from_saved_directories(data, tmp_path):
    """model_name_or_path: a dense checkpoint converted by the recipe, trained as dense, or an existing p-MoD one."""
    from transformers import AutoConfig

    from pmod.tiny import tiny_llava, tiny_llava_processor

    words = json.loads(Path(data[0]).read_text())[0]["conversations"][0]["value"].replace("<image>", "").split()
    dense = tiny_llava(num_layers=4)
    dense.save_pretrained(tmp_path / "dense")
    tiny_llava_processor(dense, words + ["red", "green", "blue", "colour", "circle"]).save_pretrained(
        tmp_path / "dense"
    )
    common = {"tiny_model": None, "model_name_or_path": str(tmp_path / "dense"), "max_steps": 1}
    routed = train(_config(data, tmp_path / "routed", **common))
    assert AutoConfig.from_pretrained(routed.output_dir).model_type == "pmod_llava"
    baseline = train(_config(data, tmp_path / "baseline", pmod=None, **common))
    assert AutoConfig.from_pretrained(baseline.output_dir).model_type == "llava"
    again = train(_config(data, tmp_path / "again", **{**common, "model_name_or_path": str(routed.output_dir)}))
    assert again.trainable_parameters["router"] > 0
    with pytest.raises(PModConfigError,
                       match=(r"already a p-MoD model, with other settings .*average_ratio 0.3 \(saved: 0.5\)"
                              ".*pmod: null")):
        train(_config(data, tmp_path / "x", pmod={"average_ratio": 0.3},
                      **{**common, "model_name_or_path": str(routed.output_dir)}))
    as_saved = train(_config(data, tmp_path / "as-saved", pmod=None,
                             **{**common, "model_name_or_path": str(routed.output_dir)}))
    assert AutoConfig.from_pretrained(as_saved.output_dir).model_type == "pmod_llava"
