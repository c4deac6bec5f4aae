"""`pmod serve` through the official openai client against a server on localhost (a tiny p-MoD LLaVA): answers equal
`pmod eval`'s, concurrent clients are batched and get their own answers, streaming, per-request limits inside one
batch, cancellation, and OpenAI-style errors."""

import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from PIL import Image

import pmod
from pmod.pipelines.batching import Batcher, Request
from pmod.pipelines.evaluate import evaluate
from pmod.tiny import randomize_routers, tiny_llava, tiny_llava_processor

openai = pytest.importorskip("openai")  # the serve extra and the openai client (the dev extra has both)
uvicorn = pytest.importorskip("uvicorn")
pytest.importorskip("fastapi")
from pmod.pipelines.serve import ServeSettings, create_app, image_data_url, serving_in_thread  # noqa: E402

SUPPRESS = [0, 1, 2]  # <pad> <unk> <s>: never generated; </s> may end an answer
WORDS = "USER ASSISTANT : what is in the image ? a red blue green circle square triangle yes no".split()
WORDS += [f"w{i}" for i in range(128 - 1 - 4 - len(WORDS))]
COLOURS = {"red": (200, 20, 20), "blue": (20, 20, 200), "green": (20, 200, 20)}
QUESTIONS = [("what is in the image ?", "red"), ("is it red ?", "green"), ("what ?", "blue"),
             ("is a circle a square ?", None), ("what is red ?", None), ("is it green or blue or red ?", "red")]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("serve")
    model = pmod.apply_pmod(tiny_llava(num_layers=4), pmod.PModConfig(schedule=[1.0, 0.5, 0.3, 0.6])).eval()
    randomize_routers(model)
    for name, colour in COLOURS.items():
        Image.new("RGB", (40, 30), colour).save(folder / f"{name}.png")
    return model, tiny_llava_processor(model, WORDS), folder


@pytest.fixture(scope="module")
def server(tiny):
    model, processor, folder = tiny
    settings = ServeSettings(model_name="tiny", max_batch_size=8, batch_wait_ms=300, image_root=folder, max_images=1,
                             max_context=96)
    app = create_app(model, processor, settings, suppress_tokens=SUPPRESS)
    with serving_in_thread(app) as url:
        yield url, app


def client(url):
    return openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=120)


def data_url(colour):
    return image_data_url(Image.new("RGB", (40, 30), COLOURS[colour]))


def messages(question, image=None, url=None):
    content = [{"type": "text", "text": question}]
    if image is not None:
        content.insert(0, {"type": "image_url", "image_url": {"url": url or data_url(image)}})
    return [{"role": "user", "content": content}]


def eval_answers(tiny, max_new_tokens, questions=QUESTIONS):
    model, processor, folder = tiny
    records = [{"id": str(i), "conversations": [{"from": "human", "value": ("<image>\n" if img else "") + q},
                                                {"from": "gpt", "value": "x"}],
                **({"image": f"{img}.png"} if img else {})}
               for i, (q, img) in enumerate(questions)]
    result = evaluate(model, processor, records, folder, batch_size=len(records), max_new_tokens=max_new_tokens,
                      suppress_tokens=SUPPRESS, progress=False)
    return result.records


def test_answers_equal_pmod_eval_and_usage_carries_the_savings(tiny, server):
    url, _ = server
    expected = eval_answers(tiny, 4)
    api = client(url)
    for (question, image), want in zip(QUESTIONS, expected):
        out = api.chat.completions.create(model="tiny", messages=messages(question, image), max_tokens=4)
        assert out.choices[0].message.content == want.prediction
        assert out.choices[0].finish_reason in ("length", "stop")
        usage = out.usage.model_dump()
        assert usage["prompt_tokens"] > 0 and 0 < usage["completion_tokens"] <= 4
        assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
        assert usage["pmod"]["prefill_flops_ratio"] == pytest.approx(want.flops_ratio)
        assert usage["pmod"]["kv_ratio"] == pytest.approx(want.kv_ratio)
        assert (usage["pmod"]["kv_cache_ratio"] < 1.0) == (image is not None)  # text alone: nothing to skip
    # a file under --image-root, by path or file:// URL, is the same image as its data URL
    for name in ("red.png", f"file://{tiny[2] / 'red.png'}"):
        out = api.chat.completions.create(model="tiny", messages=messages(*QUESTIONS[0], url=name), max_tokens=4)
        assert out.choices[0].message.content == expected[0].prediction


