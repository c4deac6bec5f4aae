"""pmod.pipelines.evaluate: answer normalisation and scores, batched evaluation, resuming, and the `pmod eval`
command."""

import json
import logging

import pytest
from PIL import Image

import pmod
import pmod.pipelines.evaluate as ev
from pmod.cli import build_parser
from pmod.errors import PModInputError
from pmod.pipelines.evaluate import evaluate, exact_match, load_records, normalize_answer, vqa_score
from pmod.tiny import randomize_routers, tiny_llava, tiny_llava_processor
from tests.helpers.words import SPECIALS, WORDS


@pytest.mark.parametrize(
    "raw, normalized",
    [
        ("Two dogs.", "2 dogs"),
        ("the cat", "cat"),
        ("An apple", "apple"),
        ("none", "0"),
        ("ten", "10"),
        ("eleven", "eleven"),
        ("1,000", "1000"),
        ("3.5 m", "3.5 m"),
        ("yes/no", "yes no"),
        ("red-and-white bus!", "red and white bus"),
        ("Yes, it is", "yes it is"),
        ("dont", "don't"),
        ("isnt", "isn't"),
        ("couldnt've", "couldn't've"),
        ("its", "its"),  # a word in its own right, not "it's"
        ("well", "well"),
        ("  Tab\tand\nnewline ", "tab and newline"),
        ("(hello)", "hello"),
    ],
)
def test_normalize_answer(raw, normalized):
    assert normalize_answer(raw) == normalized


# Answers as models and annotators write them, with every rule of the normalisation exercised.
ANSWERS = [
    "It's red!", "Two dogs.", "The cat", "isnt", "yes/no", "1,000", "3.5", "Dr. Who?", "a, b, c", "what's up",
    "He's", "dogs'", "it's 5 o'clock", "None", "ten.", "can't", "cant", "Its", "there's a man's hat", "y'all",
    "0.5 kg", "hi,there", "don't-stop", "(a) yes", "A", "", "Yes.", "no", "The man's dog is brown.", "left side",
    "2:30", "$5.00", "50%", "#1", "e-mail", "U.S.A.", "Mt. Fuji", "3 people", "three people", "an apple a day",
    "wouldnt", "youre", "hes", "theyre", "whats", "wont", "doesnt", "Yes, it is", "red-and-white bus!",
    "  Tab\tand\nnewline ", "(hello)", "couldnt've", "well", "we're", "were", "i'm", "Im", "I am", "it is 10:00",
]


def test_normalize_answer_agrees_with_lmms_eval():
    """The same answers get the same normal form as lmms-eval's EvalAIAnswerProcessor gives them (its VQA tasks),
    but for the documented contraction-table differences."""
    processor = pytest.importorskip("lmms_eval.tasks._task_utils.vqa_eval_metric").EvalAIAnswerProcessor()
    for answer in ANSWERS:
        assert normalize_answer(answer) == processor(answer), answer
    # where the tables differ: pmod restores every apostrophe-less spelling; lmms-eval maps "somebody'd" to
    # "somebodyd" and lacks "shes"
    assert (normalize_answer("shes"), processor("shes")) == ("she's", "shes")
    assert (normalize_answer("somebody'd"), processor("somebody'd")) == ("somebody'd", "somebodyd")


def test_exact_match():
    assert exact_match("Two.", "2")
    assert exact_match("The Cat", "cat")
    assert exact_match("A.", "A")  # option letters survive although "a" is an article
    assert not exact_match("", "A")
    assert not exact_match("B", "A")
    assert not exact_match("the answer is yes", "yes")


def test_vqa_score():
    def ten(k):
        return ["cat"] * k + ["dog"] * (10 - k)

    assert vqa_score("cat", ten(0)) == 0.0
    assert vqa_score("cat", ten(1)) == pytest.approx(0.3)
    assert vqa_score("cat", ten(2)) == pytest.approx(0.6)
    assert vqa_score("cat", ten(3)) == pytest.approx(0.9)
    assert vqa_score("cat", ten(4)) == 1.0
    assert vqa_score("The cat.", ten(10)) == 1.0  # normalised before matching
    assert vqa_score("two", ["2"]) == 1.0 and vqa_score("3", ["2"]) == 0.0
    with pytest.raises(pmod.PModInputError):
        vqa_score("cat", [])


