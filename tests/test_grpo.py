"""GRPO (grpo.py, core/rewards.py): the loss on fixed replies equals trl's GRPOTrainer loss, the rewards
read the last number and the label as documented, the replies are model_sample.py's samples for the
same seed, and a run on the shared loop writes checkpoints and resumes with identical losses. Tiny
models on the CPU; the runs are in-process."""

import json
import shutil

import pytest
import torch
from conftest import TINY_RUN, write_jsonl
from conftest import TOKENIZER_DIR as TOKENIZER

import grpo
from core import checkpoint, rewards, trainer
from core.inference import TextGenerator, encode_chat
from k_model import ModelConfig, Transformer


def tiny(seed=0, vocab_size=6144, dim=64):
    torch.manual_seed(seed)
    return Transformer(ModelConfig(dim=dim, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=vocab_size,
                                   max_seq_len=64))

# -----------------------------------------------------------------------------
# rewards


@pytest.mark.parametrize("completion, answer, expected", [
    ("答案是 68<|im_end|>", "68", 1.0),
    ("没有数字<|im_end|>", "68", 0.0),  # no number
    ("", "68", 0.0),
    ("23 + 45 = 68", "68", 1.0),  # several numbers: the last counts
    ("68，不对，是 69", "68", 0.0),
    ("  6 8 ", "68", 0.0),  # digits apart are two numbers
    ("结果：\n 68 \n", "68", 1.0),  # whitespace around
    ("６８", "68", 1.0),  # full-width digits
    ("1,234", "1234", 1.0),  # thousands commas
    ("-12", "-12", 1.0), ("12", "-12", 0.0),  # negative numbers
    ("68.0", "68", 1.0),
    ("所以是 72 块", "她一共卖了 48 + 24 = 72 个\n#### 72", 1.0),  # GSM8K's answers end with the number
])
def test_arithmetic_reward_reads_the_last_number(completion, answer, expected):
    assert rewards.arithmetic("计算 23 + 45 = ?", completion, answer) == expected


@pytest.mark.parametrize("completion, answer, expected", [
    ("正面<|im_end|>", "正面", 1.1), ("正面", "正面", 1.0),  # the format reward for closing the turn
    ("负面<|im_end|>", "正面", 0.1),
    ("这条评论是正面的。<|im_end|>", "正面", 1.1),  # extra text around the label
    ("正面还是负面？<|im_end|>", "负面", 0.1),  # both labels: no answer
    ("<|im_end|>", "负面", 0.1), ("", "负面", 0.0),
])
def test_sentiment_reward(completion, answer, expected):
    assert rewards.sentiment("判断下面这条评论的情感是正面还是负面。\n很好", completion, answer) == pytest.approx(expected)


def test_arithmetic_problems_are_seeded_and_their_answers_right():
    problems = rewards.arithmetic_problems(3, 50)
    assert problems == rewards.arithmetic_problems(3, 50) != rewards.arithmetic_problems(4, 50)
    for question, answer in problems:
        a, op, b = question.removeprefix("计算 ").removesuffix(" = ?").split()
        assert int(answer) == (int(a) + int(b) if op == "+" else int(a) * int(b))


def test_custom_reward_from_a_file_and_one_line_errors(tmp_path):
    path = tmp_path / "my_reward.py"
    path.write_text("def shorter(prompt, completion, answer):\n    return -len(completion)\n")
    assert rewards.load_reward(f"{path}:shorter")("q", "abc", "a") == -3
    assert rewards.load_reward("arithmetic") is rewards.arithmetic
    for spec, fragment in [("nonsense", "not one of"), (f"{path}:longer", "no function longer"),
                           (f"{tmp_path}/none.py:f", "no such file")]:
        with pytest.raises(SystemExit, match=fragment):
            rewards.load_reward(spec)

# -----------------------------------------------------------------------------
# advantages, sampling, the loss


def test_group_advantages_and_equal_groups():
    scores = torch.tensor([1.0, 0.0, 0.0, 0.0, 0.1, 0.1, 0.1, 0.1])
    advantages, equal = grpo.group_advantages(scores, 4)
    assert equal == 1 and advantages[4:].eq(0).all()
    std = torch.tensor([1.0, 0, 0, 0]).std()  # unbiased, as trl
    assert torch.allclose(advantages[:4], (torch.tensor([1.0, 0, 0, 0]) - 0.25) / (std + 1e-4))