def test_concurrent_clients_are_batched_and_get_their_own_answers(tiny, server):
    url, app = server
    expected = [r.prediction for r in eval_answers(tiny, 5)]
    before = len(app.state.batcher.batches)

    def ask(i):
        question, image = QUESTIONS[i]
        return client(url).chat.completions.create(model="tiny", messages=messages(question, image), max_tokens=5)

    with ThreadPoolExecutor(len(QUESTIONS)) as pool:
        outs = list(pool.map(ask, range(len(QUESTIONS))))
    assert [o.choices[0].message.content for o in outs] == expected
    sizes = app.state.batcher.batches[before:]
    assert sum(sizes) == len(QUESTIONS) and max(sizes) >= 2, sizes
    assert max(o.usage.model_dump()["pmod"]["batch_size"] for o in outs) == max(sizes)


def test_each_request_keeps_its_own_length_and_stop_inside_a_batch(tiny, server):
    url, app = server
    short, long = eval_answers(tiny, 1), eval_answers(tiny, 6)
    stop_word = long[3].prediction.split()[2]
    asks = [dict(i=0, max_tokens=1), dict(i=3, max_tokens=6), dict(i=3, max_tokens=6, stop=[stop_word])]

    def ask(a):
        question, image = QUESTIONS[a["i"]]
        extra = {"stop": a["stop"]} if "stop" in a else {}
        return client(url).chat.completions.create(model="tiny", messages=messages(question, image),
                                                   max_tokens=a["max_tokens"], **extra)

    before = len(app.state.batcher.batches)
    with ThreadPoolExecutor(len(asks)) as pool:
        a, b, c = pool.map(ask, asks)
    assert max(app.state.batcher.batches[before:]) >= 2  # they shared a generate call
    assert a.choices[0].message.content == short[0].prediction and a.usage.completion_tokens == 1
    assert a.choices[0].finish_reason == "length"
    assert b.choices[0].message.content == long[3].prediction
    cut = long[3].prediction.split(stop_word)[0].strip()
    assert c.choices[0].message.content == cut and c.choices[0].finish_reason == "stop"
    assert c.usage.completion_tokens < b.usage.completion_tokens  # the row stopped generating at its stop string


def test_streaming_gives_the_same_answer_in_pieces(tiny, server):
    url, _ = server
    want = eval_answers(tiny, 6)[0]
    stream = client(url).chat.completions.create(model="tiny", messages=messages(*QUESTIONS[0]), max_tokens=6,
                                                 stream=True, stream_options={"include_usage": True})
    pieces, finish, usage = [], None, None
    for chunk in stream:
        if chunk.choices:
            pieces.append(chunk.choices[0].delta.content or "")
            finish = chunk.choices[0].finish_reason or finish
        if chunk.usage is not None:
            usage = chunk.usage.model_dump()
    assert "".join(pieces) == want.prediction
    assert len([p for p in pieces if p]) >= 2  # streamed, not sent at the end
    assert finish in ("length", "stop") and usage["pmod"]["prefill_flops_ratio"] == pytest.approx(want.flops_ratio)


def test_models_and_health(server):
    url, _ = server
    assert [m.id for m in client(url).models.list().data] == ["tiny"]
    import json
    import urllib.request

    with urllib.request.urlopen(url.removesuffix("/v1") + "/health", timeout=30) as response:
        health = json.loads(response.read())
    assert health["status"] == "ok" and health["model"] == "tiny"


@pytest.mark.parametrize("change, error, says", [
    ({"model": "gpt-4"}, "NotFoundError", "serves 'tiny'"),
    ({"messages": messages("what is in the <image> ?")}, "BadRequestError", "<image>"),
    ({"messages": messages("what ?", "red", url="https://example.com/a.png")}, "BadRequestError", "data URL"),
    ({"messages": messages("what ?", "red", url="/etc/passwd")}, "BadRequestError", "--image-root"),
    ({"messages": messages("what ?", "red", url="../outside.png")}, "BadRequestError", "--image-root"),
    ({"messages": messages("what ?", "red", url="data:image/png;base64,!!!")}, "BadRequestError", "base64"),
    ({"messages": messages("what ?", "red", url="data:image/png;base64,aGVsbG8=")}, "BadRequestError",
     "no readable image"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url("red")}}] * 2}]},
     "BadRequestError", "at most 1"),
    ({"messages": messages(" ".join(["red"] * 120))}, "BadRequestError", "context"),
    ({"n": 2}, "BadRequestError", "n > 1"),
    ({"temperature": 5}, "BadRequestError", "temperature"),
    ({"messages": []}, "BadRequestError", "messages"),
    ({"extra_body": {"tools": [{"type": "function"}]}}, "BadRequestError", "tools"),
])
def test_bad_requests_get_openai_errors(server, change, error, says):
    url, _ = server
    request = {"model": "tiny", "messages": messages("what ?"), "max_tokens": 2, **change}
    with pytest.raises(getattr(openai, error)) as caught:
        client(url).chat.completions.create(**request)
    assert says in str(caught.value)
    body = caught.value.body
    assert set(body) >= {"message", "type", "code"} and caught.value.status_code < 500