def _record(rid, question, answer, image=None, answers=None):
    value = ("<image>\n" if image else "") + question
    rec = {"id": rid, "conversations": [{"from": "human", "value": value}, {"from": "gpt", "value": answer}]}
    if image:
        rec["image"] = image
    if answers:
        rec["answers"] = answers
    return rec


def test_metrics_from_hand_made_predictions(tmp_path):
    """Resuming from a complete predictions file generates nothing: the metrics come from those predictions."""
    records = [
        _record("a", "what colour ?", "red", answers=["red"] * 3 + ["pink"] * 7),
        _record("b", "how many ?", "2", answers=["2"] * 10),
        _record("c", "is it ?", "yes"),
        _record("d", "which one ?", "B"),
    ]
    preds = {"a": "Red.", "b": "three", "c": "Yes", "d": "A"}
    path = tmp_path / "preds.jsonl"
    path.write_text("".join(json.dumps({"id": k, "prediction": v}) + "\n" for k, v in preds.items()))
    result = evaluate(None, None, records, predictions_path=path, metrics_path=tmp_path / "m.json", resume=True,
                      progress=False)
    assert [r.correct for r in result.records] == [True, False, True, False]
    assert result.accuracy == 0.5 and result.n == 4 and result.resumed == 4
    assert result.vqa_accuracy == pytest.approx((0.9 + 0.0) / 2) and result.n_vqa == 2
    assert result.flops_ratio is None and result.kv_ratio is None
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert metrics["accuracy"] == 0.5 and metrics["vqa_accuracy"] == pytest.approx(0.45) and "records" not in metrics


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("eval")
    model = pmod.apply_pmod(tiny_llava(num_layers=4), pmod.PModConfig(schedule=[1.0, 0.5, 0.3, 0.6]))
    randomize_routers(model)
    for name, colour in {"red": (200, 20, 20), "blue": (20, 20, 200), "green": (20, 200, 20)}.items():
        Image.new("RGB", (40, 30), colour).save(folder / f"{name}.png")
    records = [
        _record("r1", "what is in the image ?", "a red square", "red.png", ["red"] * 4 + ["square"] * 6),
        _record("t1", "is a circle a square ?", "no"),
        _record("r2", "is it red ?", "no", "green.png"),
        _record("r3", "what ?", "blue", "blue.png", ["blue"] * 10),
        _record("t2", "what is red ?", "a circle"),
        _record("r4", "is it green or blue or red ?", "red", "red.png"),
    ]
    return model, tiny_llava_processor(model, WORDS), records, folder


def _run(tiny, **kwargs):
    model, processor, records, folder = tiny
    kwargs = {"max_new_tokens": 3, "suppress_tokens": SPECIALS, "progress": False, **kwargs}
    return evaluate(model, processor, kwargs.pop("records", records), folder, **kwargs)


def test_batched_equals_one_by_one(tiny):
    batched, single = _run(tiny, batch_size=4), _run(tiny, batch_size=1)
    preds = [r.prediction for r in batched.records]
    assert preds == [r.prediction for r in single.records]
    assert all(len(p.split()) == 3 for p in preds)
    # The realised cost of an example does not depend on what it was batched with.
    for a, b in zip(batched.records, single.records):
        assert a.flops_ratio == pytest.approx(b.flops_ratio) and a.kv_ratio == b.kv_ratio
    by_id = {r.id: r for r in batched.records}
    assert by_id["t1"].kv_ratio == 1.0 and by_id["r1"].kv_ratio < 1.0  # text-only rows have no vision tokens
    assert 0 < batched.flops_ratio < 1 and 0 < batched.kv_ratio < 1 and 0 < batched.kv_cache_ratio < 1
    assert batched.accuracy == sum(exact_match(r.prediction, r.answer) for r in batched.records) / 6
    vqa = [vqa_score(r.prediction, r.answers) for r in batched.records if r.answers]
    assert batched.vqa_accuracy == pytest.approx(sum(vqa) / 2)


def test_text_only_records_and_dense_model(tiny):
    _, processor, records, _ = tiny
    text_only = [r for r in records if "image" not in r]
    dense = tiny_llava(num_layers=4)
    result = evaluate(dense, processor, text_only, None, batch_size=2, max_new_tokens=2, progress=False)
    assert result.n == 2 and all(r.prediction is not None for r in result.records)
    assert result.flops_ratio is None and result.kv_cache_ratio is None  # nothing skipped in a dense model
    routed = _run(tiny, records=text_only, batch_size=2)
    assert routed.kv_ratio == 1.0


