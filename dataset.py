"""
数据：把语料一次性分词成磁盘上的 token 存储，再切成训练样本 X、Y、loss_mask。
阅读顺序：render_with_spans（对话模板与回复区间）-> TokenStore / build_store（内存映射的存储）->
PretrainDataset（打包成满窗口，没有填充）-> DocumentDataset（happy-llm 的一行一篇、填充到 512）->
SFTDataset（只在助手回复上计算损失）-> ReplayDataset（SFT 时混入预训练文本）-> collate_batch。
可以动手试：python dataset.py --show 2 看哪些 token 参与训练；对比 --packing false 时的填充比例。

Read in this order: render_with_spans -> TokenStore / build_store -> PretrainDataset ->
DocumentDataset -> SFTDataset -> ReplayDataset -> collate_batch. Try: `python dataset.py --show 2`
to see which tokens are trained; compare how much is padding with --packing false.

Token store, datasets and sampler: what the training loop reads.

    store = build_store("seq_monkey_datawhale.jsonl", "tokenizer_k", "pretrain", "data/cache")
    ds = PretrainDataset(store, max_seq_len=512)     # ds[i] -> X, Y, loss_mask
    python dataset.py --kind sft --show 2             # a learner's view: which tokens are trained

The store. A corpus is tokenised once into a directory of flat binary files: tokens.bin (uint16,
since every vocabulary here is < 65536; uint32 otherwise), offsets.bin (int64, where each document
starts, plus the end) and, for SFT, mask.bin (uint8, 1 on the tokens that are trained targets) and
first_trained.bin (int32, where each document's first trained token is). The files are
memory-mapped, so the host memory of building and training stays flat however large the corpus.
Tokenising runs on all cores (the tokenizers library's encode_batch); the store is rebuilt when the
data file (size or modification time) or the tokenizer changes.

Pretraining samples are packed: documents are encoded as <s> text </s>, concatenated, and cut into
windows of max_seq_len + 1 tokens that overlap by one token. X = window[:-1], Y = window[1:], so
every token of the corpus but the first is a target exactly once per epoch and no position is
padding.

SFT samples are conversations rendered with the tokenizer's chat template. The trained positions
are found from the rendering itself: rendering the messages up to a reply with the generation
prompt gives where the reply starts, rendering up to and including it gives where it ends (its
closing <|im_end|> included, the newline after it not). Tokens whose first character falls in such
a span are trained; system and user turns, the template's own tokens and padding are not. No token
id is hard-coded: the spans come from the template itself, whatever the tokenizer.
"""

import argparse
import functools
import hashlib
import itertools
import json
import os
import shutil
import sys
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer, processors

from core import corpus, locks

STORE_VERSION = 2  # bump when the store layout or the encoding changes: old caches are rebuilt
BATCH_RECORDS = 2048  # records tokenised per encode_batch call: enough work for every core
PAD_ID = 0  # <unk>, which the byte-level tokenizer never produces from text
# Batches of varying length are padded to a multiple of this many tokens. Each new input shape costs
# the CPU's bf16 kernels (oneDNN) a compiled kernel that is kept for the life of the process: padded
# to every length, SFT grew to 2.4 GB RSS on a bf16 CPU; in steps of 32 it stays under 800 MB.
PAD_MULTIPLE = 32

# -----------------------------------------------------------------------------
# chat rendering with trained spans


