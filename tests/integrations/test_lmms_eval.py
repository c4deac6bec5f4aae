"""The lmms-eval model `pmod`: entry point, generate_until / loglikelihood against pmod.pipelines.evaluate and a manual
computation, video documents and chat messages against pmod.pipelines.generation.generate_batch, and command-line runs
(offline) on the local tasks in tests/fixtures/lmms_eval_task (images) and tests/fixtures/lmms_eval_video_task (videos,
chat messages)."""

import importlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoProcessor

import pmod
import pmod.data.video
from pmod.data.conversation import render, to_messages
from pmod.data.records import Encoder
from pmod.loading import load_processor
from pmod.pipelines.evaluate import evaluate, exact_match
from pmod.pipelines.generation import generate_batch
from pmod.tiny import (
    randomize_routers,
    tiny_llava,
    tiny_llava_onevision,
    tiny_llava_onevision_processor,
    tiny_llava_processor,
    tiny_qwen2_vl,
    tiny_qwen2_vl_processor,
)
from tests.helpers.videos import COLOURS, frame_index, write_clip, write_frames
from tests.helpers.words import SPECIALS, WORDS

# lmms-eval is installed by `make setup` (without its requirements); the guard only serves a bare environment.
Instance = pytest.importorskip("lmms_eval.api.instance").Instance
plugin_module = importlib.import_module("pmod.integrations.lmms_eval_plugin")
PMod, PModChat = plugin_module.PMod, plugin_module.PModChat

TASK_DIR = Path(__file__).parents[1] / "fixtures" / "lmms_eval_task"
VIDEO_DIR = Path(__file__).parents[1] / "fixtures" / "lmms_eval_video_task"
SCHEDULE = [1.0, 0.5, 0.3, 0.6]
# the tiny video models' words: ChatML roles, the video tasks' words, then fillers so that every id decodes to a word
VIDEO_WORDS = ("user assistant system what colour is the circle ? does it move same look at and answer in one word "
               "a red blue green yes no").split()
VIDEO_WORDS += [f"w{i}" for i in range(128 - 4 - 5 - len(VIDEO_WORDS))]
CHATML_SPECIALS = [0, 1, 2, 3, 4]  # <pad> <unk> <s> <|im_end|> <|im_start|>
VIDEO_GEN = {"until": ["\n\n"], "max_new_tokens": 3, "suppress_tokens": CHATML_SPECIALS, "do_sample": False}


def _docs():
    return [json.loads(line) for line in (TASK_DIR / "tiny_vqa.jsonl").read_text().splitlines()]


def _doc_to_visual(doc):
    return [Image.open(TASK_DIR / doc["image"]).convert("RGB")] if doc["image"] else []


def _records(docs):
    """The task's documents as LLaVA records, for pmod.pipelines.evaluate."""
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


def _requests(kind, args_per_doc, metadata=None):
    return [
        Instance(request_type=kind, arguments=args, idx=0,
                 metadata={"task": "tiny", "doc_id": i, "repeats": 1, **(metadata or {})})
        for i, args in enumerate(args_per_doc)
    ]


def _generate_requests(gen_kwargs):
    args = [(d["question"], gen_kwargs, _doc_to_visual, i, "tiny", "test") for i, d in enumerate(_docs())]
    return _requests("generate_until", args)


def test_entry_point_registers_pmod():
    from lmms_eval.models import get_model

    assert get_model("pmod") is PModChat and not PModChat.is_simple  # lmms-eval's default: the chat class
    assert get_model("pmod", force_simple=True) is PMod and PMod.is_simple


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


def test_task_generation_settings(plugin):
    """A task's gen_kwargs as generate_batch arguments: until strings are stop strings, sampling only with a
    temperature, unknown settings dropped; the request's own dict is left as it was."""
    gen = {"until": "\n", "temperature": 0.7, "top_p": 0.9, "image_aspect_ratio": "pad"}
    assert plugin._generate_kwargs(gen) == {"stop": ["\n"], "temperature": 0.7, "top_p": 0.9, "do_sample": True,
                                            "max_new_tokens": 128}
    assert plugin._generate_kwargs({"until": ["", "</s>"], "max_new_tokens": "4"}) == {
        "stop": ["</s>"], "max_new_tokens": 4, "do_sample": False}
    assert gen["until"] == "\n" and "image_aspect_ratio" in gen
    with pytest.raises(pmod.PModInputError, match="'until' must be a string or a list, got int"):
        plugin._generate_kwargs({"until": 0})


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


