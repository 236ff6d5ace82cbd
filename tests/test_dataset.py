"""dataset.py: the token store, packed pretraining windows, SFT loss masks, the epoch sampler."""

import json
import pickle
import shutil
import tracemalloc

import numpy as np
import pytest
import torch
from conftest import TOKENIZER_DIR
from tokenizers import Tokenizer
from transformers import AutoTokenizer

import dataset
from core import corpus
from core.loaders import EpochSampler, holdout_split, sample_lengths
from dataset import (
    PretrainDataset,
    SFTDataset,
    build_store,
    collate_batch,
    load_chat_template,
    render_with_spans,
    show_sample,
)

TOKENIZER = Tokenizer.from_file(str(TOKENIZER_DIR / "tokenizer.json"))
IM_END = "<|im_end|>"


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module", params=["belle_jsonl", "chatterbot_jsonl"])
def sft_file(request):
    return request.getfixturevalue(request.param)


def trained_runs(tokens, mask):
    """The decoded text of each maximal run of trained tokens."""
    runs, current = [], []
    for token, flag in zip(tokens.tolist(), mask.tolist()):
        if flag:
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    runs += [current] if current else []
    return [TOKENIZER.decode(run, skip_special_tokens=False) for run in runs]

# -----------------------------------------------------------------------------
# SFT: the loss mask


def test_rendering_is_the_tokenizers_chat_template(sft_file):
    hf = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    template = load_chat_template(TOKENIZER_DIR)
    for messages in list(corpus.iter_conversations(sft_file))[:50]:
        text, _ = render_with_spans(template, messages)
        assert text == hf.apply_chat_template(messages, tokenize=False)


def test_exactly_the_replies_and_their_end_marker_are_trained(sft_file, cache):
    conversations = list(corpus.iter_conversations(sft_file))
    ds = SFTDataset(build_store(sft_file, TOKENIZER_DIR, "sft", cache), max_seq_len=4096)
    assert len(ds) == len(conversations)
    multi_turn = 0
    for (x, y, mask), messages in zip((ds[i] for i in range(len(ds))), conversations):
        replies = [m["content"] for m in messages if m["role"] == "assistant"]
        multi_turn += len(replies) > 1
        assert len(x) == len(y) == len(mask)
        # every reply and its <|im_end|> is one trained run, and nothing else is trained
        assert trained_runs(y, mask) == [reply + IM_END for reply in replies]
        untrained = TOKENIZER.decode(y[mask == 0].tolist(), skip_special_tokens=False)
        for m in messages:
            if m["role"] != "assistant":
                assert m["content"] in untrained
    assert sft_file.name == "belle_1k.jsonl" or multi_turn >= 10  # chatterbot has multi-turn dialogues


def test_truncation_keeps_tokens_and_mask_aligned(cache, capsys, belle_jsonl):
    store = build_store(belle_jsonl, TOKENIZER_DIR, "sft", cache)
    full, short = SFTDataset(store, 4096), SFTDataset(store, 40)
    # conversations whose reply starts after token 40 would train nothing: left out, and said so
    assert 0 < len(short) < len(full) and "left out" in capsys.readouterr().err
    cut = 0
    for i, document in enumerate(short.documents):
        fx, fy, fm = full[document]
        sx, sy, sm = short[i]
        n = min(len(fx), 40)
        assert len(sx) == len(sy) == len(sm) == n and sm.any()
        assert torch.equal(sx, fx[:n]) and torch.equal(sy, fy[:n]) and torch.equal(sm, fm[:n])
        cut += len(fx) > 40
    assert cut > 0
    left_out = set(range(len(full))) - set(short.documents.tolist())
    assert all(not full[d][2][:40].any() for d in left_out)


def test_collate_pads_with_zero_and_never_trains_padding(cache, belle_jsonl):
    ds = SFTDataset(build_store(belle_jsonl, TOKENIZER_DIR, "sft", cache), 128)
    samples = [ds[i] for i in range(6)]
    x, y, mask = collate_batch(samples)
    assert x.shape == y.shape == mask.shape == (6, max(len(s[0]) for s in samples))
    for row, (sx, sy, sm) in enumerate(samples):
        n = len(sx)
        assert torch.equal(x[row, :n], sx) and torch.equal(y[row, :n], sy) and torch.equal(mask[row, :n], sm)
        assert (x[row, n:] == 0).all() and (y[row, n:] == 0).all() and (mask[row, n:] == 0).all()