def load_chat_template(tokenizer_dir):
    """The tokenizer's chat template, compiled the way transformers compiles it."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment  # a dependency of transformers
    path = Path(tokenizer_dir) / "chat_template.jinja"
    if path.is_file():
        source = path.read_text(encoding="utf-8")
    else:
        config = json.loads((Path(tokenizer_dir) / "tokenizer_config.json").read_text(encoding="utf-8"))
        source = config.get("chat_template")
        if not source:
            raise ValueError(f"{tokenizer_dir}: the tokenizer has no chat template; retrain it with train_tokenizer.py")
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    return env.from_string(source)


def render_with_spans(template, messages):
    """(text, [(start, end)]): the rendered conversation and the character span of each assistant
    reply with its closing marker. Assumes what every chat template does: rendering is incremental
    (the rendering of a shorter conversation is a prefix of the longer one's)."""
    def render(msgs, prompt=False):
        return template.render(messages=msgs, add_generation_prompt=prompt)

    text = render(messages)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before, through = render(messages[:i], prompt=True), render(messages[:i + 1])
        if not (text.startswith(through) and through.startswith(before)):
            raise ValueError("the chat template does not render conversations incrementally; "
                             "cannot locate the assistant replies")
        spans.append((len(before), len(through.rstrip())))
    return text, spans

# -----------------------------------------------------------------------------
# the token store


class TokenStore:
    """A tokenised corpus on disk: documents of token ids (and, for SFT, a trained-target mask)."""

    def __init__(self, directory):
        self.dir = Path(directory)
        self.meta = json.loads((self.dir / "meta.json").read_text(encoding="utf-8"))
        self.kind = self.meta["kind"]
        self._open()

    def _open(self):
        dtype = np.dtype(self.meta["dtype"])
        self.tokens = np.memmap(self.dir / "tokens.bin", dtype=dtype, mode="r")
        # mapped too: ~200 MB for seq-monkey's ~27M chunks, of which pretraining needs only the count
        self.offsets = np.memmap(self.dir / "offsets.bin", dtype=np.int64, mode="r")
        self.mask = self.first_trained = None
        if self.kind == "sft":
            self.mask = np.memmap(self.dir / "mask.bin", dtype=np.uint8, mode="r")
            self.first_trained = np.fromfile(self.dir / "first_trained.bin", dtype=np.int32)

    # a DataLoader worker started with spawn (macOS, Windows) receives the store pickled: send the
    # directory and map the files again there, not a copy of every token
    def __getstate__(self):
        return {"dir": self.dir, "meta": self.meta, "kind": self.kind}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._open()

    def __len__(self):
        return len(self.offsets) - 1

    def document(self, i):
        start, end = self.offsets[i], self.offsets[i + 1]
        return self.tokens[start:end], None if self.mask is None else self.mask[start:end]


def _fingerprint(path, tokenizer_path, kind):
    stat = path.stat()
    return {"version": STORE_VERSION, "kind": kind, "source": str(path.resolve()), "size": stat.st_size,
            "mtime_ns": stat.st_mtime_ns,
            "tokenizer_sha1": hashlib.sha1(tokenizer_path.read_bytes()).hexdigest()}


def _encoded_batches(path, tokenizer, tokenizer_dir, kind, dtype, stats):
    """Yield (tokens, lengths, mask or None) for every BATCH_RECORDS records of the file: the batch's
    token ids as one flat array of `dtype`, each document's token count, and for SFT the mask."""
    if kind == "pretrain":
        records = corpus.iter_pretrain_texts(path, stats, progress=True)
        # <s> text </s> added by the tokenizer itself (in Rust), not by a Python pass over every token
        tokenizer.post_processor = processors.TemplateProcessing(
            single="<s> $A </s>", special_tokens=[(t, tokenizer.token_to_id(t)) for t in ("<s>", "</s>")])
        encode = functools.partial(_encode_texts, tokenizer=tokenizer, dtype=dtype)
    else:
        template = load_chat_template(tokenizer_dir)
        records = (render_with_spans(template, messages) for messages in corpus.iter_conversations(path, stats, True))
        encode = functools.partial(_encode_conversations, tokenizer=tokenizer, dtype=dtype)
    for batch in _read_ahead(records):
        yield encode(batch)


def _read_ahead(records):
    """Lists of BATCH_RECORDS records, the next one read (and, for SFT, rendered) in a thread while
    the caller encodes this one: parsing JSON holds the GIL but encode_batch releases it, so the
    next batch is parsed while this one is encoded, not after it."""
    def read():
        return list(itertools.islice(records, BATCH_RECORDS))
    with ThreadPoolExecutor(max_workers=1) as reader:
        next_batch = reader.submit(read)
        while batch := next_batch.result():  # re-raises a reading error (bad file) here
            next_batch = reader.submit(read)
            yield batch


def _concatenated_ids(encodings, dtype):
    """(all token ids of a batch of encodings as one flat array, each encoding's length)."""
    ids = [e.ids for e in encodings]
    lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
    tokens = np.fromiter(itertools.chain.from_iterable(ids), dtype=dtype, count=int(lengths.sum()))
    return tokens, lengths


def _encode_texts(texts, tokenizer, dtype):
    # encode_batch_fast: all cores, and no character offsets computed (pretraining needs none)
    return *_concatenated_ids(tokenizer.encode_batch_fast(texts), dtype), None


def _encode_conversations(rendered, tokenizer, dtype):
    """The loss mask of SFT is built here. The rule: a token is trained (mask 1) exactly when its
    first character lies in an assistant reply's span, the reply's closing <|im_end|> included;
    the system and user turns, the template's own tokens (<|im_start|>assistant\n, the newline
    after <|im_end|>) and padding are never trained. So the model learns to answer and to stop,
    and never to write the user's side (render_with_spans finds the spans)."""
    texts = [text for text, _ in rendered]
    encodings = tokenizer.encode_batch(texts, add_special_tokens=False)
    tokens, lengths = _concatenated_ids(encodings, dtype)
    # Positions are counted in the batch's texts laid end to end, so the reply spans of all its
    # conversations form one sorted list of boundaries [a0, b0, a1, b1, ...]. A token whose first
    # character is at s lies in a span [a, b) exactly when an odd number of boundaries are <= s.
    text_starts = np.cumsum([0, *map(len, texts[:-1])])
    offsets = np.fromiter(itertools.chain.from_iterable(itertools.chain.from_iterable(e.offsets for e in encodings)),
                          dtype=np.int64, count=2 * len(tokens))
    starts = offsets[::2] + np.repeat(text_starts, lengths)
    bounds = np.fromiter((base + x for base, (_, spans) in zip(text_starts.tolist(), rendered)
                          for span in spans for x in span), dtype=np.int64)
    mask = (np.searchsorted(bounds, starts, side="right") % 2).astype(np.uint8)
    return tokens, lengths, mask


def _first_trained(mask, lengths):
    """Each document's first trained position (0 when it has none, as argmax gives)."""
    doc_starts = np.cumsum(lengths) - lengths
    trained = np.append(np.flatnonzero(mask), len(mask))  # the sentinel: no trained token after the start
    first = trained[np.searchsorted(trained, doc_starts)]
    return np.where(first < doc_starts + lengths, first - doc_starts, 0).astype(np.int32)


def build_store(path, tokenizer_dir, kind, cache_dir="data/cache") -> TokenStore:
    """The token store of `path` (pretraining texts or SFT conversations, any format core/corpus.py
    reads), built on first use under cache_dir and reused while the file and tokenizer are unchanged.
    Raises FileNotFoundError / ValueError with a message naming the file."""
    if kind not in ("pretrain", "sft"):
        raise ValueError(f"kind {kind!r}: expected pretrain or sft")
    path, tokenizer_path = Path(path), Path(tokenizer_dir) / "tokenizer.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file; check --data_path")
    if not tokenizer_path.is_file():
        raise FileNotFoundError(f"{tokenizer_path}: no such file; run train_tokenizer.py or check --tokenizer_dir")
    fingerprint = _fingerprint(path, tokenizer_path, kind)
    key = hashlib.sha1(fingerprint["source"].encode()).hexdigest()[:10]
    out = Path(cache_dir) / f"{path.stem}-{kind}-{key}"
    # one build at a time per cache folder: two processes (two runs, or the nodes of one job on a
    # shared disk) that both find no store wait here, and the second one then finds the first one's.
    # The store is opened (memory-mapped) under the lock too, so no rebuild can swap it mid-open.
    with locks.FileLock(Path(cache_dir) / ".build.lock"):
        if not _is_built(out, fingerprint):
            _build(path, tokenizer_path, tokenizer_dir, kind, fingerprint, out)
        return TokenStore(out)


