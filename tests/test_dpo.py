"""DPO (dpo.py): the loss and its gradients equal the formula computed directly (and trl's
DPOTrainer loss), step 0 gives log 2, the pair formats are read with bad lines counted, and a run
on the shared loop reports the held-out metrics. Tiny models on the CPU; the runs are in-process."""

import copy
import json
import math
from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_RUN, write_jsonl
from conftest import TOKENIZER_DIR as TOKENIZER

import dpo
from core import checkpoint, corpus, lora, trainer
from dataset import SFTDataset, build_store, collate_batch
from dpo import PairDataset, build_pair_store, iter_preference_pairs
from k_model import ModelConfig, Transformer

PROMPT, CHOSEN, REJECTED = [1, 7, 3, 9, 12], [20, 21, 4], [30, 4]  # token ids; replies end with a stop id


def tiny(seed=0, vocab_size=97):
    torch.manual_seed(seed)
    return Transformer(ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=vocab_size,
                                   max_seq_len=32))


def pair_row(prompt, chosen, rejected, half=16):
    """One PairDataset-style sample [chosen | rejected], each half padded to `half` columns."""
    parts = []
    for reply in (chosen, rejected):
        tokens = torch.tensor(prompt + reply)
        mask = torch.zeros(len(tokens) - 1, dtype=torch.long)
        mask[len(prompt) - 1:] = 1  # the targets that are reply tokens
        parts.append([F.pad(t, (0, half - len(t))) for t in (tokens[:-1], tokens[1:], mask)])
    return tuple(torch.cat([parts[0][i], parts[1][i]]) for i in range(3))


def direct_logp(model, prompt, reply):
    """log pi(reply | prompt), from the logits of the unpadded sequence alone."""
    tokens = torch.tensor([prompt + reply])
    logp = torch.log_softmax(model(tokens)[0][0, :-1].float(), -1)
    return sum(logp[len(prompt) - 1 + i, token] for i, token in enumerate(reply))


@pytest.mark.parametrize("sft_weight", [0.0, 0.7], ids=["dpo", "dpo+sft"])
def test_loss_and_gradients_equal_the_formula_on_a_hand_built_pair(sft_weight):
    policy, reference, beta = tiny(0), tiny(1), 0.5
    other = ([2, 5, 8], [11, 4], [13, 14, 15, 4])
    x, y, mask = collate_batch([pair_row(PROMPT, CHOSEN, REJECTED), pair_row(*other)])
    metrics, loss = dpo.DPOLoss(policy, reference, beta, sft_weight)(x, y, mask)
    loss.backward()
    ours = {name: p.grad.clone() for name, p in policy.named_parameters()}

    policy.zero_grad()
    expected, margins, dpo_part = 0.0, [], 0.0
    for prompt, chosen, rejected in [(PROMPT, CHOSEN, REJECTED), other]:
        with torch.no_grad():
            ref_c, ref_r = direct_logp(reference, prompt, chosen), direct_logp(reference, prompt, rejected)
        chosen_logp = direct_logp(policy, prompt, chosen)
        chosen_ratio = chosen_logp - ref_c
        rejected_ratio = direct_logp(policy, prompt, rejected) - ref_r
        margin = beta * (chosen_ratio - rejected_ratio)
        expected = expected - F.logsigmoid(margin) - sft_weight * chosen_logp / len(chosen)
        margins.append(margin.item())
        dpo_part -= F.logsigmoid(margin).item()
    expected.backward()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert metrics["reward_margin"].item() == pytest.approx(sum(margins), rel=1e-4, abs=1e-6)
    # with the SFT term the DPO part is reported on its own (val_dpo_loss)
    assert metrics["dpo_loss"].item() == pytest.approx(dpo_part, rel=1e-5) if sft_weight else "dpo_loss" not in metrics
    for name, p in policy.named_parameters():
        assert torch.allclose(ours[name], p.grad, rtol=1e-4, atol=1e-7), name
    assert all(p.grad is None for p in reference.parameters())