def test_collate_rounds_the_width_up_to_few_shapes_within_the_context():
    def rows(*lengths):
        return [(torch.ones(n, dtype=torch.long), torch.ones(n, dtype=torch.long), torch.ones(n, dtype=torch.long))
                for n in lengths]
    assert collate_batch(rows(3, 33), max_width=256)[0].shape == (2, 2 * dataset.PAD_MULTIPLE)
    assert collate_batch(rows(3, 33), max_width=40)[0].shape == (2, 40)  # never past the model's context
    assert collate_batch(rows(3, 64), max_width=256)[0].shape == (2, 64)
    x, y, mask = collate_batch(rows(5, 7), max_width=256)
    assert x.shape == (2, dataset.PAD_MULTIPLE) and mask[:, 7:].sum() == 0 and (y[:, 7:] == 0).all()


def test_show_sample_marks_the_reply():
    ds = [(torch.tensor([1, 5, 6]), torch.tensor([5, 6, 7]), torch.tensor([0, 1, 1]))]
    shown = show_sample(ds, 0, TOKENIZER, ("[[", "]]"))
    assert shown == TOKENIZER.decode([1, 5], skip_special_tokens=False) + "[[" + TOKENIZER.decode([6, 7]) + "]]"

# -----------------------------------------------------------------------------
# pretraining: packed windows