def _is_built(out, fingerprint) -> bool:
    meta_path = out / "meta.json"
    if not meta_path.is_file():
        return False
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    return {k: meta.get(k) for k in fingerprint} == fingerprint


def _build(path, tokenizer_path, tokenizer_dir, kind, fingerprint, out):
    tokenizer = Tokenizer.from_file(str(tokenizer_path))
    dtype = np.uint16 if tokenizer.get_vocab_size() <= 1 << 16 else np.uint32
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    print(f"tokenising {path} -> {out}", file=sys.stderr, flush=True)
    stats, n_tokens, n_docs = Counter(), 0, 0
    try:
        with open(tmp / "tokens.bin", "wb") as tokens_file, open(tmp / "offsets.bin", "wb") as offsets_file, \
                open(tmp / "mask.bin", "wb") as mask_file, open(tmp / "first_trained.bin", "wb") as first_file:
            np.zeros(1, dtype=np.int64).tofile(offsets_file)
            for tokens, lengths, mask in _encoded_batches(path, tokenizer, tokenizer_dir, kind, dtype, stats):
                tokens.tofile(tokens_file)
                (n_tokens + np.cumsum(lengths)).tofile(offsets_file)
                if mask is not None:
                    mask.tofile(mask_file)
                    _first_trained(mask, lengths).tofile(first_file)
                n_tokens, n_docs = n_tokens + len(tokens), n_docs + len(lengths)
        if kind == "pretrain":
            (tmp / "mask.bin").unlink()
            (tmp / "first_trained.bin").unlink()
        meta = {**fingerprint, "dtype": np.dtype(dtype).name, "documents": n_docs, "tokens": n_tokens,
                "skipped_lines": sum(stats.values()) - stats["ok"]}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1), encoding="utf-8")
        # replace the old store only once the new one is whole (a killed build leaves just a .tmp dir)
        shutil.rmtree(out, ignore_errors=True)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"{path}: {n_docs:,} documents, {n_tokens:,} tokens", file=sys.stderr, flush=True)