def _count_prompts(monkeypatch) -> list[str]:
    """The prompts evaluate() generates answers for, from now on."""
    asked = []
    real = ev.generate_batch

    def counting(model, processor, prompts, *args, **kwargs):
        asked.extend(prompts)
        return real(model, processor, prompts, *args, **kwargs)

    monkeypatch.setattr(ev, "generate_batch", counting)
    return asked


def test_resume_skips_done_ids(tiny, tmp_path, monkeypatch):
    path = tmp_path / "preds.jsonl"
    full = _run(tiny, batch_size=1, predictions_path=path)
    lines = path.read_text().splitlines()
    assert [json.loads(line)["id"] for line in lines] == ["r1", "t1", "r2", "r3", "t2", "r4"]
    assert set(json.loads(lines[0])) >= {"id", "question", "prediction", "answer", "correct", "flops_ratio", "kv_ratio"}
    # A run killed while writing its third line.
    path.write_text("\n".join(lines[:2]) + "\n" + lines[2][:17])
    asked = _count_prompts(monkeypatch)
    resumed = _run(tiny, batch_size=1, predictions_path=path, resume=True)
    assert len(asked) == 4 and resumed.resumed == 2
    assert [r.prediction for r in resumed.records] == [r.prediction for r in full.records]
    ignore = {"seconds", "resumed"}
    metrics = {k: v for k, v in resumed.to_dict().items() if k not in ignore}
    assert metrics == {k: v for k, v in full.to_dict().items() if k not in ignore}
    ids = [json.loads(line)["id"] for line in path.read_text().splitlines()]
    assert sorted(ids) == sorted(["r1", "t1", "r2", "r3", "t2", "r4"])
    # Without resume the file is replaced.
    _run(tiny, records=tiny[2][:1], predictions_path=path)
    assert len(path.read_text().splitlines()) == 1


def test_input_errors(tiny, tmp_path, monkeypatch):
    model, processor, records, folder = tiny
    monkeypatch.setattr(ev, "generate_batch", lambda *a, **k: pytest.fail("generated before checking the inputs"))
    missing = records[:2] + [_record("x", "what ?", "red", "nowhere/missing.png")]
    with pytest.raises(pmod.PModInputError, match=r"record 'x': image file not found: .*nowhere/missing\.png"):
        evaluate(model, processor, missing, folder, progress=False)
    with pytest.raises(pmod.PModInputError, match="appears twice"):
        evaluate(model, processor, records[:2] + records[:1], folder, progress=False)
    with pytest.raises(pmod.PModInputError, match="'answers' must be a non-empty list"):
        evaluate(model, processor, [_record("y", "q", "a", answers=["a", 3])], folder, progress=False)
    with pytest.raises(pmod.PModInputError, match="last turn must be the reference answer"):
        evaluate(model, processor, [{"id": 1, "conversations": [{"from": "human", "value": "q"}]}], folder,
                 progress=False)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(pmod.PModInputError, match="not valid JSON"):
        load_records(bad)
    with pytest.raises(pmod.PModInputError, match="data file not found"):
        load_records(tmp_path / "none.json")
    lines = tmp_path / "data.jsonl"
    lines.write_text("".join(json.dumps(r) + "\n" for r in records))
    assert load_records(lines) == records


def test_eval_command(tiny, tmp_path, capsys):
    model, processor, records, folder = tiny
    model.save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")
    data = folder / "data.json"
    data.write_text(json.dumps(records))
    parser = build_parser()
    out = tmp_path / "out"
    args = parser.parse_args(
        ["eval", str(tmp_path / "model"), "--data", str(data), "--out", str(out), "--batch-size", "4", "--limit", "5",
         "--max-new-tokens", "3", "--no-progress"]
    )
    assert args.image_folder is None  # defaults to the data file's folder
    assert args.func(args) == 0
    stdout = capsys.readouterr().out
    assert "accuracy" in stdout and "prefill FLOPs" in stdout and "predictions.jsonl" in stdout
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n"] == 5 and metrics["model"] == str(tmp_path / "model") and 0 < metrics["flops_ratio"] < 1
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == ["r1", "t1", "r2", "r3", "t2"]
    expected = evaluate(pmod.load_model(tmp_path / "model").eval(), processor, records[:5], folder, batch_size=1,
                        max_new_tokens=3, progress=False)
    assert [r["prediction"] for r in rows] == [r.prediction for r in expected.records]
    with pytest.raises(SystemExit):
        parser.parse_args(["eval", str(tmp_path / "model"), "--data", str(data), "--batch-size", "0"])
    # a second run into the same folder neither overwrites nor mixes silently
    again = ["eval", str(tmp_path / "model"), "--data", str(data), "--out", str(out), "--limit", "2",
             "--max-new-tokens", "3", "--no-progress"]
    with pytest.raises(PModInputError, match="holds an earlier evaluation .*--resume .*--force"):
        args = parser.parse_args(again)
        args.func(args)
    assert len((out / "predictions.jsonl").read_text().splitlines()) == 5  # untouched
    with pytest.raises(PModInputError, match="pass one"):
        args = parser.parse_args([*again, "--resume", "--force"])
        args.func(args)
    args = parser.parse_args([*again, "--force"])
    assert args.func(args) == 0 and len((out / "predictions.jsonl").read_text().splitlines()) == 2