def test_packing_trains_every_token_once_per_epoch(cache, pretrain_jsonl):
    path = pretrain_jsonl
    store = build_store(path, TOKENIZER_DIR, "pretrain", cache)
    texts = list(corpus.iter_pretrain_texts(path))
    assert len(store) == len(texts)
    bos, eos = TOKENIZER.token_to_id("<s>"), TOKENIZER.token_to_id("</s>")
    for i in (0, len(texts) // 2, len(texts) - 1):  # documents are <s> text </s>, exactly
        doc, _ = store.document(i)
        assert doc[0] == bos and doc[-1] == eos
        assert TOKENIZER.decode(doc[1:-1].tolist()) == texts[i]
    ds = PretrainDataset(store, max_seq_len=64)
    assert len(ds) == (len(store.tokens) - 1) // 64
    targets = torch.cat([ds[i][1] for i in range(len(ds))])
    assert torch.equal(targets, torch.from_numpy(store.tokens[1:len(ds) * 64 + 1].astype(np.int64)))
    for i in (0, len(ds) - 1):
        x, y, mask = ds[i]
        assert x.shape == y.shape == mask.shape == (64,)
        assert torch.equal(x[1:], y[:-1]) and mask.all()


def test_a_corpus_smaller_than_one_window_is_refused(tmp_path, cache):
    path = tmp_path / "tiny.jsonl"
    path.write_text('{"text": "你好"}\n', encoding="utf-8")
    with pytest.raises(ValueError, match="tiny.jsonl.*fewer than one window"):
        PretrainDataset(build_store(path, TOKENIZER_DIR, "pretrain", cache), 512)

# -----------------------------------------------------------------------------
# the sampler: deterministic, resumable, sharded


def test_sampler_order_is_a_seeded_permutation_per_epoch():
    order = list(EpochSampler(1000, seed=7))
    assert sorted(order) == list(range(1000)) and order != sorted(order)
    assert list(EpochSampler(1000, seed=7)) == order
    assert list(EpochSampler(1000, seed=7, epoch=1)) != order
    assert list(EpochSampler(1000, seed=8)) != order


def test_sampler_resumes_at_any_position_and_shards_global_batches():
    full = list(EpochSampler(1000, seed=3, epoch=2))
    assert list(EpochSampler(1000, seed=3, epoch=2, start=371)) == full[371:]
    world, batch = 4, 5  # each rank reads batch samples; the global batch is world * batch
    shards = [list(EpochSampler(1000, 3, epoch=2, start=100, rank=r, world_size=world)) for r in range(world)]
    assert sum(map(len, shards)) == 900 and all(len(s) == len(EpochSampler(1000, 3, 2, 100, r, world))
                                                 for r, s in enumerate(shards))
    first_global_batch = sorted(i for shard in shards for i in shard[:batch])
    assert first_global_batch == sorted(full[100:100 + world * batch])


def test_grouped_sampler_batches_similar_lengths_in_random_order_and_still_resumes_and_shards():
    n = 2011  # 125 global batches of 16, sorted in two runs of up to 64 (EpochSampler.GROUP), and 11 left over
    lengths = np.random.default_rng(0).integers(20, 257, n)
    full = list(EpochSampler(n, seed=3, epoch=1, lengths=lengths, global_batch=16))
    assert sorted(full) == list(range(n))  # every sample once, the 11 that make no batch at the end
    batches = [lengths[full[i:i + 16]] for i in range(0, 2000, 16)]
    spread = np.mean([b.max() - b.min() for b in batches])
    assert spread < 10 and np.mean([b.max() - b.min() for b in np.split(lengths[:2000], 125)]) > 150
    longest = [b.max() for b in batches]
    assert longest != sorted(longest) and longest != sorted(longest, reverse=True)  # a step sees a random length
    assert list(EpochSampler(n, 3, epoch=1, start=1120, lengths=lengths, global_batch=16)) == full[1120:]
    shards = [list(EpochSampler(n, 3, 1, 1120, r, 2, lengths=lengths, global_batch=16)) for r in range(2)]
    assert sorted(shards[0][:8] + shards[1][:8]) == sorted(full[1120:1136])  # one global batch, split over the ranks
    assert list(EpochSampler(n, 3, epoch=2, lengths=lengths, global_batch=16)) != full


@pytest.mark.parametrize("num_samples, seed, epoch, start, rank, world_size", [
    (1, 0, 0, 0, 0, 1), (1000, 7, 0, 0, 0, 1), (100_003, 3, 2, 371, 1, 4), (300_000, 42, 5, 65_537, 1, 2)])
def test_sampler_order_is_unchanged(num_samples, seed, epoch, start, rank, world_size):
    # the order the sampler has always produced: a resumed run must see the samples it had not seen
    reference = np.random.default_rng([seed, epoch]).permutation(num_samples)[start + rank::world_size]
    order = list(EpochSampler(num_samples, seed, epoch, start, rank, world_size))
    assert order == reference.tolist() and all(type(i) is int for i in order[:10])


def test_sampler_hands_out_indices_lazily():
    n = 2_000_000
    tracemalloc.start()
    try:
        first = next(iter(EpochSampler(n, seed=1)))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert first == int(np.random.default_rng([1, 0]).permutation(n)[0])
    # the int32 permutation (8 MB) and one chunk of ints, not a list of the epoch (~70 MB)
    assert peak < 4 * n + 8 * 1024 * 1024

# -----------------------------------------------------------------------------
# the store: cached, rebuilt on change, memory-mapped, bad input


def encoded_one_by_one(path, kind):
    """The store's contents computed the plain way, one document and one token at a time."""
    tokens, lengths, masks = [], [], []
    if kind == "pretrain":
        bos, eos = TOKENIZER.token_to_id("<s>"), TOKENIZER.token_to_id("</s>")
        for text in corpus.iter_pretrain_texts(path):
            ids = [bos, *TOKENIZER.encode(text, add_special_tokens=False).ids, eos]
            tokens += ids
            lengths.append(len(ids))
    else:
        template = load_chat_template(TOKENIZER_DIR)
        for messages in corpus.iter_conversations(path):
            text, spans = render_with_spans(template, messages)
            encoding = TOKENIZER.encode(text, add_special_tokens=False)
            tokens += encoding.ids
            lengths.append(len(encoding.ids))
            masks.append([int(any(a <= start < b for a, b in spans)) for start, _ in encoding.offsets])
    return tokens, lengths, masks


@pytest.mark.parametrize("fixture, kind", [("pretrain_jsonl", "pretrain"), ("belle_jsonl", "sft"),
                                           ("chatterbot_jsonl", "sft")])
def test_store_equals_encoding_each_document_alone(request, tmp_path, monkeypatch, fixture, kind):
    path = request.getfixturevalue(fixture)
    monkeypatch.setattr(dataset, "BATCH_RECORDS", 97)  # several batches, the last one short
    store = build_store(path, TOKENIZER_DIR, kind, tmp_path)
    tokens, lengths, masks = encoded_one_by_one(path, kind)
    assert store.tokens.tolist() == tokens
    assert store.offsets.tolist() == np.cumsum([0, *lengths]).tolist()
    assert isinstance(store.offsets, np.memmap)
    if kind == "sft":
        assert store.mask.tolist() == [flag for mask in masks for flag in mask]
        assert store.first_trained.tolist() == [mask.index(1) for mask in masks]


def test_first_trained_position_of_each_document():
    mask = np.array([0, 0, 1, 1, 0, 0, 0, 1, 0, 0, 1], dtype=np.uint8)
    lengths = np.array([4, 2, 2, 3])  # the second document has no trained token: 0, as argmax gives
    assert dataset._first_trained(mask, lengths).tolist() == [2, 0, 1, 2]


def test_store_is_reused_and_rebuilt_when_data_or_tokenizer_change(tmp_path, capsys, pretrain_jsonl):
    data = tmp_path / "docs.jsonl"
    shutil.copy(pretrain_jsonl, data)
    first = build_store(data, TOKENIZER_DIR, "pretrain", tmp_path / "cache")
    assert "tokenising" in capsys.readouterr().err
    assert len(build_store(data, TOKENIZER_DIR, "pretrain", tmp_path / "cache")) == len(first)
    assert "tokenising" not in capsys.readouterr().err  # unchanged: read from the cache

    with open(data, "a", encoding="utf-8") as f:
        f.write(json.dumps({"text": "新加的一行。"}, ensure_ascii=False) + "\n")
    grown = build_store(data, TOKENIZER_DIR, "pretrain", tmp_path / "cache")
    assert "tokenising" in capsys.readouterr().err and len(grown) == len(first) + 1

    other_dir = tmp_path / "tokenizer"
    shutil.copytree(TOKENIZER_DIR, other_dir)
    spec = json.loads((other_dir / "tokenizer.json").read_text(encoding="utf-8"))
    vocab = spec["model"]["vocab"]
    by_id = {i: token for token, i in vocab.items()}
    a, b = by_id[int(first.tokens[1])], by_id[int(first.tokens[2])]  # swap two ids the data uses
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (other_dir / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False), encoding="utf-8")
    retokenised = build_store(data, other_dir, "pretrain", tmp_path / "cache")
    assert "tokenising" in capsys.readouterr().err
    assert not np.array_equal(retokenised.tokens, grown.tokens)
    # one store per file (and the folder's build lock), no leftovers
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [".build.lock", grown.dir.name]