# -----------------------------------------------------------------------------
# datasets: (X, Y, loss_mask) samples


class PretrainDataset(torch.utils.data.Dataset):
    """Packed windows of the concatenated documents. Window i is tokens [i*T, i*T + T + 1): the
    last token of a window is the first of the next, so each token is a target exactly once."""

    def __init__(self, store: TokenStore, max_seq_len):
        self.store, self.seq_len = store, max_seq_len
        self.n_windows = (len(store.tokens) - 1) // max_seq_len
        if self.n_windows == 0:
            raise ValueError(f"{store.meta['source']}: {len(store.tokens)} tokens, fewer than one window of "
                             f"{max_seq_len + 1}; use more text or a smaller --max_seq_len")

    def __len__(self):
        return self.n_windows

    def __getitem__(self, i):
        start = i * self.seq_len
        window = torch.from_numpy(self.store.tokens[start:start + self.seq_len + 1].astype(np.int64))
        return window[:-1], window[1:], torch.ones(self.seq_len, dtype=torch.long)


class DocumentDataset(torch.utils.data.Dataset):
    """happy-llm's PretrainDataset: one document per sample, cut to max_seq_len + 1 tokens and padded
    to that width (loss_mask 0 on the padding). Every row costs a full window of compute however
    short its document: kept to compare against packing (--packing false)."""

    def __init__(self, store: TokenStore, max_seq_len):
        self.store, self.seq_len = store, max_seq_len

    def __len__(self):
        return len(self.store)

    def __getitem__(self, i):
        tokens, _ = self.store.document(i)
        window = torch.full((self.seq_len + 1,), PAD_ID, dtype=torch.long)
        n = min(len(tokens), self.seq_len + 1)
        window[:n] = torch.from_numpy(tokens[:n].astype(np.int64))
        mask = torch.zeros(self.seq_len, dtype=torch.long)
        mask[:n - 1] = 1
        return window[:-1], window[1:], mask


class SFTDataset(torch.utils.data.Dataset):
    """One rendered conversation per sample, cut to max_seq_len + 1 tokens (mask cut alike).
    loss_mask[t] = 1 where Y[t] is a token of an assistant reply or its closing marker.
    A conversation whose first reply starts beyond the cut would train nothing: it is left out."""

    def __init__(self, store: TokenStore, max_seq_len):
        if store.kind != "sft":
            raise ValueError(f"{store.meta['source']}: tokenised for {store.kind}, not SFT")
        self.store, self.seq_len = store, max_seq_len
        # target t is token t + 1 of the window: a first trained token at position <= max_seq_len is kept
        self.documents = np.flatnonzero(store.first_trained <= max_seq_len)
        if len(self.documents) == 0:
            raise ValueError(f"{store.meta['source']}: no conversation has a reply within the first {max_seq_len} "
                             "tokens; raise --max_seq_len")
        if len(self.documents) < len(store):
            print(f"{store.meta['source']}: left out {len(store) - len(self.documents):,} of {len(store):,} "
                  f"conversations whose reply starts after token {max_seq_len}", file=sys.stderr)

    def __len__(self):
        return len(self.documents)

    def __getitem__(self, i):
        tokens, mask = self.store.document(self.documents[i])
        tokens = torch.from_numpy(tokens[:self.seq_len + 1].astype(np.int64))
        mask = torch.from_numpy(mask[1:self.seq_len + 1].astype(np.int64))
        return tokens[:-1], tokens[1:], mask


