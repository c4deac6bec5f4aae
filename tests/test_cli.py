import json

import pytest

import pmod
from pmod.cli import main
from pmod.tiny import tiny_llava


def test_schedule_json(capsys):
    assert main(["schedule", "--layers", "32", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["routed_layers"] == list(range(8, 32))
    assert round(out["mean_ratio"], 4) == 0.5375


def test_schedule_error_is_reported_not_raised(capsys):
    assert main(["schedule", "--layers", "2", "--schedule", "constant"]) == 2
    assert "routes no layer" in capsys.readouterr().err


def test_info(tmp_path, capsys):
    model = pmod.apply_pmod(tiny_llava(num_layers=6), pmod.PModConfig())
    model.save_pretrained(tmp_path / "model")
    assert main(["info", str(tmp_path / "model")]) == 0
    out = capsys.readouterr().out
    header, body = out.split("\n", 1)
    assert header.endswith("pmod_llava") and json.loads(body)["routed_layers"] == [2, 3, 4, 5]
    tiny_llava(num_layers=2).save_pretrained(tmp_path / "dense")
    assert main(["info", str(tmp_path / "dense")]) == 0  # a dense folder is an answer, not a failure
    assert "dense 'llava' checkpoint" in capsys.readouterr().out


def test_info_on_missing_dir(tmp_path, capsys):
    assert main(["info", str(tmp_path / "nope")]) == 2
    assert "pmod info: error: No such directory" in capsys.readouterr().err


@pytest.mark.parametrize("argv, flag", [
    (["schedule", "--layers", "0"], "--layers"),
    (["schedule", "--average-ratio", "nan"], "--average-ratio"),
    (["schedule", "--max-ratio", "1.5"], "--max-ratio"),
    (["flops", "--preset", "llava-1.5-7b", "--vision-tokens", "-5", "--text-tokens", "10"], "--vision-tokens"),
    (["flops", "--preset", "llava-1.5-7b", "--vision-tokens", "576", "--text-tokens", "x"], "--text-tokens"),
    (["flops", "--preset", "llava-1.5-7b", "--vision-tokens", "576", "--text-tokens", "10", "--crops", "0"], "--crops"),
])
def test_bad_flags_are_refused_with_the_flag_named(argv, flag, capsys):
    with pytest.raises(SystemExit) as stop:
        main(argv)
    assert stop.value.code == 2 and flag in capsys.readouterr().err


def test_prefill_cost_refuses_negative_token_counts():
    from pmod.efficiency import PRESETS, prefill_cost

    with pytest.raises(pmod.PModInputError, match="vision_tokens must be a whole number"):
        prefill_cost(PRESETS["llava-1.5-7b"], -5, 10)
    with pytest.raises(pmod.PModInputError, match="no tokens"):
        prefill_cost(PRESETS["llava-1.5-7b"], 0, 0)


def test_unexpected_errors_are_one_line_and_debug_shows_the_traceback(monkeypatch, capsys):
    import pmod.cli as cli

    def broken(args):
        raise RuntimeError("something deep\ninside torch")

    monkeypatch.setattr(cli, "cmd_schedule", broken)
    assert main(["schedule"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unexpected RuntimeError: something deep inside torch" in err and "--debug" in err
    with pytest.raises(RuntimeError, match="something deep"):
        main(["--debug", "schedule"])


def test_help_and_version_answer_without_importing_torch():
    """`pmod --help` builds every sub-command's parser without importing torch or transformers (seconds saved on each
    call); the installed console script is what users run."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = Path(sys.executable).parent / "pmod"
    env = {**os.environ, "PYTHONPROFILEIMPORTTIME": "1"}
    for argv, expected in ((["--help"], "usage: pmod"), (["eval", "--help"], "--resume"),
                           (["--version"], "pmod 0.1.0")):
        run = subprocess.run([str(script), *argv], capture_output=True, text=True, env=env, timeout=60, check=True)
        assert expected in run.stdout
        imported = {line.rsplit("|", 1)[-1].strip() for line in run.stderr.splitlines()
                    if line.startswith("import time")}
        assert not imported & {"torch", "transformers", "numpy"}, sorted(imported & {"torch", "transformers", "numpy"})
    assert pmod.__version__ == "0.1.0"


def test_lists_kept_out_of_the_heavy_modules_match_them():
    from pmod.cli import DEMO_ARCHES
    from pmod.pipelines.demo import ARCHES

    assert DEMO_ARCHES == ARCHES


@pytest.mark.parametrize("error, extra", [
    (ImportError("Using the `Trainer` with `PyTorch` requires `accelerate>=1.1.0`: Please run `pip install "
                 "transformers[torch]` or `pip install 'accelerate>=1.1.0'`"), "train"),
    (ModuleNotFoundError("No module named 'matplotlib'", name="matplotlib"), "bench"),
    (ModuleNotFoundError("No module named 'peft'", name="peft"), "lora"),
    (ModuleNotFoundError("No module named 'pydantic'", name="pydantic"), "train"),  # recipes are read by pydantic
    (ModuleNotFoundError("No module named 'num2words'", name="num2words"), "smolvlm"),
])
def test_a_missing_extra_is_named(monkeypatch, capsys, error, extra):
    """`pip install .` (the README offers it) has no extras: `pmod train` said "unexpected ImportError ... please
    report it"; it names the extra to install now."""
    import pmod.cli

    def fail(args):
        raise error

    build = pmod.cli.build_parser

    def parser_that_fails():
        parser = build()
        parser._subparsers._group_actions[0].choices["schedule"].set_defaults(func=fail)
        return parser

    monkeypatch.setattr(pmod.cli, "build_parser", parser_that_fails)
    assert main(["schedule"]) == 2
    err = capsys.readouterr().err
    assert f"pip install 'pmod[{extra}]'" in err and "unexpected" not in err
    assert pmod.cli._missing_extra(ImportError("No module named 'torchvision'", name="torchvision")) is None


@pytest.mark.parametrize("argv0, preset, expected", [("-m", None, "PASSIVE"), ("/usr/bin/pmod", None, "PASSIVE"),
                                                       ("/usr/bin/pmod", "ACTIVE", "ACTIVE"),
                                                       ("script.py", None, None)])
def test_the_command_waits_passively_for_openmp(argv0, preset, expected):
    """The `pmod` command (and `python -m pmod`) sets OMP_WAIT_POLICY=PASSIVE before torch loads, unless the user set
    it: spinning OpenMP threads made a 2-core machine with one other busy process 10x slower. A library import of
    pmod leaves the process's settings alone."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if preset:
        env["OMP_WAIT_POLICY"] = preset
    code = (f"import sys; sys.argv[0] = {argv0!r}; import os, pmod; "
            "print(os.environ.get('OMP_WAIT_POLICY'), 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    policy, torch_loaded = out.split()
    assert policy == str(expected) and torch_loaded == str(expected is None or argv0 == "script.py")


def test_info_reads_a_local_config_without_torch(tmp_path):
    """`pmod info DIR` imported torch and transformers to read a JSON file (10-17 s on a busy laptop)."""
    import subprocess
    import sys

    model = pmod.apply_pmod(tiny_llava(num_layers=4), pmod.PModConfig())
    model.save_pretrained(tmp_path)
    code = ("import sys; sys.argv[0] = 'pmod'; from pmod.cli import main; rc = main(['info', sys.argv[1]]); "
            "print('torch' in sys.modules, rc)")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, check=True)
    assert out.stdout.splitlines()[-1] == "False 0" and "pmod_llava" in out.stdout


def test_commands_do_not_print_transformers_loading_bars(tmp_path):
    """transformers' "Loading weights" / "Writing model shards" bars on every load and save are off unless
    --verbose."""
    import os
    import subprocess
    import sys

    from pmod.tiny import tiny_llava

    tiny_llava(num_layers=2).save_pretrained(tmp_path / "dense")
    run = [sys.executable, "-m", "pmod"]
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_DISABLE_PROGRESS_BARS"}  # as a user's shell has it
    quiet = subprocess.run([*run, "convert", "dense", str(tmp_path / "dense"), str(tmp_path / "a")],
                           capture_output=True, text=True, check=True, env=env)
    assert "Loading weights" not in quiet.stderr and "Writing model shards" not in quiet.stderr
    verbose = subprocess.run([*run, "--verbose", "convert", "dense", str(tmp_path / "dense"), str(tmp_path / "b")],
                             capture_output=True, text=True, check=True, env=env)
    assert "Loading weights" in verbose.stderr


def test_every_flag_and_argument_says_what_it_is():
    import argparse

    from pmod.cli import build_parser

    def walk(parser, path):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    yield from walk(sub, f"{path} {name}")
            elif not isinstance(action, (argparse._HelpAction, argparse._VersionAction)):
                yield path, action

    missing = [f"{path} {'/'.join(a.option_strings) or a.dest}" for path, a in walk(build_parser(), "pmod")
               if not a.help]
    assert not missing, missing


def test_every_pmod_setting_is_a_flag_with_the_config_default():
    """cli.py restated PModConfig's defaults by hand and `convert dense` exposed 4 of its 14 fields: now every field
    is a flag, its default the field's own, and the flags build the config they say."""
    import dataclasses

    from pmod.cli import _config_from, build_parser
    from pmod.config import PModConfig

    parser = build_parser()
    defaults = _config_from(parser.parse_args(["convert", "dense", "src", "out"]))
    assert defaults == PModConfig()
    args = parser.parse_args(["convert", "dense", "src", "out", "--schedule", "1,0.5,0.25", "--average-ratio", "0.4",
                              "--max-ratio", "0.9", "--min-ratio", "0.1", "--constant-start", "1", "--constant-end",
                              "none", "--alpha", "0.3", "--beta", "0.9", "--no-tanh-norm", "--no-string",
                              "--no-router-bias", "--no-router-zero-init", "--targets", "all",
                              "--routed-layers", "0,2"])
    assert _config_from(args) == PModConfig(
        schedule=[1.0, 0.5, 0.25], average_ratio=0.4, max_ratio=0.9, min_ratio=0.1, constant_start=1,
        constant_end=None, alpha=0.3, beta=0.9, tanh_norm=False, string=False, router_bias=False,
        router_zero_init=False, targets="all", routed_layers=[0, 2])
    flags = {a.dest for a in parser._subparsers._group_actions[0].choices["flops"]._actions}
    assert {f.name for f in dataclasses.fields(PModConfig)} <= flags