def test_resume_answers_rows_without_a_prediction_again_and_refuses_foreign_files(tiny, tmp_path, monkeypatch):
    """Rows whose prediction is missing or not text are not answered; a file that is not pmod's predictions (not
    UTF-8, or garbage before its last line) is refused and left as it was."""
    model, processor, records, folder = tiny
    path = tmp_path / "preds.jsonl"
    full = _run(tiny, records=records[:3], batch_size=3, predictions_path=path)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    rows[0].pop("prediction")  # missing: used to be scored as ""
    rows[1]["prediction"] = None  # null: used to be scored as "None"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    asked = _count_prompts(monkeypatch)
    resumed = _run(tiny, records=records[:3], batch_size=3, predictions_path=path, resume=True)
    assert len(asked) == 2 and resumed.resumed == 1
    assert [r.prediction for r in resumed.records] == [r.prediction for r in full.records]
    again = _run(tiny, records=records[:3], batch_size=3, predictions_path=path, resume=True)
    assert again.resumed == 3 and len(asked) == 2  # the re-answered rows now count

    foreign = tmp_path / "foreign.jsonl"
    for content in (b"\xff\xfe caf\xe9\n",
                    b"id,prediction\nr1,red\n" + json.dumps({"id": "t1", "prediction": "x"}).encode()):
        foreign.write_bytes(content)
        with pytest.raises(pmod.PModInputError, match="not a pmod eval predictions"):
            _run(tiny, records=records[:3], predictions_path=foreign, resume=True)
        assert foreign.read_bytes() == content


def test_a_truncated_image_is_named(tiny, tmp_path, monkeypatch):
    from PIL import ImageFile

    # importing lmms_eval (another test here does) turns on PIL's loading of truncated images, process-wide
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", False)
    model, processor, records, folder = tiny
    whole = (folder / "red.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(whole[: len(whole) // 2])
    record = _record("cut", "what ?", "red", "cut.png")
    with pytest.raises(pmod.PModInputError, match=r"Cannot read image .*cut\.png"):
        evaluate(model, processor, [record], tmp_path, max_new_tokens=2, progress=False)


def test_resume_refuses_predictions_of_other_records_models_or_settings(tiny, tmp_path, monkeypatch):
    """`pmod eval --resume` with other data under the same ids used to score the old answers against the new ones
    (and name the new data in metrics.json): rows now carry what was asked and what answered, and a resume that does
    not match is refused before anything is generated; so is a file with two predictions for one id."""
    model, processor, records, folder = tiny
    path = tmp_path / "preds.jsonl"
    _run(tiny, records=records[:3], batch_size=3, predictions_path=path)
    written = path.read_text()
    assert all({"record_sha", "run_sha"} <= set(json.loads(line)) for line in written.splitlines())
    asked = _count_prompts(monkeypatch)
    other = [dict(r) for r in records[:3]]
    other[1] = _record("t1", "is a square a circle ?", "yes")  # same id, another question and answer
    with pytest.raises(pmod.PModInputError, match=r"ids \['t1'\] .* answer other questions"):
        _run(tiny, records=other, predictions_path=path, resume=True)
    with pytest.raises(pmod.PModInputError, match="another model or other generation settings"):
        _run(tiny, records=records[:3], predictions_path=path, resume=True, max_new_tokens=4)
    retrained = pmod.apply_pmod(tiny_llava(num_layers=4, seed=1), pmod.PModConfig(schedule=[1.0, 0.5, 0.3, 0.6]))
    with pytest.raises(pmod.PModInputError, match="another model"):
        evaluate(retrained, processor, records[:3], folder, max_new_tokens=3, suppress_tokens=SPECIALS, progress=False,
                 predictions_path=path, resume=True)
    assert asked == [] and path.read_text() == written
    same = _run(tiny, records=records[:3], predictions_path=path, resume=True)  # the same run resumes as before
    assert same.resumed == 3 and asked == []
    path.write_text(written + written.splitlines()[0] + "\n")
    with pytest.raises(pmod.PModInputError, match="a second prediction for id 'r1'"):
        _run(tiny, records=records[:3], predictions_path=path, resume=True)


def test_all_empty_or_identical_predictions_are_warned_about(tmp_path, caplog):
    """A 20-step model answered nothing (accuracy 0.00%, every prediction empty) and looked like success."""
    records = [_record(str(i), "what ?", "red") for i in range(4)]
    for preds, said in (({str(i): "" for i in range(4)}, "is empty"),
                        ({str(i): "one" for i in range(4)}, "same answer")):
        path = tmp_path / "preds.jsonl"
        path.write_text("".join(json.dumps({"id": k, "prediction": v}) + "\n" for k, v in preds.items()))
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="pmod.pipelines.evaluate"):
            evaluate(None, None, records, predictions_path=path, resume=True, progress=False)
        assert any(said in r.message and "answers nothing useful" in r.message for r in caplog.records)


