"""The lmms-eval model `pmod`: entry point, generate_until / loglikelihood against pmod.evaluate and a manual
computation, and a command-line run on the local task in tests/data/lmms_eval_task (offline)."""

import importlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from test_evaluate import SPECIALS, WORDS
from transformers import AutoProcessor

import pmod
from pmod.conversation import render, to_messages
from pmod.evaluate import evaluate, exact_match
from pmod.tiny import randomize_routers, tiny_llava, tiny_llava_processor

# lmms-eval is installed by `make setup` (without its requirements); the guard only serves a bare environment.
Instance = pytest.importorskip("lmms_eval.api.instance").Instance
PMod = importlib.import_module("pmod.lmms_eval_plugin").PMod

TASK_DIR = Path(__file__).parent / "data" / "lmms_eval_task"
SCHEDULE = [1.0, 0.5, 0.3, 0.6]


def _docs():
    return [json.loads(line) for line in (TASK_DIR / "tiny_vqa.jsonl").read_text().splitlines()]


def _doc_to_visual(doc):
    return [Image.open(TASK_DIR / doc["image"]).convert("RGB")] if doc["image"] else []


def _records(docs):
    """The task's documents as LLaVA records, for pmod.evaluate."""
    records = []
    for d in docs:
        rec = {"id": d["question_id"], "conversations": [
            {"from": "human", "value": ("<image>\n" if d["image"] else "") + d["question"]},
            {"from": "gpt", "value": d["answer"]},
        ]}
        if d["image"]:
            rec["image"] = d["image"]
        records.append(rec)
    return records


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("lmms") / "model"
    model = pmod.apply_pmod(tiny_llava(num_layers=4), pmod.PModConfig(schedule=SCHEDULE))
    randomize_routers(model)
    model.save_pretrained(path)
    tiny_llava_processor(model, WORDS).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def plugin(model_dir):
    lm = PMod(pretrained=str(model_dir), device="cpu", batch_size=3)
    lm.task_dict = {"tiny": {"test": _docs()}}
    return lm


def _requests(kind, args_per_doc):
    return [
        Instance(request_type=kind, arguments=args, idx=0, metadata={"task": "tiny", "doc_id": i, "repeats": 1})
        for i, args in enumerate(args_per_doc)
    ]


def _generate_requests(gen_kwargs):
    args = [(d["question"], gen_kwargs, _doc_to_visual, i, "tiny", "test") for i, d in enumerate(_docs())]
    return _requests("generate_until", args)


def test_entry_point_registers_pmod():
    from lmms_eval.models import get_model

    assert get_model("pmod") is PMod


def test_generate_until_equals_evaluate(plugin, model_dir):
    gen_kwargs = {"until": ["\n\n"], "max_new_tokens": 3, "suppress_tokens": SPECIALS, "do_sample": False}
    answers = plugin.generate_until(_generate_requests(gen_kwargs))
    assert gen_kwargs == {"until": ["\n\n"], "max_new_tokens": 3, "suppress_tokens": SPECIALS, "do_sample": False}
    model = pmod.load_model(model_dir).eval()
    expected = evaluate(model, plugin.processor, _records(_docs()), TASK_DIR, batch_size=2, max_new_tokens=3,
                        suppress_tokens=SPECIALS, progress=False)
    assert answers == [r.prediction for r in expected.records]
    assert all(len(a.split()) == 3 for a in answers)
    cost = plugin.efficiency
    assert cost["n"] >= 5 and cost["flops_ratio"] == pytest.approx(expected.flops_ratio)
    assert cost["kv_ratio"] == pytest.approx(expected.kv_ratio) and set(cost["by_task"]) == {"tiny"}

    # A task's stop strings cut the answers.
    two_words = next(a for a in answers if len(set(a.split())) == 3)
    stop = " " + two_words.split()[1]
    cut = plugin.generate_until(_generate_requests({**gen_kwargs, "until": [stop]}))
    assert cut[answers.index(two_words)] == two_words.split()[0]