def test_replies_are_model_samples_for_the_same_seed(tmp_path):
    ckpt = checkpoint.save_checkpoint(tmp_path / "run", tiny(), step=1, tokenizer_dir=TOKENIZER)
    gen = TextGenerator(ckpt, device="cpu", dtype="float32")
    questions = ["计算 23 + 45 = ?", "你好"]
    sampling = dict(max_new_tokens=12, temperature=0.9, top_k=None, repetition_penalty=1.0)
    texts = gen.sft_sample(questions, num_samples=3, seed=7, **sampling)
    prompts = [encode_chat(gen.tokenizer, [{"role": "user", "content": q}]) for q in questions]
    stop_ids = (gen.im_end_id, gen.tokenizer.eos_token_id)
    replies = grpo.sample_replies(gen.model, prompts, 3, 12, 0.9, stop_ids, torch.Generator().manual_seed(7))
    assert [gen.tokenizer.decode(r, skip_special_tokens=True) for r in replies] == texts
    assert len(set(texts)) > 1  # sampled, not six copies of one reply
    assert all(len(r) == 12 or r[-1] in stop_ids for r in replies)  # a stopped reply keeps its stop token


def trl_inputs(prompt, replies, our_layout):
    """trl's completion-aligned tensors from ours: target t of our rows is completion token t - (P - 1)."""
    width = max(map(len, replies))
    ids = torch.tensor([r + [0] * (width - len(r)) for r in replies])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in replies])
    start = len(prompt) - 1
    return ids, mask, {name: t[:, start:start + width] for name, t in our_layout.items()}


@pytest.mark.parametrize("beta", [0.0, 0.04], ids=["no-kl", "kl"])
def test_loss_equals_trl_grpo_trainer(tmp_path, beta):
    trl = pytest.importorskip("trl")
    from datasets import Dataset
    from transformers import PreTrainedTokenizerFast

    from core.hf_llama import to_hf_llama
    policy, reference, temperature, epsilon = tiny(0), tiny(1), 0.7, 0.2
    tokenizer = PreTrainedTokenizerFast.from_pretrained(TOKENIZER)
    # bf16=False: trl's configs default to bf16 autocast, which a CPU with AVX512-BF16 would then run (see test_dpo.py)
    # beta=0 at construction: with a KL term trl loads a reference model by name; _compute_loss reads the
    # reference's log-probs from the inputs alone, so beta is set after
    args = trl.GRPOConfig(output_dir=str(tmp_path), beta=0.0, epsilon=epsilon, temperature=temperature,
                          num_generations=4, per_device_train_batch_size=4, max_completion_length=8, report_to=[],
                          use_cpu=True, bf16=False)
    hf_trainer = trl.GRPOTrainer(model=to_hf_llama(policy), reward_funcs=lambda completions, **kw: [0.0] * len(completions),
                                 args=args, processing_class=tokenizer,
                                 train_dataset=Dataset.from_list([{"prompt": "a"}] * 4))
    hf_trainer.beta = beta
    assert hf_trainer.loss_type == "dapo"  # trl's default, which ours is
    prompt, replies = [1, 7, 3, 9, 12], [[20, 21, 4], [30, 4], [40, 41, 42, 43, 4], [50, 51]]
    x, y, mask = grpo.reply_rows([prompt] * 4, replies, context=64)
    advantages = torch.tensor([1.2, -0.4, 0.3, -1.1])
    with torch.no_grad():
        logps = grpo.token_logps(policy, x, y, mask, temperature)[0]
        # old log-probs off the policy's, both ways, so that some ratios leave [1 - eps, 1 + eps] and the clip acts
        old = logps + 0.4 * torch.randn(logps.shape, generator=torch.Generator().manual_seed(0))
        ref = grpo.token_logps(reference, x, y, mask, temperature)[0]
        ours = grpo.GRPOLoss(policy.eval(), reference, beta, epsilon, temperature)(x, y, mask, advantages, old, ref,
                                                                                   reduction="mean")[1]
        ids, completion_mask, theirs_layout = trl_inputs(prompt, replies, {"old": old, "ref": ref})
        inputs = {"prompt_ids": torch.tensor([prompt] * 4), "prompt_mask": torch.ones(4, len(prompt), dtype=torch.long),
                  "completion_ids": ids, "completion_mask": completion_mask, "advantages": advantages,
                  "old_per_token_logps": theirs_layout["old"], "ref_per_token_logps": theirs_layout["ref"],
                  "num_items_in_batch": completion_mask.sum()}
        theirs = hf_trainer._compute_loss(hf_trainer.model.eval(), inputs)
    assert theirs.item() == pytest.approx(ours.item(), abs=1e-5, rel=1e-5)
    ratio = torch.exp(logps - old)[mask.bool()]
    assert ((ratio < 1 - epsilon) | (ratio > 1 + epsilon)).any()  # the clip was exercised
    assert abs(ours.item()) > 1e-3  # not the trivial value