def test_store_is_compact_and_pickles_without_its_tokens(cache, belle_jsonl):
    store = build_store(belle_jsonl, TOKENIZER_DIR, "sft", cache)
    assert store.tokens.dtype == np.uint16 and isinstance(store.tokens, np.memmap)
    assert isinstance(store.offsets, np.memmap) and isinstance(store.mask, np.memmap)
    assert (store.dir / "tokens.bin").stat().st_size == 2 * len(store.tokens)
    blob = pickle.dumps(store)  # what a spawned DataLoader worker receives
    assert len(blob) < 2000
    again = pickle.loads(blob)
    assert np.array_equal(again.tokens, store.tokens) and np.array_equal(again.mask, store.mask)


def test_bad_lines_are_skipped_and_counted(tmp_path, cache, capsys):
    good = [{"conversations": [{"from": "human", "value": f"问题{i}"}, {"from": "assistant", "value": f"回答{i}"}]}
            for i in range(30)]
    lines = [json.dumps(r, ensure_ascii=False).encode() for r in good]
    lines[3] = b'{"conversations": [{"from": "human", "value": "no reply"}]}'
    lines[5] = b"{not json"
    lines[8] = b'{"text": "\xff\xfe invalid utf-8"}'
    path = tmp_path / "mixed.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + b"\r\n".join(lines) + b"\r\n")  # a BOM and CRLF line ends are fine
    store = build_store(path, TOKENIZER_DIR, "sft", cache)
    assert len(store) == 27 and store.meta["skipped_lines"] == 3
    err = capsys.readouterr().err
    assert "mixed.jsonl: skipped 3 bad lines" in err and "4, 6, 9" in err
    replies = [trained_runs(*SFTDataset(store, 64)[i][1:]) for i in range(len(store))]
    assert replies[0] == ["回答0" + IM_END]


