"""Training refuses bad input with one clear pmod error, and never produces (or saves) a silently broken model."""

import json

import pytest
import torch
import yaml

import pmod
import pmod.pipelines.train
import pmod.tiny
from pmod.errors import PModConfigError, PModError, PModInputError, PModTrainingError
from pmod.pipelines.recipe import TrainConfig, load_config
from pmod.pipelines.train import train
from tests.helpers.llava_data import colour_records, write_records
from tests.helpers.train import StopAfter, _config

TINY = {"num_layers": 2, "hidden_size": 32}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("data")
    return write_records(folder, colour_records(folder, n=8)), folder


@pytest.fixture(scope="module")
def recipe(data, tmp_path_factory):
    """A recipe file of a tiny run (the overrides of each test complete it)."""
    path, folder = data
    out = tmp_path_factory.mktemp("recipe")
    recipe = out / "r.yaml"
    recipe.write_text(yaml.safe_dump({
        "tiny_model": TINY, "pmod": {}, "data_path": str(path), "image_folder": str(folder),
        "output_dir": str(out / "run"), "trainer": {"report_to": [], "max_steps": 1, "per_device_train_batch_size": 4},
    }))
    return recipe


def _tiny(data, out, **overrides) -> TrainConfig:
    return _config(data, out, **{"tiny_model": TINY, "per_device_train_batch_size": 4, "max_steps": 2, **overrides})


def _poisoned(monkeypatch, poison):
    """Make train() build its model as usual and then apply ``poison(model)``; returns the built models."""
    built = []

    def build(*args, **kwargs):
        model, processor = build_model(*args, **kwargs)
        poison(model)
        built.append(model)
        return model, processor

    build_model = pmod.pipelines.train.build_model
    monkeypatch.setattr(pmod.pipelines.train, "build_model", build)
    return built


def _projector(model) -> torch.nn.Parameter:
    return next(p for n, p in model.named_parameters() if "multi_modal_projector" in n)


# ------------------------------------------------------------------------------------ non-finite training
def test_a_non_finite_loss_stops_training_and_saves_nothing(data, tmp_path, monkeypatch):
    _poisoned(monkeypatch, lambda model: _projector(model).data.fill_(float("nan")))
    with pytest.raises(PModTrainingError,
                       match=r"step 1: the loss is nan.*lower learning rate.*check the data") as info:
        train(_tiny(data, tmp_path))
    assert isinstance(info.value, PModError)  # the CLI prints it as one line
    assert not (tmp_path / "model.safetensors").exists()


def test_a_non_finite_gradient_stops_before_the_optimizer_step(data, tmp_path, monkeypatch):
    """The loss is finite, the gradient of one weight is not: the step must not reach the weights."""
    built = _poisoned(monkeypatch, lambda model: _projector(model).register_hook(lambda g: g * float("inf")))
    with pytest.raises(PModTrainingError, match=r"step 1: the gradient norm is (nan|inf).*lower learning rate"):
        train(_tiny(data, tmp_path))
    assert all(torch.isfinite(p).all() for p in built[0].parameters())
    assert not (tmp_path / "model.safetensors").exists()


@pytest.mark.parametrize("save_steps", [1, 100], ids=["checkpoint", "final"])
def test_non_finite_weights_are_never_saved(data, tmp_path, monkeypatch, save_steps):
    """Weights that turn non-finite in the last optimizer step (nothing computes a loss on them afterwards) are
    refused both as a checkpoint and as the final model."""
    create_optimizer = pmod.pipelines.train.PModTrainer.create_optimizer

    def poisoning_optimizer(self, *args, **kwargs):
        optimizer = create_optimizer(self, *args, **kwargs)
        optimizer.register_step_post_hook(lambda *_: _projector(self.model).data.fill_(float("inf")))
        return optimizer

    monkeypatch.setattr(pmod.pipelines.train.PModTrainer, "create_optimizer", poisoning_optimizer)
    with pytest.raises(PModTrainingError,
                       match=r"refusing to save a model with non-finite weights .*multi_modal_projector"):
        train(_tiny(data, tmp_path, max_steps=1, save_steps=save_steps))
    assert not list(tmp_path.glob("**/model.safetensors"))