def test_loglikelihood_matches_manual_computation(plugin, model_dir):
    docs = _docs()
    answers = plugin.generate_until(_generate_requests({"max_new_tokens": 2, "suppress_tokens": SPECIALS}))
    continuations = [answers[0], "red square", answers[4]]
    reqs = _requests("loglikelihood", [(docs[i]["question"], c, _doc_to_visual, i, "tiny", "test")
                                       for i, c in zip([0, 1, 4], continuations)])
    got = plugin.loglikelihood(reqs)

    model = pmod.load_model(model_dir).eval()
    processor = plugin.processor
    for (logprob, greedy), i, cont in zip(got, [0, 1, 4], continuations):
        doc = docs[i]
        images = _doc_to_visual(doc)
        record = {"conversations": [{"from": "human", "value": ("<image>\n" if images else "") + doc["question"]}]}
        if images:
            record["image"] = doc["image"]
        prompt = render(processor, to_messages(record), add_generation_prompt=True)
        enc = processor(text=[prompt], images=images or None, return_tensors="pt")
        cont_ids = processor.tokenizer(cont, add_special_tokens=False, return_tensors="pt")["input_ids"]
        ids = torch.cat([enc["input_ids"], cont_ids], 1)
        labels = ids.clone()
        labels[:, : enc["input_ids"].shape[1]] = -100  # score only the continuation
        with torch.no_grad():
            out = model(input_ids=ids, pixel_values=enc.get("pixel_values"), labels=labels, use_cache=False)
        assert logprob == pytest.approx(-out.loss.item() * cont_ids.shape[1], rel=1e-5)
        assert logprob < 0
        n = enc["input_ids"].shape[1]
        assert greedy == bool((out.logits[0, n - 1 : -1].argmax(-1) == cont_ids[0]).all())
    assert got[1][1] is False  # an arbitrary continuation


def test_multi_round(plugin):
    docs = _docs()
    seen = []

    def doc_to_text(doc, previous_output=None, round_idx=None, previous_round_info=None):
        seen.append((list(previous_output), round_idx, previous_round_info))
        if round_idx == 2:
            return None, None, True, previous_output, None
        return _doc_to_visual(doc), doc["question"] + " ?", False, previous_output, {"round": round_idx}

    gen_kwargs = {"max_new_tokens": 2, "suppress_tokens": SPECIALS}
    args = (docs[0]["question"], gen_kwargs, _doc_to_visual, doc_to_text, 0, "tiny", "test")
    req = _requests("generate_until_multi_round", [args])
    (rounds,) = plugin.generate_until_multi_round(req)
    first = plugin.generate_until(_generate_requests(gen_kwargs))[0]
    assert len(rounds) == 2 and rounds[0] == first and all(len(r.split()) == 2 for r in rounds)
    assert [s[1] for s in seen] == [1, 2] and seen[1][2] == {"round": 1} and seen[1][0] == rounds


def test_model_args(model_dir, tmp_path):
    dense = tiny_llava(num_layers=4)
    dense.save_pretrained(tmp_path / "dense")
    tiny_llava_processor(dense, WORDS).save_pretrained(tmp_path / "dense")
    args = f"pretrained={tmp_path / 'dense'},schedule=[1.0,0.4,1.0,0.2],device=cpu"
    lm = PMod.create_from_arg_string(args, {"batch_size": 2})
    assert lm.model.pmod.layer_ratios == [1.0, 0.4, 1.0, 0.2] and lm.batch_size == 2
    baseline = PMod.create_from_arg_string(f"pretrained={tmp_path / 'dense'},dense=True,device=cpu")
    assert not hasattr(baseline.model, "routing")
    baseline.task_dict = {"tiny": {"test": _docs()}}
    assert len(baseline.generate_until(_generate_requests({"max_new_tokens": 1}))) == 5
    assert baseline.efficiency["flops_ratio"] is None
    with pytest.raises(pmod.PModConfigError, match="unknown model_args"):
        PMod(pretrained=str(model_dir), device="cpu", shedule="constant")
    with pytest.raises(pmod.PModConfigError, match="already a p-MoD checkpoint"):
        PMod(pretrained=str(model_dir), device="cpu", average_ratio=0.3)
    with pytest.raises(pmod.PModConfigError, match="batch_size"):
        PMod(pretrained=str(model_dir), device="cpu", batch_size="auto")