def test_reply_rows_mask_the_reply_and_round_the_width_within_the_context():
    prompts, replies = [[1, 7, 3]] * 2, [[20, 21, 4], [30, 4]]
    x, y, mask = grpo.reply_rows(prompts, replies, context=64)
    assert x.shape == (2, 32)  # 5 tokens rounded up to PAD_MULTIPLE: one shape for many rollouts
    assert x[0, :5].tolist() == [1, 7, 3, 20, 21] and y[0, :5].tolist() == [7, 3, 20, 21, 4]
    assert mask[0].tolist()[:6] == [0, 0, 1, 1, 1, 0] and mask[1].tolist()[:5] == [0, 0, 1, 1, 0]
    assert grpo.reply_rows(prompts, replies, context=6)[0].shape == (2, 6)  # never past the context


def test_the_first_iteration_has_ratio_one_and_zero_advantages_give_only_the_kl():
    policy = tiny()
    x, y, mask = grpo.reply_rows([[1, 7, 3]] * 2, [[20, 21, 4], [30, 4]], context=64)
    loss = grpo.GRPOLoss(policy, tiny(1), beta=0.5, epsilon=0.2, temperature=1.0)
    with torch.no_grad():
        logps, ref = (grpo.token_logps(m, x, y, mask, 1.0)[0] for m in (policy, loss.reference))
    advantages = torch.tensor([1.0, -1.0])
    value = loss(x, y, mask, advantages, logps, ref)[1]
    kl = ((torch.exp(ref - logps) - (ref - logps) - 1) * mask).sum()
    # ratio 1: the policy term is -sum(A) over the tokens; A = +1 on 3 tokens, -1 on 2
    assert value.item() == pytest.approx(-(3 - 2) + 0.5 * kl.item(), rel=1e-5)
    assert loss(x, y, mask, torch.zeros(2), logps, ref)[1].item() == pytest.approx(0.5 * kl.item(), rel=1e-5)

# -----------------------------------------------------------------------------
# a run on the shared loop


@pytest.fixture(scope="module")
def questions_jsonl(tmp_path_factory):
    problems = rewards.arithmetic_problems(0, 60)
    return write_jsonl(tmp_path_factory.mktemp("grpo") / "questions.jsonl",
                       [{"question": q, "answer": a} for q, a in problems])