def _lmms_eval(model_dir, task_dir, tasks, tmp_path, *extra):
    """Run lmms-eval's command line (offline) on local tasks; returns the results and each task's logged samples."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"),
           "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    out = tmp_path / "out"
    argv = ["lmms-eval", "eval", "--model", "pmod", "--model_args", f"pretrained={model_dir},device=cpu",
            "--tasks", ",".join(tasks), "--include_path", str(task_dir), "--batch_size", "2", "--output_path", str(out),
            "--log_samples", *extra]
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
    samples = {}
    for task in tasks:
        (samples_file,) = out.rglob(f"*_samples_{task}.jsonl")
        lines = samples_file.read_text().splitlines()
        samples[task] = sorted((json.loads(line) for line in lines), key=lambda s: s["doc_id"])
    return json.loads(results_file.read_text()), samples


def test_lmms_eval_command_line(model_dir, tmp_path):
    """An image task (doc_to_visual / doc_to_text) through the simple class (--force_simple)."""
    # The task folder with answers set so that the expected score is known: the first three are the
    # answers pmod.pipelines.evaluate gives, the last two cannot be produced (two words where the task allows three).
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

    results, samples = _lmms_eval(model_dir, task, ["pmod_tiny_vqa"], tmp_path, "--force_simple")
    samples = samples["pmod_tiny_vqa"]
    assert results["results"]["pmod_tiny_vqa"]["exact_match,none"] == pytest.approx(0.6)
    assert results["n-samples"]["pmod_tiny_vqa"]["effective"] == 5
    throughput = results["throughput"]
    assert 0 < throughput["avg_pmod_flops_ratio"] < 1 and 0 < throughput["avg_pmod_kv_ratio"] < 1
    assert throughput["avg_pmod_flops_ratio/pmod_tiny_vqa"] == throughput["avg_pmod_flops_ratio"]
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


# ---------------------------------------------------------------------------------------------- video and chat
def _video_docs():
    return [json.loads(line) for line in (VIDEO_DIR / "tiny_video.jsonl").read_text().splitlines()]


def _frames(folder):
    return [Image.open(f).convert("RGB") for f in sorted(folder.glob("*.png"), key=lambda f: int(f.stem))]


def _doc_to_video(doc):
    """The video task's visuals: an image file (some documents), then the video as a frame folder."""
    return ([str(VIDEO_DIR / doc["image"])] if doc["image"] else []) + [str(VIDEO_DIR / doc["video"])]


def _video_row(doc, frames=None):
    """A video document's question as pmod chat messages, its images and its videos (as _doc_to_video gives)."""
    image = [Image.open(VIDEO_DIR / doc["image"]).convert("RGB")] if doc["image"] else []
    content = [{"type": "image"}] * len(image) + [{"type": "video"}, {"type": "text", "text": doc["question"]}]
    return [{"role": "user", "content": content}], image, [frames or _frames(VIDEO_DIR / doc["video"])]


def _chat_row(doc):
    """The messages the pmod_tiny_chat task gives (tests/data/lmms_eval_video_task/utils.py), written out here."""
    image = [Image.open(VIDEO_DIR / doc["image"]).convert("RGB")] if doc["image"] else []
    messages = [{"role": "system", "content": [{"type": "text", "text": "answer in one word"}]}]
    if doc["question_id"] == 3:
        messages += [{"role": "user", "content": [{"type": "text", "text": "what is a circle ?"}]},
                     {"role": "assistant", "content": [{"type": "text", "text": "a colour"}]}]
    user = [{"type": "text", "text": "look at"}]
    user += [{"type": "image"}, {"type": "text", "text": "and"}] if image else []
    user += [{"type": "video"}, {"type": "text", "text": doc["question"]}]
    return messages + [{"role": "user", "content": user}], image, [_frames(VIDEO_DIR / doc["video"])]