def test_record_keys_are_carried_and_groups_scored(tiny, tmp_path):
    """A record's own keys (a question type, a source) reach predictions.jsonl as given; group_by scores each value of
    one apart, records without it under "(none)"; a key no record has is refused."""
    model, processor, records, folder = tiny
    typed = [{**r, "type": "colour" if r["id"].startswith("r") else "text", "source": {"set": "mine"}}
             for r in records[:5]]
    typed.append(records[5])  # no type
    preds = tmp_path / "p.jsonl"
    result = _run(tiny, records=typed, batch_size=3, group_by="type", predictions_path=preds)
    rows = [json.loads(line) for line in preds.read_text().splitlines()]
    assert rows[0]["fields"] == {"type": "colour", "source": {"set": "mine"}} and "fields" not in rows[5]
    assert set(result.groups) == {"colour", "text", "(none)"}
    assert [result.groups[k]["n"] for k in ("colour", "text", "(none)")] == [3, 2, 1]
    colour = [r for r, rec in zip(result.records, typed) if rec.get("type") == "colour"]
    assert result.groups["colour"]["accuracy"] == sum(r.correct for r in colour) / 3
    assert "type=colour: accuracy" in result.summary() and result.to_dict()["group_by"] == "type"
    assert "groups" not in _run(tiny, records=typed[:2]).to_dict()
    with pytest.raises(PModInputError, match="group_by='kind': no record has that key"):
        _run(tiny, records=typed, group_by="kind")


def test_words_outside_a_word_level_vocabulary_are_warned_about(monkeypatch, caplog):
    """A tiny model's vocabulary is its training file's words: a question word first seen at evaluation silently
    became <unk>, and an answer word the tokenizer lacks can never be predicted. Both are named before generating."""
    from pmod.data.conversation import VICUNA_V1_TEMPLATE
    from pmod.tiny import word_tokenizer

    tok = word_tokenizer(["what", "colour", "?", "red", "blue"], vocab_size=32)
    tok.chat_template = VICUNA_V1_TEMPLATE
    records = [_record("a", "what colour ?", "red"), _record("b", "what hue ?", "teal", answers=["teal", "blue"])]

    class Generated(Exception):
        pass

    def generate_batch(*args, **kwargs):  # the warning comes before anything is generated
        raise Generated

    monkeypatch.setattr(ev, "generate_batch", generate_batch)
    with caplog.at_level(logging.WARNING, logger="pmod.pipelines.evaluate"), pytest.raises(Generated):
        evaluate(None, tok, records, progress=False)
    said = [r.message for r in caplog.records]
    assert any("1 question word(s)" in m and "'hue'" in m and "unknown token" in m for m in said), said
    assert any("1 answer word(s)" in m and "'teal'" in m and "never be predicted" in m for m in said), said
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="pmod.pipelines.evaluate"):
        ev._unknown_words(tok, ev._prepare(records[:1], None))
    assert not caplog.records  # every word known: nothing said