def test_step_zero_is_log_two_with_a_copy_or_with_adapters_switched_off():
    batch = collate_batch([pair_row(PROMPT, CHOSEN, REJECTED), pair_row(PROMPT, REJECTED, CHOSEN)])
    policy = tiny()
    metrics, loss = dpo.DPOLoss(policy, copy.deepcopy(policy), beta=0.1)(*batch, reduction="mean")
    assert loss.item() == pytest.approx(math.log(2), abs=1e-6) and metrics["reward_margin"].item() == 0
    # LoRA: the reference is the policy with its adapters off; B = 0 makes them equal at step 0 ...
    adapted = lora.add_lora(tiny(), rank=4, alpha=8.0)
    objective = dpo.DPOLoss(adapted, None, beta=0.1)
    assert objective(*batch, reduction="mean")[1].item() == pytest.approx(math.log(2), abs=1e-6)
    # ... and once the adapters move, the reference stays the base
    with torch.no_grad():
        for layer in lora.lora_layers(adapted).values():
            layer.lora_B.weight.normal_(0.0, 0.2)
    with_copy = dpo.DPOLoss(adapted, copy.deepcopy(lora.merge_lora(copy.deepcopy(adapted))), beta=0.1)
    base = dpo.DPOLoss(copy.deepcopy(adapted), tiny(), beta=0.1)
    assert objective(*batch)[1].item() == pytest.approx(base(*batch)[1].item(), rel=1e-5)
    assert with_copy(*batch)[1].item() == pytest.approx(2 * math.log(2), abs=1e-5)


@pytest.mark.parametrize("sft_weight", [0.0, 0.7], ids=["sigmoid", "sigmoid+sft"])
def test_loss_equals_trl_dpo_trainer(tmp_path, sft_weight):
    trl = pytest.importorskip("trl")
    from datasets import Dataset
    from transformers import PreTrainedTokenizerFast

    from core.hf_llama import to_hf_llama
    policy, reference, beta = tiny(0, 6144), tiny(1, 6144), 0.3
    tokenizer = PreTrainedTokenizerFast.from_pretrained(TOKENIZER)
    # trl's "sft" term is the mean NLL over every chosen token of the batch, ours the mean over pairs of
    # each chosen reply's mean: the same when the chosen replies are equally long, as below
    losses = dict(loss_type=["sigmoid", "sft"], loss_weights=[1.0, sft_weight]) if sft_weight else {}
    # bf16=False: trl's configs default to bf16 autocast, which a CPU with AVX512-BF16/AMX then runs,
    # while ours computes in fp32 (1.7e-4 apart there, identical on a CPU without bf16)
    args = trl.DPOConfig(output_dir=str(tmp_path), beta=beta, report_to=[], use_cpu=True, per_device_train_batch_size=2,
                         bf16=False, **losses)
    hf_trainer = trl.DPOTrainer(model=to_hf_llama(policy), ref_model=to_hf_llama(reference), args=args,
                                processing_class=tokenizer,
                                train_dataset=Dataset.from_list([{"prompt": "a", "chosen": "b", "rejected": "c"}]))
    examples = [{"prompt_ids": PROMPT, "chosen_ids": CHOSEN, "rejected_ids": REJECTED},
                {"prompt_ids": [2, 5, 8], "chosen_ids": [11, 12, 4], "rejected_ids": [13, 14, 15, 4]}]
    inputs = trl.trainer.dpo_trainer.DataCollatorForPreference(pad_token_id=0)(examples)
    with torch.no_grad():
        theirs = hf_trainer.compute_loss(hf_trainer.model.eval(), inputs)
        ours = dpo.DPOLoss(policy.eval(), reference, beta, sft_weight)(
            *collate_batch([pair_row(e["prompt_ids"], e["chosen_ids"], e["rejected_ids"]) for e in examples]),
            reduction="mean")[1]
    assert theirs.item() == pytest.approx(ours.item(), rel=1e-4)
    assert abs(ours.item() - math.log(2)) > 1e-3  # two different models: not the trivial value