def _expected(model_dir, rows, batch_size=None):
    """pmod.pipelines.generation.generate_batch's answers for (messages, images, videos) rows, rendered with the chat
    template."""
    model = pmod.load_model(model_dir).eval()
    processor = load_processor(model_dir, need_images=False)
    answers = []
    batch_size = batch_size or len(rows)
    for b in range(0, len(rows), batch_size):
        batch = rows[b : b + batch_size]
        out = generate_batch(model, processor, [render(processor, m, add_generation_prompt=True) for m, _, _ in batch],
                             [i for _, i, _ in batch], max_new_tokens=3, videos=[v for _, _, v in batch],
                             video_fps=[2.0] * len(batch), suppress_tokens=CHATML_SPECIALS)
        answers += out.texts
    return answers


def _sensitive(model):
    """Redraw the weight matrices (routers aside) larger than at initialisation, so that the tiny model's answers
    differ from document to document and a wrong frame, order or prompt shows in them."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, weight in model.named_parameters():
            if weight.dim() >= 2 and "router" not in name:
                weight.normal_(0, 0.1, generator=gen)
    randomize_routers(model)
    return model


@pytest.fixture(scope="module")
def video_model_dir(tmp_path_factory):
    """A tiny p-MoD Qwen2-VL with its processor (ChatML template, frame video processor)."""
    path = tmp_path_factory.mktemp("lmms-video") / "model"
    model = _sensitive(pmod.apply_pmod(tiny_qwen2_vl(patch_size=7), pmod.PModConfig(schedule=SCHEDULE)))
    model.save_pretrained(path)
    tiny_qwen2_vl_processor(model, VIDEO_WORDS, image_size=28).save_pretrained(path)
    return path


def _video_lm(cls, model_dir, **kwargs):
    lm = cls(pretrained=str(model_dir), device="cpu", batch_size=3, **kwargs)
    lm.task_dict = {"tiny": {"test": _video_docs()}}
    return lm


@pytest.fixture(scope="module")
def video_lm(video_model_dir):
    return _video_lm(PMod, video_model_dir, max_frames=3)


@pytest.fixture(scope="module")
def chat_lm(video_model_dir):
    return _video_lm(PModChat, video_model_dir)


def test_video_documents_equal_generate_batch(video_lm, video_model_dir):
    """Videos as a flat list of PIL frames (task metadata task_type: video), a list of frame files and a frame
    folder (with an image file first), sampled uniformly down to max_frames=3, through the simple path."""
    docs = _video_docs()
    red = _frames(VIDEO_DIR / "clips/red")  # 4 frames: frames 0, 1 and 2 are kept (i * 4 // 3)
    frame_files = [str(VIDEO_DIR / "clips/blue" / f"{i}.png") for i in range(4)]
    as_frames = _requests("generate_until", [(docs[0]["question"], VIDEO_GEN, lambda d: red, 0, "tiny", "test")],
                          metadata={"task_type": "video"})
    others = _requests("generate_until", [(docs[i]["question"], VIDEO_GEN, v, i, "tiny", "test") for i, v in
                                          [(1, lambda d: [frame_files]), (2, _doc_to_video)]])
    answers = video_lm.generate_until(as_frames + others)
    blue = _frames(VIDEO_DIR / "clips/blue")
    rows = [_video_row(docs[0], [red[0], red[1], red[2]]), _video_row(docs[1], [blue[0], blue[1], blue[2]]),
            _video_row(docs[2])]
    assert answers == _expected(video_model_dir, rows) and len(set(answers)) == 3
    assert video_lm.efficiency["flops_ratio"] < 1.0


def test_video_file_decoding_and_refusals(video_lm, chat_lm, plugin, monkeypatch, tmp_path):
    from transformers import video_utils

    clip = tmp_path / "clip.mp4"
    clip.write_bytes(b"\0")
    monkeypatch.setattr(pmod.data.video, "video_backend", lambda: None)
    with pytest.raises(pmod.PModInputError,
                       match=r"task 'tiny' document 0: cannot read the video file .*no video decoder"):
        video_lm._visual_prompt("q", [str(clip)], {}, "tiny", 0)

    def load_video(path, backend, sample_indices_fn):  # a 20-frame clip at 10 fps whose frames hold their index
        metadata = video_utils.VideoMetadata(total_num_frames=20, fps=10.0, width=28, height=28, duration=2.0)
        indices = sample_indices_fn(metadata=metadata)
        return np.stack([np.full((28, 28, 3), i, np.uint8) for i in indices]), metadata

    monkeypatch.setattr(pmod.data.video, "video_backend", lambda: "pyav")
    monkeypatch.setattr(video_utils, "load_video", load_video)
    prompt = video_lm._visual_prompt("q", [str(clip)], {"sample_frames": 4}, "tiny", 0)
    assert [f.getpixel((0, 0))[0] for f in prompt.videos[0]] == [0, 5, 10, 15] and prompt.fps == pytest.approx(2.0)
    window = [{"role": "user", "content": [{"type": "video", "url": str(clip), "start_time": 1.0, "end_time": 1.5},
                                           {"type": "text", "text": "q"}]}]
    prompt = chat_lm._messages_prompt(window, {"sample_frames": 3}, "tiny", 0)  # 3 of frames 10..15
    assert [f.getpixel((0, 0))[0] for f in prompt.videos[0]] == [10, 12, 14] and prompt.fps == pytest.approx(5.0)
    # a task's bad frame count or window is named, not a traceback from the sampler
    for metadata, bad in [({"sample_frames": -1}, "sample_frames must be a positive whole number, got -1"),
                          ({"sample_frames": "all"}, "sample_frames must be a positive whole number, got 'all'")]:
        with pytest.raises(pmod.PModInputError, match=f"task 'tiny' document 0: the task's metadata {bad}"):
            video_lm._visual_prompt("q", [str(clip)], metadata, "tiny", 0)
    for start in (float("nan"), "1s"):
        with pytest.raises(pmod.PModInputError, match="document 0: the video's start time must be a finite number"):
            video_lm._visual_prompt("q", [{"path": str(clip), "video_start": start}], {}, "tiny", 0)

    # a model without video support (LLaVA) refuses a video document, naming the task; audio is refused
    folder = str(VIDEO_DIR / "clips/red")
    video = _requests("generate_until", [("q", {"max_new_tokens": 1}, lambda d: [folder], 0, "tiny", "test")])
    with pytest.raises(pmod.PModInputError,
                       match=r"task 'tiny' document 0 has a video, but \w+ has no video processor"):
        plugin.generate_until(video)
    audio = _requests("generate_until", [("q", {"max_new_tokens": 1},
                                          lambda d: [{"array": [0.0], "sampling_rate": 16000}], 0, "tiny", "test")])
    with pytest.raises(pmod.PModInputError, match="task 'tiny' document 0 has audio"):
        plugin.generate_until(audio)


def _decoding_plugin(max_frames=32, video_fps=2.0):
    """A plugin with only its video settings (no model): enough for `_video`."""
    lm = PMod.__new__(PMod)
    lm.video_backend, lm.video_fps, lm.max_frames = None, video_fps, max_frames
    return lm


@pytest.mark.parametrize("container", ["avi", "mkv"])
def test_the_plugin_decodes_with_the_records_reader(container, tmp_path):
    """The plugin's video files go through pmod.data.video.load_video_file: Matroska / WebM (no frame count in the
    header) decode, and all of a clip's frames come out in order."""
    codec = {"avi": ("png", "rgb24"), "mkv": ("ffv1", "bgr0")}[container]
    path = tmp_path / write_clip(tmp_path, f"clip.{container}", *codec)
    frames, fps = _decoding_plugin()._video(plugin_module._Media("video", path), "task 't' document 0", max_frames=8)
    assert len(frames) == 8 and fps == pytest.approx(4.0)
    assert [f.getpixel((3, 3)) for f in frames] == COLOURS[:8]


