"""
What the training loop reads: the datasets of a run (dataset.py's, from the embedded corpus or
--data_path, with the hold-out split and sft.py's replay), the order of the samples in each epoch,
and the DataLoaders that deal them out to the processes of a run.
"""

import hashlib
import itertools
import math
from functools import partial
from pathlib import Path

import numpy as np
import torch

from core import corpus
from core.runtime import all_reduce, local_rank_zero_first
from dataset import DocumentDataset, PretrainDataset, ReplayDataset, SFTDataset, build_store, collate_batch


class EpochSampler(torch.utils.data.Sampler):
    """The sample order of one epoch: a permutation fixed by (seed, epoch), read from global
    position `start` on, dealt round-robin to the ranks. The first global batch of B samples is
    permutation[start:start + B] whatever the number of ranks, and a resumed run passes the
    position it had reached, so it sees exactly the samples it had not yet seen.

    The permutation stays a numpy array (int32: 80 MB for 20M windows, where a list of Python ints
    took ~700 MB) and is handed out a chunk at a time, as the DataLoader asks for indices."""

    CHUNK = 1 << 16  # indices turned into Python ints at a time
    GROUP = 64  # global batches sorted by length together (transformers' group_by_length sorts 50)

    def __init__(self, num_samples, seed, epoch=0, start=0, rank=0, world_size=1, lengths=None, global_batch=1):
        self.num_samples, self.seed, self.epoch = num_samples, seed, epoch
        self.start, self.rank, self.world_size = start, rank, world_size
        self.lengths, self.global_batch = lengths, global_batch

    def _indices(self):
        # shuffling an arange in place draws the same numbers as permutation(n), so the order (and
        # with it every resumed run) is what it was when this made an int64 permutation
        order = np.arange(self.num_samples, dtype=np.int32 if self.num_samples < 1 << 31 else np.int64)
        rng = np.random.default_rng([self.seed, self.epoch])
        rng.shuffle(order)
        if self.lengths is not None:
            order = self._grouped_by_length(order, rng)
        return order[self.start + self.rank::self.world_size]

    def _grouped_by_length(self, order, rng):
        """Samples of similar length in the same global batch: a batch is padded to its longest
        sample, so a batch of SFT replies of ~90 tokens beside one 256-token window computes mostly
        padding. Each run of GROUP global batches of the shuffled order is sorted by length and cut
        into batches, and the batches are shuffled, so a step still sees a random length."""
        batch = self.global_batch
        whole = len(order) // batch * batch  # the samples that make no whole batch stay at the end
        for s in range(0, whole, self.GROUP * batch):
            run = order[s:min(s + self.GROUP * batch, whole)]
            order[s:s + len(run)] = run[np.argsort(self.lengths[run], kind="stable")]
        batches = order[:whole].reshape(-1, batch)
        rng.shuffle(batches)  # shuffles the rows: the batches, each kept whole
        return np.concatenate([batches.ravel(), order[whole:]])

    def __iter__(self):
        indices = self._indices()
        # Python ints (i * seq_len must not wrap at 2**31), one chunk at a time; chain walks each
        # chunk at C speed, where a generator yielding them one by one costs half the epoch's time
        chunks = (indices[i:i + self.CHUNK].tolist() for i in range(0, len(indices), self.CHUNK))
        return itertools.chain.from_iterable(chunks)

    def __len__(self):
        return len(range(self.start + self.rank, self.num_samples, self.world_size))

class Holdout(torch.utils.data.Dataset):
    """Every k-th sample of `ds` (the validation split) or all the others (the training split): a
    deterministic split spread over the whole file, in O(1) memory however large the corpus."""

    def __init__(self, ds, k, validation):
        self.ds, self.k, self.validation = ds, k, validation
        self.n_val = math.ceil(len(ds) / k)

    def __len__(self):
        return self.n_val if self.validation else len(self.ds) - self.n_val

    def source_index(self, i):
        """The index in `ds` of sample i (an int, or a numpy array of them). The training split's
        index i skips every multiple of k: 1..k-1, k+1..2k-1, ..."""
        return i * self.k if self.validation else i + i // (self.k - 1) + 1

    def __getitem__(self, i):
        return self.ds[self.source_index(i)]


def holdout_split(ds, val_fraction):
    """(training, validation) splits of ds: every (1 / val_fraction)-th sample is held out."""
    k = max(2, round(1 / val_fraction))
    return Holdout(ds, k, validation=False), Holdout(ds, k, validation=True)