@pytest.mark.parametrize("content, kind, message", [
    (None, "pretrain", "no such file"),
    (b"", "pretrain", "file is empty"),
    (b'{"title": "no text"}\n' * 30, "pretrain", "unusable"),
    (b'{"text": "only text"}\n' * 3, "sft", "no usable record"),
])
def test_unusable_files_raise_naming_the_file(tmp_path, cache, content, kind, message):
    path = tmp_path / "input.jsonl"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises((FileNotFoundError, ValueError), match=f"input.jsonl.*{message}"):
        build_store(path, TOKENIZER_DIR, kind, cache)
    assert not any(p.name.startswith("input") for p in cache.iterdir())  # no half-built store left behind


def test_replay_mixes_pretraining_windows_weighted_like_an_average_reply(cache, belle_jsonl, pretrain_jsonl):
    sft_store = build_store(belle_jsonl, TOKENIZER_DIR, "sft", cache)
    sft = SFTDataset(sft_store, 64)
    pretrain = PretrainDataset(build_store(pretrain_jsonl, TOKENIZER_DIR, "pretrain", cache), 64)
    mixed = dataset.ReplayDataset(sft, sft_store, pretrain, share=0.2)
    assert len(mixed) == len(sft) + round(len(sft) / 4)  # a fifth of the samples are replayed
    assert all(torch.equal(mixed[i][0], sft[i][0]) for i in (0, len(sft) - 1))
    x, y, mask = mixed[len(mixed) - 1]
    assert torch.equal(x, pretrain[len(pretrain) - 1][0])  # spread over the whole corpus, to its end
    # a whole window weighs what an average conversation's trained targets weigh
    assert mask.is_floating_point() and mask.sum().item() == pytest.approx(sft_store.mask.sum() / len(sft_store))
    x, y, mask = collate_batch([mixed[0], mixed[len(sft)]])
    assert mask.is_floating_point() and torch.equal(mask[0, :len(sft[0][2])], sft[0][2].float())
    assert collate_batch([sft[0], sft[1]])[2].dtype == torch.long  # no replay: the mask stays an integer mask
    # --group_by_length reads each sample's length off the stores: the lengths the samples have
    held_in = dataset.ReplayDataset(holdout_split(sft, 0.2)[0], sft_store, pretrain, share=0.2)
    for ds in (mixed, held_in):
        assert sample_lengths(ds).tolist() == [len(ds[i][0]) for i in range(len(ds))]


def test_one_document_per_row_is_cut_or_padded_to_the_window(cache, pretrain_jsonl):
    store = build_store(pretrain_jsonl, TOKENIZER_DIR, "pretrain", cache)
    rows = dataset.DocumentDataset(store, 32)  # happy-llm's PretrainDataset (--packing false)
    assert len(rows) == len(store)
    lengths = [len(store.document(i)[0]) for i in range(len(store))]
    short, long = lengths.index(min(lengths)), lengths.index(max(lengths))
    assert min(lengths) < 33 < max(lengths)
    x, y, mask = rows[short]
    doc = torch.from_numpy(store.document(short)[0].astype(np.int64))
    assert len(x) == len(y) == len(mask) == 32  # every row a full window, however short its document
    assert torch.equal(x[:len(doc)], doc[:32]) and torch.equal(y[:len(doc) - 1], doc[1:])
    assert mask.sum() == len(doc) - 1 and not mask[len(doc) - 1:].any()  # the padding is never trained
    x, y, mask = rows[long]
    assert mask.all() and torch.equal(y, torch.from_numpy(store.document(long)[0][1:33].astype(np.int64)))