@pytest.mark.parametrize("max_frames", [1, 2, 3, 5, 6, 7, 8])
def test_the_plugin_and_records_pick_the_same_frames(max_frames, tmp_path):
    """One sampling rule (pmod.data.video.sample_frame_indices) for training records, `pmod eval` and lmms-eval: the
    same video with the same settings gives the same frames at the same rate. The plugin takes every frame (no rate
    to sample at): a record at a rate no slower than its video's does too; frames given as images are at the record's
    fps, the plugin's video_fps. Fails if either path samples by a rule of its own again (lmms-eval's np.linspace
    keeps the last frame: 3 of 8 frames are 0, 3, 7 there, 0, 2, 5 here)."""
    write_clip(tmp_path)  # 8 frames at 4 fps
    write_frames(tmp_path, "frames", range(8))
    encoder = Encoder(tiny_qwen2_vl_processor(tiny_qwen2_vl(patch_size=7), VIDEO_WORDS, image_size=28), tmp_path)
    plugin = _decoding_plugin(max_frames=max_frames, video_fps=4.0)
    what = "task 't' document 0"
    for source, record_fps in (("clip.avi", 30.0), ("frames", 4.0)):
        (ours,), (our_rate,) = encoder.video_frames({"id": "v", "video": source, "fps": record_fps,
                                                     "max_frames": max_frames})
        theirs, their_rate = plugin._video(plugin_module._Media("video", tmp_path / source), what, max_frames)
        picked = [frame_index(f) for f in ours]
        assert picked == [frame_index(f) for f in theirs], source
        assert our_rate == pytest.approx(their_rate), source
        assert picked == [i * 8 // max_frames for i in range(max_frames)], source  # transformers' spread
    listed = [Image.new("RGB", (28, 28), c) for c in COLOURS]  # frames as PIL images, as lmms-eval's tasks give them
    frames, _ = plugin._video(plugin_module._Media("video", listed), what, max_frames)
    assert [frame_index(f) for f in frames] == picked


def test_llava_onevision_videos_of_different_lengths(tmp_path):
    """LLaVA-OneVision stacks the videos of a call: a batch with 4- and 3-frame videos runs in two groups."""
    model = _sensitive(pmod.apply_pmod(tiny_llava_onevision(), pmod.PModConfig(schedule=SCHEDULE)))
    model.save_pretrained(tmp_path)
    tiny_llava_onevision_processor(model, VIDEO_WORDS).save_pretrained(tmp_path)
    lm = PMod(pretrained=str(tmp_path), device="cpu", batch_size=4)
    docs = _video_docs()
    lm.task_dict = {"tiny": {"test": docs}}
    answers = lm.generate_until(_requests("generate_until",
                                          [(d["question"], VIDEO_GEN, _doc_to_video, i, "tiny", "test")
                                           for i, d in enumerate(docs)]))
    assert answers == _expected(tmp_path, [_video_row(d) for d in docs], batch_size=1) and len(set(answers)) > 1


def test_chat_messages_and_multi_round(chat_lm, video_model_dir):
    """doc_to_messages requests through the chat class (system turn, image and video interleaved with text, an
    earlier assistant turn), and the chat multi-round protocol."""
    spec = importlib.util.spec_from_file_location("pmod_tiny_chat_utils", VIDEO_DIR / "utils.py")
    task_utils = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(task_utils)
    doc_to_messages = task_utils.doc_to_messages  # the chat task's own function

    docs = _video_docs()
    reqs = _requests("generate_until", [("", doc_to_messages, VIDEO_GEN, i, "tiny", "test") for i in range(4)])
    answers = chat_lm.generate_until(reqs)
    assert answers == _expected(video_model_dir, [_chat_row(d) for d in docs]) and len(set(answers)) == 4

    def rounds(doc, round_idx=None, previous_output=None, previous_round_info=None):
        first = doc_to_messages(doc)
        if round_idx is None:
            return first
        if round_idx == 2:
            return None, True, previous_output, None
        follow = [{"role": "assistant", "content": [{"type": "text", "text": previous_output[-1]}]},
                  {"role": "user", "content": [{"type": "text", "text": "does the circle move ?"}]}]
        return first + follow, False, previous_output, {"round": round_idx}

    req = _requests("generate_until_multi_round", [("", rounds, VIDEO_GEN, 0, "tiny", "test")])
    (outputs,) = chat_lm.generate_until_multi_round(req)
    messages, images, videos = _chat_row(docs[0])
    follow = [{"role": "assistant", "content": [{"type": "text", "text": answers[0]}]},
              {"role": "user", "content": [{"type": "text", "text": "does the circle move ?"}]}]
    assert outputs == [answers[0], *_expected(video_model_dir, [(messages + follow, images, videos)])]


def test_video_and_chat_tasks_on_the_command_line(video_model_dir, tmp_path):
    """The local video task (doc_to_visual gives frame folders and image files; lmms-eval turns them into chat
    messages) and its doc_to_messages version through the default chat class: the answers are generate_batch's."""
    task = tmp_path / "task"
    shutil.copytree(VIDEO_DIR, task, ignore=shutil.ignore_patterns("__pycache__"))
    docs = _video_docs()
    expected = {"pmod_tiny_video": _expected(video_model_dir, [_video_row(d) for d in docs]),
                "pmod_tiny_chat": _expected(video_model_dir, [_chat_row(d) for d in docs])}
    results, samples = _lmms_eval(video_model_dir, task, list(expected), tmp_path)
    for name, answers in expected.items():
        assert [s["filtered_resps"] for s in samples[name]] == answers, name
        scores = [float(exact_match(a, d["answer"])) for a, d in zip(answers, docs)]
        assert [s["exact_match"] for s in samples[name]] == scores
        assert results["n-samples"][name]["effective"] == 4
        assert 0 < results["throughput"][f"avg_pmod_flops_ratio/{name}"] < 1


@pytest.mark.parametrize("family", ["gemma3", "qwen3_vl", "internvl", "idefics3", "smolvlm", "llava_next_video"])
def test_newer_families_through_the_plugin_equal_evaluate(family, tmp_path):
    """Families of the family table with their own processors (pmod's frame video processors where torchvision is
    missing): the plugin's answers and savings are pmod eval's."""
    from pmod import tiny

    build, processor_of = {
        "gemma3": (tiny.tiny_gemma3, tiny.tiny_gemma3_processor),
        "qwen3_vl": (lambda: tiny.tiny_qwen3_vl(patch_size=7), lambda m, w: tiny.tiny_qwen3_vl_processor(m, w)),
        "internvl": (tiny.tiny_internvl, lambda m, w: tiny.tiny_internvl_processor(m, w, tiles=False)),
        "idefics3": (lambda: tiny.tiny_smolvlm(version="idefics3"), tiny.tiny_idefics3_processor),
        "smolvlm": (tiny.tiny_smolvlm, tiny.tiny_smolvlm_processor),
        "llava_next_video": (tiny.tiny_llava_next_video, tiny.tiny_llava_next_video_processor),
    }[family]
    model = pmod.apply_pmod(build(), pmod.PModConfig(schedule=SCHEDULE))
    randomize_routers(model)
    words = "user assistant what is in the image ? a red blue green circle square yes no".split()
    words += [f"w{i}" for i in range(128 - 8 - 5 - len(words))]  # every id decodes to a word
    model.save_pretrained(tmp_path)
    processor_of(model, words).save_pretrained(tmp_path)
    lm = PMod(pretrained=str(tmp_path), device="cpu", batch_size=3)
    lm.task_dict = {"tiny": {"test": _docs()}}
    suppress = [0, 1, 2, 3, 4]  # <pad> <unk> <s> <|im_end|> <|im_start|>
    answers = lm.generate_until(_generate_requests({"max_new_tokens": 3, "suppress_tokens": suppress}))
    expected = evaluate(pmod.load_model(tmp_path).eval(), lm.processor, _records(_docs()), TASK_DIR, batch_size=2,
                        max_new_tokens=3, suppress_tokens=suppress, progress=False)
    assert answers == [r.prediction for r in expected.records] and any(answers)
    assert lm.efficiency["flops_ratio"] == pytest.approx(expected.flops_ratio) and expected.flops_ratio < 1.0