def test_a_request_the_processor_refuses_fails_alone(tiny, server):
    """A batch with one bad row: the others are answered; the bad one gets a 400 naming why."""
    url, _ = server
    want = eval_answers(tiny, 3)[3].prediction
    oversized = {"role": "user", "content": [{"type": "text", "text": " ".join(["red"] * 120)}]}

    def ask(msgs):
        try:
            return client(url).chat.completions.create(model="tiny", messages=msgs, max_tokens=3)
        except openai.BadRequestError as exc:
            return exc

    with ThreadPoolExecutor(2) as pool:
        good, bad = pool.map(ask, [messages(QUESTIONS[3][0]), [oversized]])
    assert good.choices[0].message.content == want
    assert isinstance(bad, openai.BadRequestError) and bad.body["code"] == "context_length_exceeded"


def test_requests_time_out_with_504(tiny):
    model, processor, _ = tiny
    app = create_app(model, processor, ServeSettings(model_name="tiny", batch_wait_ms=2000, request_timeout_s=0.05))
    with serving_in_thread(app) as url, pytest.raises(openai.InternalServerError) as caught:
        client(url).chat.completions.create(model="tiny", messages=messages("what ?"), max_tokens=2)
    assert caught.value.status_code == 504 and "--request-timeout" in str(caught.value)


def test_cancelled_requests_stop_costing_tokens(tiny):
    """A request cancelled while queued is never generated; one cancelled while generating stops its row, and a
    batch whose rows all stopped ends early."""
    model, processor, _ = tiny
    batcher = Batcher(model, processor, max_batch_size=4, batch_wait_ms=50, suppress_tokens=[0, 1, 2, 3])
    events, steps = [], []
    hook = model.register_forward_hook(lambda *args: steps.append(1))
    try:
        queued = Request([{"role": "user", "content": [{"type": "text", "text": "what ?"}]}], [], max_tokens=20,
                         emit=events.append)
        queued.cancelled.set()
        streaming = Request([{"role": "user", "content": [{"type": "text", "text": "is it red ?"}]}], [],
                            max_tokens=40, emit=events.append, stream=True)

        def emit(event):  # the client goes away after its first piece of text
            events.append(event)
            streaming.cancelled.set()

        streaming.emit = emit
        batcher.start()
        batcher.submit(queued)
        batcher.submit(streaming)
        deadline = time.time() + 60
        while not batcher.batches and time.time() < deadline:
            time.sleep(0.01)
        batcher.stop()
    finally:
        hook.remove()
    assert batcher.dropped == 1 and batcher.batches == [1]
    assert [kind for kind, _ in events] == ["delta"]  # no answer for the cancelled row
    assert len(steps) < 10  # 40 tokens asked: it stopped soon after the client left


def test_serve_command_passes_its_settings(monkeypatch, tmp_path):
    import pmod.pipelines.serve as serve_module
    from pmod.cli import main

    seen = {}
    monkeypatch.setattr(serve_module, "serve", lambda model_dir, **kw: seen.update(model_dir=model_dir, **kw))
    assert main(["serve", str(tmp_path), "--port", "9001", "--max-batch-size", "3", "--batch-wait-ms", "0",
                 "--image-root", str(tmp_path), "--model-name", "m"]) == 0
    assert seen["model_dir"] == str(tmp_path) and seen["port"] == 9001 and seen["host"] == "127.0.0.1"
    assert seen["settings"]["max_batch_size"] == 3 and seen["settings"]["batch_wait_ms"] == 0
    assert seen["settings"]["model_name"] == "m" and seen["settings"]["image_root"] == tmp_path
    ServeSettings(**seen["settings"])  # what the command gives, the settings take
    with pytest.raises(SystemExit):
        main(["serve", str(tmp_path), "--port", "70000"])


def test_a_server_bug_is_a_500_in_openai_shape_without_a_traceback(server, monkeypatch):
    import pmod.pipelines.serve as serve_module

    def broken(*args, **kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr(serve_module, "to_pmod_messages", broken)
    with pytest.raises(openai.InternalServerError) as caught:
        client(server[0]).chat.completions.create(model="tiny", messages=messages("what ?"), max_tokens=2)
    assert caught.value.status_code == 500 and caught.value.body["code"] == "internal_error"
    assert "RuntimeError: a bug" in str(caught.value) and "Traceback" not in str(caught.value)