# ------------------------------------------------------------------------------------------ settings
def test_booleans_in_strings_are_read_as_booleans_everywhere(recipe, tmp_path):
    values = yaml.safe_load(recipe.read_text())
    quoted = tmp_path / "quoted.yaml"
    quoted.write_text(yaml.safe_dump({**values, "freeze_vision_tower": "false", "resume": "TRUE",
                                      "trainer": {**values["trainer"], "bf16": "No"}}))
    config = load_config(quoted)
    assert config.freeze_vision_tower is False and config.trainer["bf16"] is False and config.resume is True
    for word, expected in [("false", False), ("FALSE", False), ("'false'", False), ("' false '", False), ("no", False),
                           ("0", False),
                           ("'yes'", True), ("On", True), ("1", True)]:
        assert load_config(recipe, [f"freeze_vision_tower={word}"]).freeze_vision_tower is expected, word
    for bad in ("maybe", "2", "0.5", "[]"):
        with pytest.raises(PModConfigError, match=r"freeze_vision_tower must be true or false or null, got"):
            load_config(recipe, [f"freeze_vision_tower={bad}"])
    with pytest.raises(PModConfigError, match="pad_images must be true or false"):
        TrainConfig(**{**config.to_dict(), "pad_images": "sometimes"})


@pytest.mark.parametrize("override, message", [
    ("trainer.report_to=5", "trainer.report_to must be null or a string or a list of strings, got 5"),
    ("trainer.report_to=[tensorboard, 3]", "trainer.report_to must be .*a list of strings"),
    ("trainer.per_device_train_batch_size=0", "trainer.per_device_train_batch_size must be at least 1, got 0"),
    ("trainer.per_device_train_batch_size=2.5", "trainer.per_device_train_batch_size must be a whole number, got 2.5"),
    ("trainer.per_device_train_batch_size=true", "trainer.per_device_train_batch_size must be a whole number"),
    ("trainer.gradient_accumulation_steps=0", "trainer.gradient_accumulation_steps must be at least 1"),
    ("trainer.logging_steps=-1", "trainer.logging_steps must be above 0"),
    ("trainer.save_steps=0", "trainer.save_steps must be above 0"),
    ("model_max_length=0", "model_max_length must be at least 1"),
    ("trainer.learning_rate=.nan", "trainer.learning_rate must be a finite number"),
    ("trainer.learning_rate=nan", "trainer.learning_rate must be a finite number"),
    ("trainer.learning_rate=-1e-4", "trainer.learning_rate must not be negative"),
    ("trainer.learning_rate=fast", "trainer.learning_rate must be a finite number, got 'fast'"),
    ("router_learning_rate=.inf", "router_learning_rate must be a finite number"),
    ("projector_learning_rate=-1", "projector_learning_rate must not be negative"),
    ("trainer.weight_decay=-0.1", "trainer.weight_decay must not be negative"),
    ("trainer.warmup_steps=-0.5", "trainer.warmup_steps must not be negative, got -0.5"),
    ("trainer.max_steps=0", "trainer.max_steps must be at least 1, or -1"),
    ("trainer.eval_strategy=steps", "trainer.eval_strategy='steps' needs an evaluation set"),
    ("tiny_model.hidden_size=66", "tiny_model.hidden_size must be a multiple of 8"),
    ("trainer.num_train_epochs=0", "trainer.num_train_epochs must be above 0"),
    ("trainer.seed=-1", "trainer.seed must not be negative"),
    ("trainer.seed=4294967296", "trainer.seed must be below 2\\*\\*32"),
    ("trainer.bf16=maybe", "trainer.bf16 must be true or false, got 'maybe'"),
    ("trainer.learning_rate=true", "trainer.learning_rate must be a finite number, got True"),
    ("tiny_model.num_layers=true", "tiny_model.num_layers must be a whole number, got True"),
    ("pmod.schedule=[true, 0.5]", r"pmod.schedule must be .* a list of finite numbers, got \[True, 0.5\]"),
    ("pmod.routed_layers=[true, 2]", "pmod.routed_layers must be a list of whole numbers or null"),
    ("synthetic_data.shape_size=[0.5, 0.7, 0.9]", "synthetic_data.shape_size must be a list of 2 finite numbers"),
    ("synthetic_data.colours=red", "synthetic_data.colours must be a list of strings, got 'red'"),
    ("trainer.learning_rat=1e-3",
     r"unknown trainer setting 'learning_rat' \(did you mean 'learning_rate'\?\): .*no such"),
    ("trainer.remove_unused_columns=true", "trainer.remove_unused_columns is set by pmod"),
    ("max_steps=3", "max_steps: Trainer settings go in the trainer mapping"),
    ("stage=pretrian", "stage must be one of 'pretrain', 'finetune'"),
    ("pmod=5", "pmod must be a mapping or null"),
    ("output_dir=null", "output_dir must be a string, got null"),
    ("trainer=[]", "trainer must be a mapping"),
    ("pmod.alphaa=0.3", r"unknown pmod setting 'alphaa' \(did you mean 'alpha'\?\).*known pmod settings: alpha,"),
    ("pmod.alpha=.nan", "pmod.alpha must be a finite number"),
    ("pmod.schedule=[a, b]", "pmod.schedule must be one of .* or a list of finite numbers"),
    ("pmod.min_ratio=0.9", r"pmod: min_ratio \(0.9\) is larger than max_ratio"),
    ("tiny_model.num_layer=3", r"unknown tiny_model setting 'num_layer' \(did you mean 'num_layers'\?\)"),
    ("tiny_model.arch=gpt", "tiny_model.arch must be one of"),
    ("tiny_model.num_layers=x", "tiny_model.num_layers must be a whole number, got 'x'"),
    ("tiny_model.hidden_size=0", "tiny_model.hidden_size must be at least 1, got 0"),
    ("tiny_model.words=abc", "tiny_model.words must be a list of strings"),
    ("tiny_model.family=qwen9", "tiny_model.family must be one of llama, qwen2, mistral"),
    ("tiny_model.attn_implementation=eager", "unknown tiny_model setting 'attn_implementation'"),
    ("tiny_model={arch: gemma3, vision_hidden_size: 32}", "tiny_model.vision_hidden_size is for arch llava only"),
    ("synthetic_data.n_trian=3", r"unknown synthetic_data setting 'n_trian' \(did you mean 'n_train'\?\)"),
    ("synthetic_data.grid=5", "synthetic_data: grid must be 2 or 3"),
    ("report_to=[", "override 'report_to=\\[': the value is not valid YAML"),
])
def test_bad_settings_are_one_clear_error(recipe, override, message):
    with pytest.raises(PModConfigError, match=message):
        load_config(recipe, [override])


