"""The shipped tokenizer_k/: special ids, exact round trips, ChatML template, reproducibility."""
import json
import subprocess
import sys

import pytest
from conftest import REPO, TOKENIZER_DIR
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer

import train_tokenizer

SPECIALS = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(TOKENIZER_DIR)


def test_special_tokens(tok):
    assert len(tok) == 6144
    assert [tok.convert_tokens_to_ids(t) for t in SPECIALS] == [0, 1, 2, 3, 4]
    assert (tok.unk_token, tok.bos_token, tok.eos_token, tok.pad_token) == ("<unk>", "<s>", "</s>", "<unk>")
    assert tok.pad_token_id == 0 and tok.eos_token_id == 2
    assert tok.model_max_length == 512
    assert tok.clean_up_tokenization_spaces is False
    assert tok.encode("你好") == tok("你好")["input_ids"]  # no BOS/EOS added by encode
    assert 1 not in tok.encode("你好") and 2 not in tok.encode("你好")


def test_no_normalizer_chinese_punctuation_survives(tok):
    assert json.loads((TOKENIZER_DIR / "tokenizer.json").read_text(encoding="utf-8"))["normalizer"] is None
    text = "你好，世界！真的吗？是的：（一）《书》“引号”；、……——１２３ＡＢＣ"
    assert tok.decode(tok.encode(text)) == text


# arbitrary Unicode, with the pieces most likely to break a tokenizer mixed in on purpose
PIECES = st.sampled_from(SPECIALS + ["，", "。", "！", "？", "  ", "   ", "\t", "\n", "\r\n", " ", "😀",
                                     "中文", "abc", "123", "<", "|", ">", "<s", "im_end|>"])
TEXTS = st.one_of(st.text(), st.lists(st.one_of(st.text(max_size=5), PIECES), max_size=30).map("".join))


@settings(max_examples=1000, deadline=None, database=None)
@given(TEXTS)
def test_round_trip_arbitrary_text(tok, text):
    ids = tok.encode(text)
    assert tok.decode(ids, skip_special_tokens=False) == text


def test_typed_special_tokens(tok):
    # minimind's pretrain_hq writes <s>...</s> inside the text: they must become the special ids
    ids = tok.encode("<s>鉴别一组中文文章的风格和特点。</s><s>第二篇</s>")
    assert ids[0] == 1 and ids[-1] == 2 and ids.count(1) == 2 and ids.count(2) == 2
    # a user typing a turn marker: matched as the special id by default (documented choice), the
    # round trip still holds; split_special_tokens=True spells it out in ordinary tokens instead
    text = "请解释<|im_start|>和<|im_end|>"
    ids = tok.encode(text)
    assert 3 in ids and 4 in ids and tok.decode(ids) == text
    safe = tok(text, split_special_tokens=True)["input_ids"]
    assert not set(safe) & {0, 1, 2, 3, 4} and tok.decode(safe) == text


def test_chat_template(tok):
    messages = [{"role": "system", "content": "你是一个AI助手"},
                {"role": "user", "content": "你好"},
                {"role": "assistant", "content": "你好！有什么可以帮你？"}]
    rendered = tok.apply_chat_template(messages, tokenize=False)
    assert rendered == ("<|im_start|>system\n你是一个AI助手<|im_end|>\n"
                        "<|im_start|>user\n你好<|im_end|>\n"
                        "<|im_start|>assistant\n你好！有什么可以帮你？<|im_end|>\n")
    prompt = tok.apply_chat_template(messages[:2], tokenize=False, add_generation_prompt=True)
    assert prompt == rendered.split("你好！")[0]
    # no system message: the default one is added, as the SFT data always has it
    assert tok.apply_chat_template(messages[1:2], tokenize=False, add_generation_prompt=True) == prompt
    ids = tok.apply_chat_template(messages, tokenize=True, return_dict=False)
    assert ids == tok.encode(rendered) and ids[0] == 3 and ids[-2:] == [4, tok.encode("\n")[0]]


def test_shipped_tokenizer_is_what_the_default_command_writes(tmp_path):
    # `python train_tokenizer.py` on the embedded corpus must reproduce tokenizer_k/ byte for byte
    out = tmp_path / "tok"
    subprocess.run([sys.executable, "train_tokenizer.py", "--out_dir", str(out),
                    "--data_dir", str(tmp_path / "data")], cwd=REPO, check=True,
                   capture_output=True)
    shipped = sorted(p.name for p in TOKENIZER_DIR.iterdir())
    assert shipped == sorted(p.name for p in out.iterdir())
    for name in shipped:
        assert (out / name).read_bytes() == (TOKENIZER_DIR / name).read_bytes(), name


def test_cli_small_corpus_and_bad_flags(tmp_path, monkeypatch, capsys, pretrain_jsonl):
    fixture = str(pretrain_jsonl)
    out = tmp_path / "tok"
    argv = ["train_tokenizer.py", "--out_dir", str(out), "--val_path", fixture]
    monkeypatch.setattr(sys, "argv", argv + ["--data_path", fixture, "--vocab_size", "600",
                                             "--max_chars", "20000"])
    train_tokenizer.main()
    assert "round trip: 205/205 texts exact" in capsys.readouterr().out
    assert len(AutoTokenizer.from_pretrained(out)) == 600
    monkeypatch.setattr(sys, "argv", argv + ["--data_path", str(tmp_path / "missing.jsonl")])
    with pytest.raises(SystemExit, match="missing.jsonl: no such file"):
        train_tokenizer.main()
    monkeypatch.setattr(sys, "argv", argv + ["--data_path", fixture, "--vocab_size", "100"])
    with pytest.raises(SystemExit, match="--vocab_size 100: must be at least 261"):
        train_tokenizer.main()


def test_training_reads_only_up_to_the_cap(tmp_path, monkeypatch, capsys, pretrain_jsonl):
    # 30 documents of 10 characters, then lines that fail the whole read if they are ever reached
    path = tmp_path / "capped.jsonl"
    good = [json.dumps({"text": f"第{i:02d}篇文章的正文。"}, ensure_ascii=False) for i in range(30)]
    path.write_text("\n".join(good + ["{not json"] * 100) + "\n", encoding="utf-8")
    texts = list(train_tokenizer.training_texts(path, max_chars=95))
    assert texts == [json.loads(line)["text"] for line in good[:10]]  # stops at the document that reaches 95
    with pytest.raises(ValueError, match="capped.jsonl: 31 of the first 61 records are unusable"):
        list(train_tokenizer.training_texts(path, max_chars=0))  # 0: the whole file

    # without --max_chars the default cap applies, and the printed config says so
    monkeypatch.setattr(train_tokenizer, "DEFAULT_MAX_CHARS", 200)
    monkeypatch.setattr(sys, "argv", ["train_tokenizer.py", "--data_path", str(path), "--val_path", str(pretrain_jsonl),
                                      "--out_dir", str(tmp_path / "tok"), "--vocab_size", "300"])
    train_tokenizer.main()
    assert f"on {path} (first 200 characters)" in capsys.readouterr().out
    monkeypatch.setattr(sys, "argv", sys.argv + ["--max_chars", "0"])
    with pytest.raises(SystemExit, match="capped.jsonl: 31 of the first 61 records are unusable"):
        train_tokenizer.main()