def collate_batch(samples, max_width=None):
    """[(X, Y, loss_mask)] of varying lengths -> three [B, T] tensors, right-padded with PAD_ID and
    mask 0 to the longest sample of this batch (not to a fixed length: less padding to compute),
    rounded up to PAD_MULTIPLE but not past max_width, the model's context (few shapes to compile
    kernels for). The mask is float if any sample's is (ReplayDataset's weights), else an integer tensor."""
    longest = max(len(x) for x, _, _ in samples)
    width = max(longest, min(-(-longest // PAD_MULTIPLE) * PAD_MULTIPLE, max_width or longest))
    tokens = torch.full((2, len(samples), width), PAD_ID, dtype=torch.long)
    weighted = any(m.is_floating_point() for _, _, m in samples)
    mask = torch.zeros(len(samples), width, dtype=torch.float32 if weighted else torch.long)
    for row, (x, y, m) in enumerate(samples):
        tokens[0, row, :len(x)], tokens[1, row, :len(y)], mask[row, :len(m)] = x, y, m
    return tokens[0], tokens[1], mask


class ReplayDataset(torch.utils.data.Dataset):
    """SFT samples with pretraining windows mixed in ("replay"): a model fine-tuned on chat alone
    drifts from the text it was pretrained on and forgets some of it; training on a little of that
    text as well holds it in place. `share` of the samples are pretraining windows, spread evenly over
    the corpus; each replayed target weighs `weight` (loss_mask = weight, not 1), chosen so a whole
    window counts as much as an average SFT sample's trained tokens: the replay's share of the
    gradient is then about `share`, however short the replies."""

    def __init__(self, sft, sft_store: TokenStore, pretrain: PretrainDataset, share):
        self.sft, self.pretrain = sft, pretrain
        n = round(len(sft) * share / (1 - share))
        self.replayed = np.linspace(0, len(pretrain) - 1, n).round().astype(np.int64)
        trained = float(sft_store.mask.sum()) / len(sft_store)  # an average conversation's trained targets
        self.weight = min(1.0, trained / pretrain.seq_len)

    def __len__(self):
        return len(self.sft) + len(self.replayed)

    def __getitem__(self, i):
        if i < len(self.sft):
            return self.sft[i]
        x, y, mask = self.pretrain[int(self.replayed[i - len(self.sft)])]
        return x, y, mask * self.weight


# -----------------------------------------------------------------------------
# for learners: what exactly is trained


def show_sample(ds, i, tokenizer: Tokenizer, trained=("\033[32m", "\033[0m")) -> str:
    """Sample i of a dataset as text, each run of trained target tokens wrapped in `trained`
    (green by default; pass e.g. ("[[", "]]") for plain text). The first token of X is shown too."""
    x, y, mask = ds[i]
    ids, flags = [int(x[0]), *y.tolist()], [0, *mask.tolist()]
    runs, out = [], []
    for token, flag in zip(ids, flags):  # consecutive tokens with the same flag decode together
        if runs and runs[-1][0] == flag:
            runs[-1][1].append(token)
        else:
            runs.append((flag, [token]))
    for flag, tokens in runs:
        text = tokenizer.decode(tokens, skip_special_tokens=False)
        out.append(f"{trained[0]}{text}{trained[1]}" if flag else text)
    return "".join(out)


def main(argv=None):
    parser = argparse.ArgumentParser(description="Tokenise a corpus into the store and show samples "
                                                 "with the trained tokens marked.")
    parser.add_argument("--data_path", help="a .jsonl/.txt file (default: the embedded corpus)")
    parser.add_argument("--kind", choices=["pretrain", "sft"], default="sft")
    parser.add_argument("--tokenizer_dir", default="tokenizer_k")
    parser.add_argument("--cache_dir", default="data/cache")
    parser.add_argument("--max_seq_len", type=int, default=512)
    parser.add_argument("--show", type=int, default=2, help="how many samples to print")
    args = parser.parse_args(argv)
    path = args.data_path or corpus.embedded_paths()[f"{args.kind}_train"]
    try:
        store = build_store(path, args.tokenizer_dir, args.kind, args.cache_dir)
        ds = (SFTDataset if args.kind == "sft" else PretrainDataset)(store, args.max_seq_len)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(str(e)) from None
    print(f"{len(store):,} documents, {len(store.tokens):,} tokens, {len(ds):,} samples of <= {args.max_seq_len}")
    if store.mask is not None:
        print(f"trained tokens: {int(store.mask.sum()):,} ({store.mask.mean():.1%})")
    tokenizer = Tokenizer.from_file(str(Path(args.tokenizer_dir) / "tokenizer.json"))
    marks = ("\033[32m", "\033[0m") if sys.stdout.isatty() else ("[[", "]]")
    for i in range(min(args.show, len(ds))):
        print(f"--- sample {i} ({'trained tokens in green' if marks[0] != '[[' else 'trained tokens in [[ ]]'})")
        print(show_sample(ds, i, tokenizer, marks))


if __name__ == "__main__":
    main()