def records(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_run_logs_its_figures_and_resumes_with_identical_losses(tmp_path, monkeypatch, questions_jsonl):
    monkeypatch.chdir(tmp_path)
    checkpoint.save_checkpoint(tmp_path / "sft", tiny(dim=32), 10, tokenizer_dir=TOKENIZER)
    (tmp_path / "shorter.py").write_text("def shorter(prompt, completion, answer):\n    return -len(completion)\n")
    argv = [*TINY_RUN, "--data_path", str(questions_jsonl), "--init_from", "sft", "--dim", "32", "--n_layers", "2",
            "--n_heads", "4", "--n_kv_heads", "2", "--max_seq_len", "64", "--batch_size", "2", "--num_generations", "4",
            "--max_new_tokens", "6", "--reward", "shorter.py:shorter", "--grpo_iterations", "2", "--max_steps", "6",
            "--save_interval", "3", "--keep_checkpoints", "5", "--eval_interval", "1000", "--val_fraction", "0.1",
            "--eval_batches", "2", "--plot", "false"]
    result = trainer.main(grpo.__doc__, grpo.DEFAULTS, grpo.EMBEDDED, argv=argv, objective=grpo.GRPO())
    whole = tmp_path / "out" / "grpo"  # the default out_dir
    log = records(whole / "metrics.jsonl")
    steps = [r for r in log if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4, 5, 6]
    for r in steps:
        assert {"clip_frac", "kl", "entropy"} <= set(r) and r["kl"] >= 0
    sampled = [r for r in steps if "reward" in r]  # replies are sampled at steps 0, 2, 4 (logged after 1, 3, 5)
    assert [r["step"] for r in sampled] == [1, 3, 5]
    assert all({"reward_std", "zero_adv_share", "reply_len"} <= set(r) for r in sampled)
    assert steps[0]["clip_frac"] == 0 and steps[0]["kl"] == 0  # the first step: ratio 1, the policy is the reference
    assert set(result["after"]) == {"val_loss", "val_reward", "val_accuracy", "val_reply_len", "val_kl"}
    assert checkpoint.latest_checkpoint(whole).name == "ckpt-0000006"

    # a run stopped after its checkpoint at step 3 goes on from it: step 4 trains on the replies of step 2 again,
    # which come back from that checkpoint
    stopped = tmp_path / "out" / "stopped"
    shutil.copytree(whole, stopped)
    shutil.rmtree(stopped / "ckpt-0000006")
    resumed = trainer.main(grpo.__doc__, grpo.DEFAULTS, grpo.EMBEDDED, objective=grpo.GRPO(),
                           argv=[*argv, "--out_dir", str(stopped), "--resume"])
    again = [r for r in records(stopped / "metrics.jsonl") if "loss" in r]
    assert [(r["step"], r["loss"], r.get("reward")) for r in again] == [(r["step"], r["loss"], r.get("reward"))
                                                                        for r in steps]
    assert resumed["after"] == pytest.approx(result["after"])


def test_lora_reference_is_the_base_and_beta_zero_loads_no_reference(tmp_path, monkeypatch, questions_jsonl):
    from core import lora
    adapted = lora.add_lora(tiny(), rank=4, alpha=8.0)
    x, y, mask = grpo.reply_rows([[1, 7, 3]] * 2, [[20, 21, 4], [30, 4]], context=64)
    loss = grpo.GRPOLoss(adapted, None, beta=0.1, epsilon=0.2, temperature=1.0)
    with torch.no_grad():
        for layer in lora.lora_layers(adapted).values():  # the adapters move away from zero ...
            layer.lora_B.weight.normal_(0.0, 0.2)
        base = grpo.token_logps(tiny(), x, y, mask, 1.0)[0]
        policy = grpo.token_logps(adapted, x, y, mask, 1.0)[0]
    # ... and the reference stays the base: no second copy of the model
    assert torch.allclose(loss.reference_logps(x, y, mask), base, atol=1e-6)
    assert not torch.allclose(policy, base, atol=1e-3)

    monkeypatch.chdir(tmp_path)
    checkpoint.save_checkpoint(tmp_path / "sft", tiny(dim=32), 10, tokenizer_dir=TOKENIZER)
    argv = [*TINY_RUN, "--data_path", str(questions_jsonl), "--init_from", "sft", "--dim", "32", "--n_layers", "2",
            "--n_heads", "4", "--n_kv_heads", "2", "--max_seq_len", "64", "--batch_size", "2", "--num_generations", "2",
            "--max_new_tokens", "4", "--max_steps", "1", "--val_fraction", "0.1", "--eval_batches", "1", "--plot", "false"]
    objective = grpo.GRPO()
    trainer.main(grpo.__doc__, grpo.DEFAULTS, grpo.EMBEDDED, argv=[*argv, "--lora_rank", "4"], objective=objective)
    assert objective.loss.reference is None and checkpoint.is_lora(checkpoint.latest_checkpoint("out/grpo"))
    objective = grpo.GRPO()
    trainer.main(grpo.__doc__, grpo.DEFAULTS, grpo.EMBEDDED, argv=[*argv, "--beta", "0", "--out_dir", "nokl"],
                 objective=objective)
    assert objective.loss.reference is None and "kl" not in records(tmp_path / "nokl" / "metrics.jsonl")[1]


def test_fsdp_is_refused_in_one_line(tmp_path):
    from core import train_config
    checkpoint.save_checkpoint(tmp_path / "sft", tiny(dim=32), 10, tokenizer_dir=TOKENIZER)
    with pytest.raises(SystemExit, match="grpo.py with --parallel fsdp"):
        train_config.parse_config([*TINY_RUN, "--init_from", str(tmp_path / "sft"), "--parallel", "fsdp"],
                                  grpo.__doc__, grpo.DEFAULTS, grpo.EMBEDDED)