def test_pair_formats_are_read_and_bad_lines_counted(tmp_path):
    good = [{"prompt": "天气好吗", "chosen": "很好", "rejected": "不知道"},
            {"prompt": [{"role": "user", "content": "你好"}],
             "chosen": [{"role": "assistant", "content": "你好！"}], "rejected": [{"role": "assistant", "content": "走开"}]},
            {"chosen": [{"role": "user", "content": "1+1=?"}, {"role": "assistant", "content": "2"}],  # minimind's
             "rejected": [{"role": "user", "content": "1+1=?"}, {"role": "assistant", "content": "3"}]}]
    bad = [{"prompt": "x", "chosen": "y"},  # no rejected reply
           {"chosen": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
            "rejected": [{"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]},  # other prompt
           {"prompt": "x", "chosen": "y", "rejected": "y"},  # identical
           {"prompt": "x", "chosen": "", "rejected": "z"}]  # an empty reply
    path = write_jsonl(tmp_path / "pairs.jsonl", good[:1] + bad + good[1:])
    with open(path, "a", encoding="utf-8") as f:
        f.write("{not json\n")
    stats = Counter()
    pairs = list(iter_preference_pairs(path, stats))
    replies = [(c[-1]["content"], r[-1]["content"]) for c, r in pairs]
    assert replies == [("很好", "不知道"), ("你好！", "走开"), ("2", "3")]
    assert all(c[0]["role"] == "system" and c[:-1] == r[:-1] for c, r in pairs)
    assert stats == Counter({"ok": 3, "not a preference pair": 1, "chosen and rejected answer different prompts": 1,
                             "identical replies": 1, "no assistant turn": 1, "malformed JSON": 1})

    # each half of a pair sample is its conversation exactly as SFT would train it
    store = build_pair_store(path, TOKENIZER, tmp_path / "cache")
    pair_ds, sft_ds = PairDataset(store, 64), SFTDataset(build_store(store.meta["source"], TOKENIZER, "sft",
                                                                     tmp_path / "cache"), 64)
    assert len(pair_ds) == 3
    for i in range(3):
        row = pair_ds[i]
        for half in range(2):
            single = sft_ds[2 * i + half]
            for part in range(3):
                assert torch.equal(row[part][64 * half:64 * half + len(single[part])], single[part])
                assert row[part][64 * half + len(single[part]):64 * (half + 1)].eq(0).all()


@pytest.fixture(scope="module")
def positive_pairs_jsonl(sft_conversations, tmp_path_factory):
    """Sentiment questions whose preferred answer is always 正面: a preference even a tiny random
    model learns in a few steps, so a run shows its held-out loss fall below log 2."""
    records = [{"prompt": messages[1:-1], "chosen": "正面", "rejected": "负面"}
               for messages in sft_conversations if messages[-1]["content"] in corpus.LABELS]
    return write_jsonl(tmp_path_factory.mktemp("dpo") / "positive_pairs.jsonl", records[:300])


def records(out_dir):
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("lora_rank", [0, 4], ids=["full", "lora"])
def test_dpo_run_starts_at_log_two_and_learns_the_preference(tmp_path, monkeypatch, positive_pairs_jsonl, lora_rank):
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    base = Transformer(ModelConfig(dim=32, n_layers=1, n_heads=2, n_kv_heads=1, vocab_size=6144, max_seq_len=48))
    checkpoint.save_checkpoint(tmp_path / "sft", base, 10, tokenizer_dir=TOKENIZER)
    argv = [*TINY_RUN, "--data_path", str(positive_pairs_jsonl), "--init_from", "sft", "--cache_dir", "cache",
            "--max_steps", "6", "--eval_interval", "1000", "--val_fraction", "0.1", "--lora_rank", str(lora_rank)]
    result = trainer.main(dpo.__doc__, dpo.DEFAULTS, dpo.EMBEDDED, argv=argv, objective=dpo.DPO())
    log = records(tmp_path / "out" / "dpo")  # the default out_dir
    before, after = result["before"], result["after"]
    assert before["val_loss"] == pytest.approx(math.log(2), abs=1e-5) and before["val_reward_margin"] == 0
    assert set(after) == {"val_loss", "val_pref_acc", "val_reward_margin", "val_chosen_logp", "val_rejected_logp"}
    assert after["val_loss"] < math.log(2) - 0.01 and after["val_reward_margin"] > 0
    assert after["val_pref_acc"] > before["val_pref_acc"] and after["val_chosen_logp"] < 0
    losses = [r["loss"] for r in log if "loss" in r]
    assert losses[0] == pytest.approx(math.log(2), abs=1e-5)  # the first step's loss, before its update
    assert losses[-1] < losses[0]
    ckpt = checkpoint.latest_checkpoint(tmp_path / "out" / "dpo")
    assert checkpoint.is_lora(ckpt) == bool(lora_rank)
    # resumed, the reference is still the starting model, not the policy it resumes
    resumed = trainer.main(dpo.__doc__, dpo.DEFAULTS, dpo.EMBEDDED, argv=[*argv, "--max_steps", "8", "--resume"],
                           objective=dpo.DPO())
    assert resumed["before"]["val_reward_margin"] == pytest.approx(after["val_reward_margin"], rel=1e-5)