def load_datasets(cfg, rt):
    """(train, validation) datasets of a run; tokenised once and cached by build_store. The
    embedded corpus has its own validation files; a --data_path is split by Holdout."""
    dataset_class = (SFTDataset if cfg.kind != "pretrain" else PretrainDataset if cfg.packing else DocumentDataset)
    with local_rank_zero_first(rt):
        try:
            if cfg.data_path is None:
                paths = corpus.embedded_paths()
                train_path = paths[f"{cfg.kind}_train"]
                val_path = paths["pretrain_val" if cfg.kind == "pretrain" else "sft_test"]
            else:
                train_path, val_path = Path(cfg.data_path), None
            stores = [build_store(p, cfg.tokenizer_dir, cfg.kind, cfg.cache_dir) for p in (train_path, val_path) if p]
            data = [dataset_class(store, cfg.max_seq_len) for store in stores]
        except (FileNotFoundError, ValueError) as e:
            raise SystemExit(str(e)) from None
    if val_path is None:
        data = list(holdout_split(data[0], cfg.val_fraction))
    if cfg.kind == "sft" and cfg.replay:
        data[0] = ReplayDataset(data[0], stores[0], replay_windows(cfg, rt), cfg.replay)
    return data[0], data[1]


def replay_windows(cfg, rt) -> PretrainDataset:
    """The pretraining text an SFT run replays: --replay_path, else the embedded pretraining corpus."""
    path = cfg.replay_path or corpus.embedded_paths()["pretrain_train"]
    with local_rank_zero_first(rt):
        try:
            return PretrainDataset(build_store(path, cfg.tokenizer_dir, "pretrain", cfg.cache_dir), cfg.max_seq_len)
        except (FileNotFoundError, ValueError) as e:
            raise SystemExit(f"--replay_path {e}") from None


def sample_lengths(ds) -> np.ndarray:
    """The token count of each sample of an SFT training set (X's length, as the collate pads it),
    read off the stores' offsets without loading a sample."""
    if isinstance(ds, ReplayDataset):
        return np.concatenate([sample_lengths(ds.sft), np.full(len(ds.replayed), ds.pretrain.seq_len)])
    if isinstance(ds, Holdout):  # the training split of a --data_path
        return sample_lengths(ds.ds)[ds.source_index(np.arange(len(ds)))]
    sizes = np.diff(np.asarray(ds.store.offsets))[ds.documents]
    return np.minimum(sizes - 1, ds.seq_len)


def train_loader(ds, cfg, rt, epoch, position):
    """This rank's share of the global batches of one epoch, from global sample `position` on; with
    --group_by_length, each global batch holds samples of similar length."""
    grouped = dict(lengths=sample_lengths(ds), global_batch=cfg.batch_size * cfg.accumulation_steps * rt.world_size
                   ) if cfg.group_by_length else {}
    sampler = EpochSampler(len(ds), cfg.seed, epoch=epoch, start=position, rank=rt.rank, world_size=rt.world_size,
                           **grouped)
    # its own generator: otherwise the loader draws its worker seed from the global RNG, and a
    # resumed run (which makes a new loader mid-epoch) would see a different dropout sequence
    return torch.utils.data.DataLoader(
        ds, batch_size=cfg.batch_size, sampler=sampler, collate_fn=partial(collate_batch, max_width=cfg.max_seq_len), drop_last=True,
        num_workers=cfg.num_workers, pin_memory=rt.device.type == "cuda",
        generator=torch.Generator().manual_seed(cfg.seed))


def eval_loader(ds, cfg, rt):
    """The same first samples of the validation set at every evaluation, whatever the number of
    processes (so the validation loss does not depend on it), sharded over the ranks."""
    n = min(len(ds), cfg.eval_batches * cfg.batch_size)
    return torch.utils.data.DataLoader(ds, batch_size=cfg.batch_size, sampler=range(rt.rank, n, rt.world_size),
                                       collate_fn=partial(collate_batch, max_width=cfg.max_seq_len), num_workers=0,
                                       generator=torch.Generator())  # see train_loader


def sample_digest(sample) -> str:
    """A short hash of one (X, Y, loss_mask) sample: which tokens a rank's store holds."""
    return hashlib.sha1(b"".join(torch.as_tensor(t).numpy().tobytes() for t in sample)).hexdigest()[:16]


def text_chars(loader, tokenizer, rt) -> int:
    """Characters of the text behind the trained targets of all ranks' validation samples: the
    denominator of bits per character. The samples are the same at every evaluation: counted once."""
    chars = sum(len(tokenizer.decode(row[m.bool()].tolist(), skip_special_tokens=True))
                for _, y, mask in loader for row, m in zip(y, mask))
    return int(all_reduce([chars], rt).item())