def test_numbers_are_converted_where_unambiguous(recipe):
    """As TrainingArguments types them: whole numbers where it takes ints, floats where it takes floats."""
    config = load_config(recipe, ["trainer.learning_rate=1e-4", "trainer.max_steps=1e3", "trainer.warmup_steps=1",
                                  "trainer.per_device_train_batch_size=8.0", "trainer.report_to=tensorboard",
                                  "lora.r='16'", "synthetic_data.n_train='4'", "pmod.average_ratio='0.25'"])
    trainer = config.trainer
    assert trainer["learning_rate"] == 1e-4 and trainer["max_steps"] == 1000 and type(trainer["max_steps"]) is int
    assert trainer["warmup_steps"] == 1.0 and type(trainer["warmup_steps"]) is float
    assert trainer["per_device_train_batch_size"] == 8 and type(trainer["per_device_train_batch_size"]) is int
    assert trainer["report_to"] == "tensorboard" and config.lora.r == 16 and config.synthetic_data.n_train == 4
    assert config.pmod.average_ratio == 0.25


def test_a_broken_recipe_file_is_a_config_error(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("tiny_model: {num_layers: 2\n")
    with pytest.raises(PModConfigError, match="is not valid YAML"):
        load_config(bad)


def test_invalid_training_arguments_are_config_errors(data, tmp_path):
    with pytest.raises(PModConfigError, match="invalid trainer settings: .*SchedulerType"):
        train(_tiny(data, tmp_path, lr_scheduler_type="cosin"))
    with pytest.raises(PModConfigError, match="trainer.max_grad_norm must be a finite number, got 'x'"):
        _tiny(data, tmp_path, max_grad_norm="x")
    with pytest.raises(PModConfigError, match="trainer.adam_beta1 must be a finite number"):
        _tiny(data, tmp_path, adam_beta1=float("nan"))
    with pytest.raises(PModConfigError, match="deepspeed config .*missing.json does not exist"):
        train(_tiny(data, tmp_path, deepspeed=str(tmp_path / "missing.json")))


def test_warmup_steps_below_one_is_a_fraction_of_the_steps(data, tmp_path):
    """warmup_steps 0.99 (as TrainingArguments reads it) warms up over every step, not over none or one."""
    result = train(_tiny(data, tmp_path, max_steps=4, warmup_steps=0.99, logging_steps=1))
    rates = [h["learning_rate"] for h in result.log_history if "learning_rate" in h]
    assert len(rates) == 4 and rates == sorted(rates) and rates[0] < rates[-1]


# ----------------------------------------------------------------------------------------------- data
@pytest.mark.parametrize("name, content, message", [
    ("empty.json", "[]", "empty.json holds no records"),
    ("string.json", json.dumps([{"id": "a", "conversations": "hello"}]),
     r"string.json: record 'a': 'conversations' must be a non-empty list of turns"),
    ("missing.json", json.dumps([{"id": "a", "image": "img/0.png"}]), "'conversations' must be a non-empty list"),
    ("turn.json", json.dumps([{"conversations": ["hello"]}]), r"record '0', turn 0: expected"),
    ("text.json", "id,image\n1,a.png\n", "text.json is not valid JSON"),
    ("lines.jsonl", '{"conversations": []}\n{oops\n', "lines.jsonl, line 2 is not valid JSON"),
    ("object.json", json.dumps({"conversations": []}), "expected a JSON list of records"),
])
def test_bad_data_files_are_one_clear_error_before_the_model_is_built(data, tmp_path, monkeypatch, name, content,
                                                                      message):
    monkeypatch.setattr(pmod.pipelines.train, "build_model", lambda *a, **k: pytest.fail("the model was built"))
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(PModInputError, match=message):
        train(_tiny(data, tmp_path / "run", data_path=str(path)))


def test_a_missing_image_folder_is_one_clear_error(data, tmp_path):
    with pytest.raises(PModConfigError, match=r"image_folder .*nowhere is not a folder"):
        train(_tiny(data, tmp_path, image_folder=str(tmp_path / "nowhere")))


# ------------------------------------------------------------------------------------------ checkpoints
def test_a_damaged_checkpoint_is_named_not_a_traceback(data, tmp_path):
    train(_tiny(data, tmp_path, max_steps=2, save_steps=1), callbacks=[StopAfter(1)])
    checkpoint = tmp_path / "checkpoint-1"
    weights = (checkpoint / "model.safetensors").read_bytes()
    advice = r"checkpoint .*checkpoint-1 is damaged: .*%s.*[;:] delete .*resume: false"

    (checkpoint / "model.safetensors").write_bytes(weights[: len(weights) // 2])  # a disk full while copying
    with pytest.raises(PModInputError, match=advice % "model.safetensors"):
        train(_tiny(data, tmp_path, max_steps=2, save_steps=1))
    (checkpoint / "model.safetensors").write_bytes(weights)

    optimizer = (checkpoint / "optimizer.pt").read_bytes()
    (checkpoint / "optimizer.pt").write_bytes(optimizer[:100])
    with pytest.raises(PModInputError, match=advice % "optimizer.pt"):
        train(_tiny(data, tmp_path, max_steps=2, save_steps=1))
    (checkpoint / "optimizer.pt").write_bytes(optimizer)

    state = (checkpoint / "trainer_state.json").read_text()
    (checkpoint / "trainer_state.json").write_text(state[:20])
    with pytest.raises(PModInputError, match=advice % "trainer_state.json"):
        train(_tiny(data, tmp_path, max_steps=2, save_steps=1))
    (checkpoint / "trainer_state.json").write_text(state)

    result = train(_tiny(data, tmp_path, max_steps=2, save_steps=1, resume=False))  # the advice works
    assert result.resumed_from is None and result.global_step == 2


def test_checkpoint_checks_cover_lora_and_deepspeed_layouts(tmp_path):
    """A LoRA run's checkpoint holds adapter weights only, a DeepSpeed run's none beside its global_step folder: the
    first is checked, the second accepted; optimizer states must be complete zip archives (as the Trainer writes)."""
    from safetensors.torch import save_file

    from pmod.pipelines.train import _check_checkpoint

    deepspeed = tmp_path / "deepspeed"
    (deepspeed / "global_step4").mkdir(parents=True)
    (deepspeed / "trainer_state.json").write_text('{"global_step": 4}')
    _check_checkpoint(deepspeed)
    lora = tmp_path / "lora"
    lora.mkdir()
    (lora / "trainer_state.json").write_text('{"global_step": 4}')
    save_file({"a": torch.zeros(4, 4)}, lora / "adapter_model.safetensors")
    _check_checkpoint(lora)
    weights = (lora / "adapter_model.safetensors").read_bytes()
    (lora / "adapter_model.safetensors").write_bytes(weights[:-8])
    with pytest.raises(PModInputError, match=r"lora is damaged: .*adapter_model.safetensors.*: delete .*lora"):
        _check_checkpoint(lora)
    (lora / "adapter_model.safetensors").write_bytes(weights)
    (lora / "optimizer.pt").write_bytes(b"\x80\x02legacy pickle, cut")
    with pytest.raises(PModInputError, match=r"optimizer.pt is not a complete torch file"):
        _check_checkpoint(lora)


@pytest.mark.parametrize("pmod_settings", [None, {}], ids=["dense", "pmod"])
def test_a_checkpoint_without_some_weights_is_not_resumed_with_random_ones(data, tmp_path, pmod_settings):
    from safetensors.torch import load_file, save_file

    train(_tiny(data, tmp_path, pmod=pmod_settings, max_steps=2, save_steps=1), callbacks=[StopAfter(1)])
    weights = tmp_path / "checkpoint-1/model.safetensors"
    tensors = load_file(weights)
    dropped = next(k for k in tensors if "multi_modal_projector" in k)
    save_file({k: v for k, v in tensors.items() if k != dropped}, weights, metadata={"format": "pt"})
    with pytest.raises(PModInputError, match=r"checkpoint .*checkpoint-1.*multi_modal_projector.*resume: false"):
        train(_tiny(data, tmp_path, pmod=pmod_settings, max_steps=2, save_steps=1))


# -------------------------------------------------------------------------------------------------- CLI
@pytest.mark.parametrize("overrides, message", [
    (["trainer.per_device_train_batch_size=0"], "trainer.per_device_train_batch_size must be at least 1"),
    (["trainer.report_to=5"], "trainer.report_to must be null or a string or a list of strings"),
    (["pmod.alphaa=0.3"], "unknown pmod setting 'alphaa'"),
    (["data_path=/nonexistent/train.json"], "data file not found"),
])
def test_cli_prints_one_line_and_exits_2(recipe, capsys, overrides, message):
    from pmod.cli import main

    assert main(["train", str(recipe), *overrides]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("pmod train: error: ") and message in err[0], err


def test_an_output_dir_in_the_base_model_is_refused(data, tmp_path):
    """The final model is saved into output_dir: a run started from a saved model into that same folder (or inside
    it) would overwrite what it trains from."""
    base = tmp_path / "base"
    pmod.apply_pmod(pmod.tiny.tiny_llava(num_layers=2),
                    pmod.PModConfig(schedule=[0.5, 1.0])).save_pretrained(base)
    before = sorted(p.name for p in base.iterdir())
    for out in (base, base / "run"):
        config = _config(data, out, tiny_model=None, model_name_or_path=str(base))
        with pytest.raises(PModConfigError, match="would destroy what this command reads"):
            train(config)
    assert sorted(p.name for p in base.iterdir()) == before


@pytest.mark.parametrize("text, message", [
    ("output_dir: runs/x\npmod: {}\npmod: null\n", "the key .pmod. is given twice"),
    ("trainer:\n  max_steps: 5\n  max_steps: 6\n", "the key 'max_steps' is given twice"),
    ("a: &a [1, 2, 3, 4, 5, 6, 7, 8, 9]\nb: [*a, *a, *a, *a, *a, *a, *a, *a, *a]\n",
     r"aliases \(\*name\) are not allowed"),
])
def test_duplicate_keys_and_aliases_in_a_recipe_are_refused(tmp_path, text, message):
    """A second `pmod:` (null) silently trained the dense baseline; an 8-level alias bomb of 512 bytes passed
    validation and took minutes and gigabytes when the recipe was saved."""
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(text)
    with pytest.raises(PModConfigError, match=message):
        load_config(recipe)
    with pytest.raises(PModConfigError, match="not valid YAML"):
        load_config(None, ["pmod={a: 1, a: 2}"])


def test_freeze_vision_tower_defaults_follow_the_model(tmp_path):
    """A tiny model's random vision tower is trained unless the recipe says otherwise; a saved model's stays frozen,
    as with LoRA; an explicit setting wins."""

    base = {"pmod": {}, "data_path": "x.json", "output_dir": str(tmp_path)}
    assert TrainConfig(tiny_model=TINY, **base).freeze_vision_tower is False
    assert TrainConfig(tiny_model=TINY, lora={}, **base).freeze_vision_tower is True
    assert TrainConfig(model_name_or_path="some/model", **base).freeze_vision_tower is True
    assert TrainConfig(tiny_model=TINY, freeze_vision_tower=True, **base).freeze_vision_tower is True