def test_lmms_eval_command_line(model_dir, tmp_path):
    # The task folder with answers set so that the expected score is known: the first three are the
    # answers pmod.evaluate gives, the last two cannot be produced (two words where the task allows three).
    task = tmp_path / "task"
    shutil.copytree(TASK_DIR, task, ignore=shutil.ignore_patterns("__pycache__"))
    docs = _docs()
    model = pmod.load_model(model_dir).eval()
    processor = AutoProcessor.from_pretrained(model_dir)
    predictions = [r.prediction for r in evaluate(model, processor, _records(docs), TASK_DIR, batch_size=5,
                                                  max_new_tokens=3, suppress_tokens=SPECIALS, progress=False).records]
    for i, d in enumerate(docs):
        d["answer"] = predictions[i] if i < 3 else "two words"
    (task / "tiny_vqa.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"),
           "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    out = tmp_path / "out"
    argv = ["lmms-eval", "eval", "--model", "pmod", "--model_args", f"pretrained={model_dir},device=cpu",
            "--tasks", "pmod_tiny_vqa", "--include_path", str(task), "--batch_size", "2", "--output_path", str(out),
            "--log_samples"]
    # lmms-eval's own command line (`lmms-eval eval ...`), except that its ~340 built-in task folders are not
    # indexed (5 s on this CPU; only the local task is used): TaskManager's include_defaults defaults to False.
    script = "\n".join([
        "import inspect, sys",
        "from lmms_eval.tasks import TaskManager",
        "names = list(inspect.signature(TaskManager.__init__).parameters)",
        "defaults = list(TaskManager.__init__.__defaults__)",
        "defaults[names.index('include_defaults') - len(names) + len(defaults)] = False",
        "TaskManager.__init__.__defaults__ = tuple(defaults)",
        "from lmms_eval.cli.dispatch import main",
        f"sys.argv = {argv!r}",
        "main()",
    ])
    run = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300, check=False)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    (results_file,) = out.rglob("*_results.json")
    results = json.loads(results_file.read_text())
    assert results["results"]["pmod_tiny_vqa"]["exact_match,none"] == pytest.approx(0.6)
    assert results["n-samples"]["pmod_tiny_vqa"]["effective"] == 5
    throughput = results["throughput"]
    assert 0 < throughput["avg_pmod_flops_ratio"] < 1 and 0 < throughput["avg_pmod_kv_ratio"] < 1
    assert throughput["avg_pmod_flops_ratio/pmod_tiny_vqa"] == throughput["avg_pmod_flops_ratio"]
    (samples_file,) = out.rglob("*_samples_pmod_tiny_vqa.jsonl")
    samples = sorted((json.loads(line) for line in samples_file.read_text().splitlines()), key=lambda s: s["doc_id"])
    assert [s["filtered_resps"] for s in samples] == predictions
    expected = [float(exact_match(p, d["answer"])) for p, d in zip(predictions, docs)]
    assert [s["exact_match"] for s in samples] == expected


def test_qwen2_vl_through_the_plugin_equals_evaluate(tmp_path):
    """A Qwen2-VL model with its own processor and ChatML template (loaded without torchvision)."""
    from pmod.tiny import tiny_qwen2_vl, tiny_qwen2_vl_processor

    model = pmod.apply_pmod(tiny_qwen2_vl(patch_size=7), pmod.PModConfig(schedule=SCHEDULE))
    randomize_routers(model)
    words = "user assistant what is in the image ? a red blue green circle square yes no".split()
    words += [f"w{i}" for i in range(128 - 4 - 5 - len(words))]  # every id decodes to a word
    model.save_pretrained(tmp_path)
    tiny_qwen2_vl_processor(model, words, image_size=28).save_pretrained(tmp_path)
    lm = PMod(pretrained=str(tmp_path), device="cpu", batch_size=3)
    lm.task_dict = {"tiny": {"test": _docs()}}
    suppress = [0, 1, 2, 3, 4]  # <pad> <unk> <s> <|im_end|> <|im_start|>
    answers = lm.generate_until(_generate_requests({"max_new_tokens": 3, "suppress_tokens": suppress}))
    expected = evaluate(pmod.load_model(tmp_path).eval(), lm.processor, _records(_docs()), TASK_DIR, batch_size=2,
                        max_new_tokens=3, suppress_tokens=suppress, progress=False)
    assert answers == [r.prediction for r in expected.records] and all(len(a.split()) == 3 for a in answers)
    assert lm.efficiency["flops_ratio"] == pytest.approx(expected.flops_ratio) and expected.flops_ratio < 1.0
