import io

import pytest
from PIL import Image

import pmod
from pmod.cli import main
from pmod.pipelines.chat import ChatSession
from pmod.tiny import randomize_routers, tiny_llava, tiny_llava_processor


@pytest.fixture(scope="module")
def chat_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("chat")
    model = pmod.apply_pmod(tiny_llava(num_layers=6), pmod.PModConfig())
    randomize_routers(model)
    model.save_pretrained(path / "model")
    tiny_llava_processor(model).save_pretrained(path / "model")
    Image.new("RGB", (40, 30), (200, 10, 10)).save(path / "red.png")
    return path


def test_streamed_text_equals_answer_and_stats(chat_dir):
    model = pmod.load_model(chat_dir / "model").eval()
    processor = tiny_llava_processor(model)
    pieces = []
    session = ChatSession(model, processor, Image.open(chat_dir / "red.png").convert("RGB"), max_new_tokens=6)
    answer, stats = session.ask("what is in the image ?", pieces.append)
    assert "".join(pieces).strip() == answer
    assert stats.new_tokens == [6] and stats.prefill_seconds > 0 and stats.decode_tokens_per_second > 0
    assert 0 < stats.kv.ratio < 1
    answer2, _ = session.ask("is it red ?", pieces.append)
    assert [m["role"] for m in session.messages] == ["user", "assistant", "user", "assistant"]
    assert session.messages[1]["content"][0]["text"] == answer


def test_chat_one_shot_and_interactive(chat_dir, capsys, monkeypatch):
    args = ["chat", str(chat_dir / "model"), "--image", str(chat_dir / "red.png"), "--max-new-tokens", "4"]
    assert main(args + ["--prompt", "what is in the image ?"]) == 0
    out = capsys.readouterr().out
    assert "prefill" in out and "tokens/s" in out and "vs dense" in out
    monkeypatch.setattr("sys.stdin", io.StringIO("what ?\n\nis it red ?\nexit\nnot answered\n"))
    assert main(args) == 0
    out = capsys.readouterr().out
    assert out.count("KV cache") == 2


def test_chat_errors(chat_dir, capsys):
    assert main(["chat", str(chat_dir / "model"), "--image", str(chat_dir / "missing.png"), "--prompt", "x"]) == 2
    assert "Image not found" in capsys.readouterr().err
    for flag, value in (("--max-new-tokens", "0"), ("--temperature", "-1"), ("--temperature", "nan")):
        with pytest.raises(SystemExit) as stop:  # argparse refuses it before the model loads
            main(["chat", str(chat_dir / "model"), "--image", str(chat_dir / "red.png"), "--prompt", "x", flag, value])
        assert stop.value.code == 2 and flag in capsys.readouterr().err


def test_a_one_token_answer_has_no_decoding_speed(chat_dir, capsys):
    args = ["chat", str(chat_dir / "model"), "--image", str(chat_dir / "red.png"), "--max-new-tokens", "1"]
    assert main(args + ["--prompt", "what is in the image ?"]) == 0
    out = capsys.readouterr().out
    assert "no decoding steps (1 new)" in out and "nan" not in out


def test_chat_with_a_qwen2_vl_model(tmp_path, capsys):
    """`pmod chat` on a saved Qwen2-VL model: its ChatML processor loads without torchvision, vision and
    placeholder tokens are never generated, the cache shrinks."""
    from pmod.tiny import tiny_qwen2_vl, tiny_qwen2_vl_processor

    model = pmod.apply_pmod(tiny_qwen2_vl(patch_size=7), pmod.PModConfig(schedule=[1.0, 1.0, 0.3, 0.3]))
    randomize_routers(model)
    model.save_pretrained(tmp_path)
    tiny_qwen2_vl_processor(model, image_size=28).save_pretrained(tmp_path)
    Image.new("RGB", (40, 30), (200, 10, 10)).save(tmp_path / "red.png")
    assert main(["chat", str(tmp_path), "--image", str(tmp_path / "red.png"), "--max-new-tokens", "5",
                 "--prompt", "what is in the image ?"]) == 0
    assert "vs dense" in capsys.readouterr().out
    session = ChatSession(pmod.load_model(tmp_path).eval(), tiny_qwen2_vl_processor(model, image_size=28),
                          Image.open(tmp_path / "red.png").convert("RGB"), max_new_tokens=5)
    seen = {}
    generate = session.model.generate

    def spy(**kwargs):
        seen.update(kwargs)
        return generate(**kwargs)

    session.model.generate = spy
    _, stats = session.ask("what is in the image ?")
    assert {124, 125, 126, 127} <= set(seen["suppress_tokens"])  # vision end / start, video, image ids
    assert 0 < stats.kv.ratio < 1


def test_a_bad_line_is_refused_and_the_conversation_goes_on(chat_dir, capsys, monkeypatch):
    """A typed <image> ended the whole interactive chat with a raw transformers error, and so did a line that is not
    UTF-8: each is refused on its own and the next question is answered; bad flags are argparse errors and a device
    this machine lacks is one clear line."""
    args = ["chat", str(chat_dir / "model"), "--image", str(chat_dir / "red.png"), "--max-new-tokens", "3"]
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO("what <image> is it ?\ncaf\xe9 ?\n".encode(
        "latin-1") + b"is it red ?\n"), encoding="utf-8"))
    assert main(args) == 0
    captured = capsys.readouterr()
    assert "the prompt contains <image>" in captured.err and "not UTF-8 text; not asked" in captured.err
    assert captured.out.count("KV cache") == 1  # the third line was answered
    for flag, value in (("--temperature", "1e308"), ("--layers", "100000000")):
        with pytest.raises(SystemExit) as stop:
            main((args if flag != "--layers" else ["schedule"]) + [flag, value])
        assert stop.value.code == 2 and flag in capsys.readouterr().err
    for device, message in (("bogus", "Unknown device 'bogus'"), ("cuda:7", "cuda:7")):
        assert main(args + ["--prompt", "x", "--device", device]) == 2
        err = capsys.readouterr().err
        assert message in err and "unexpected" not in err


def test_a_dense_folder_is_used_as_it_is(tmp_path, capsys):
    """`pmod chat DENSE_DIR` converted it silently with zero routers (KV 61%, and other answers than the dense model)
    while `pmod eval` evaluated it dense: every verb now takes a folder as it is; chat says it is dense, viz refuses
    to draw kept tokens of a model that keeps them all."""
    dense = tiny_llava(num_layers=2)
    dense.save_pretrained(tmp_path / "dense")
    tiny_llava_processor(dense).save_pretrained(tmp_path / "dense")
    Image.new("RGB", (40, 30), (200, 10, 10)).save(tmp_path / "red.png")
    args = ["--image", str(tmp_path / "red.png"), "--prompt", "what ?"]
    assert main(["chat", str(tmp_path / "dense"), *args, "--max-new-tokens", "2"]) == 0
    captured = capsys.readouterr()
    assert "is a dense checkpoint: chatting with the dense model" in captured.err and "KV cache" not in captured.out
    assert main(["viz", str(tmp_path / "dense"), *args, "--out", str(tmp_path / "v.png")]) == 2
    assert "dense checkpoint: none of its layers routes tokens" in capsys.readouterr().err
