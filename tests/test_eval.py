"""eval.py: bits per character (exact for a uniform model, windows that score every token once,
batched = one at a time, a checkpoint and its transformers export agree), C-Eval-style multiple
choice (the prompt, the letter scoring, few-shot files, fitting the context, bad CSV files), and a
cross-check against lm-evaluation-harness where it is installed."""

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import eval as eval_command
from core import evaluation as ev
from core.checkpoint import TOKENIZER_FILES, save_checkpoint
from core.hf_llama import to_hf_llama
from k_model import ModelConfig, Transformer

REPO = Path(__file__).resolve().parents[1]
MCQ = REPO / "tests" / "mcq"
TEXTS = ["人工智能是计算机科学的一个分支。", "北京是中国的首都，也是一座历史悠久的城市。" * 6, "今天天气很好。",
         "The quick brown fox jumps over the lazy dog. 数字 12345 与标点！？", "长江" * 40]


def tiny(max_seq_len=32, **kw):
    torch.manual_seed(0)
    cfg = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=6144, max_seq_len=max_seq_len)
    model = Transformer(ModelConfig(**{**cfg, **kw}))
    with torch.no_grad():  # larger than the 0.02 init: logits far from uniform, so mistakes show
        for p in model.parameters():
            p.normal_(1.0 if p.dim() == 1 else 0.0, 0.3 if p.dim() == 1 else 0.15)
    return model.eval()


def saved(tmp_path, model):
    save_checkpoint(tmp_path / "run", model, step=1, tokenizer_dir=REPO / "tokenizer_k")
    return tmp_path / "run"


@pytest.fixture(scope="module")
def ours_and_export(tmp_path_factory):
    """A tiny K-Model checkpoint, its transformers export, and both loaded the way eval.py loads them."""
    tmp = tmp_path_factory.mktemp("export")
    run = saved(tmp, tiny(max_seq_len=32, tie_embeddings=False))
    ours = ev.load_ours(run, device="cpu")
    to_hf_llama(ours.model).save_pretrained(tmp / "hf")
    for name in TOKENIZER_FILES:
        if (REPO / "tokenizer_k" / name).exists():
            shutil.copy2(REPO / "tokenizer_k" / name, tmp / "hf" / name)
    return run, tmp / "hf", ours, ev.load_hf(tmp / "hf", device="cpu")


def write_jsonl(path, texts):
    path.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts), encoding="utf-8")
    return path


@pytest.mark.parametrize("n", [1, 5, 31, 32, 33, 64, 100])
def test_windows_score_every_token_once(n):
    ids = list(range(10, 10 + n))
    pieces = ev.windows(ids, 1, 32)
    assert [t for _, targets in pieces for t in targets] == ids
    for k, (inputs, targets) in enumerate(pieces):
        assert len(inputs) == len(targets) <= 32
        assert inputs[0] == (1 if k == 0 else ids[32 * k - 1])  # [start], then only the token before
        assert inputs[1:] == targets[:-1]


def test_uniform_model_gives_log2_vocab_per_token(tmp_path):
    model = tiny(max_seq_len=16, tie_embeddings=False)
    with torch.no_grad():
        model.output.weight.zero_()  # every logit 0: p = 1/V for every token
    lm = ev.load_ours(saved(tmp_path, model), device="cpu")
    r = ev.bits_per_char(lm, write_jsonl(tmp_path / "t.jsonl", TEXTS), batch_size=3)
    tokens = sum(len(lm.tokenizer.encode(t, add_special_tokens=False)) for t in TEXTS)
    assert r["tokens"] == tokens > 3 * 16  # some texts span several windows
    assert r["chars"] == sum(map(len, TEXTS)) and r["texts"] == len(TEXTS)
    assert r["bpc"] == pytest.approx(math.log2(6144) * tokens / r["chars"], rel=1e-6)


def test_one_window_matches_a_plain_forward_and_batching_changes_nothing(ours_and_export):
    _, _, lm, _ = ours_and_export
    model = lm.model
    nats, tokens = ev.text_nats(lm, TEXTS, batch_size=1)
    text = TEXTS[0]  # shorter than the context: one forward over [<s>] + text
    ids = torch.tensor([[1] + lm.tokenizer.encode(text, add_special_tokens=False)])
    with torch.inference_mode():
        reference = F.cross_entropy(model(ids[:, :-1])[0][0], ids[0, 1:], reduction="sum").item()
    assert nats[0] == pytest.approx(reference, rel=1e-6) and tokens[0] == ids.shape[1] - 1
    batched, _ = ev.text_nats(lm, TEXTS, batch_size=4)  # windows of several lengths padded together
    assert batched == pytest.approx(nats, rel=1e-5)


def test_checkpoint_and_its_export_give_the_same_bpc(ours_and_export, tmp_path, capsys):
    run, hf_dir, ours, theirs = ours_and_export
    path = write_jsonl(tmp_path / "t.jsonl", TEXTS)
    assert theirs.context == ours.context == 32 and theirs.start_id == ours.start_id == 1
    a, b = ev.bits_per_char(ours, path), ev.bits_per_char(theirs, path)
    assert a["tokens"] == b["tokens"] and abs(a["bpc"] - b["bpc"]) < 1e-4
    for flag, where in (("--ckpt", run), ("--hf", hf_dir)):  # the command line prints the same figure
        eval_command.main([flag, str(where), "--bpc", str(path), "--device", "cpu"])
        assert f"{a['bpc']:7.4f}" in capsys.readouterr().out


def test_txt_file_is_one_text_a_line(ours_and_export, tmp_path):
    _, _, lm, _ = ours_and_export
    (tmp_path / "t.txt").write_text("\n".join(TEXTS) + "\n\n", encoding="utf-8")
    assert ev.bits_per_char(lm, tmp_path / "t.txt") == ev.bits_per_char(lm, write_jsonl(tmp_path / "t.jsonl", TEXTS))


def test_ceval_prompt_and_letter_tokens(ours_and_export):
    _, _, lm, _ = ours_and_export
    shots = ev.read_mcq_csv(MCQ / "dev" / "history_dev.csv")[:1]
    item = ev.read_mcq_csv(MCQ / "history_val.csv")[1]
    assert item == {"question": "唐朝的都城是____。", "A": "洛阳", "B": "长安", "C": "开封", "D": "南京", "answer": "B"}
    ids, kept, cut = ev.mcq_prompt(ev.LM(**{**vars(lm), "context": 512}), "history", shots, item)
    assert (kept, cut) == (1, False)
    assert lm.tokenizer.decode(ids) == (
        "<s>以下是中国关于history考试的单项选择题，请选出其中的正确答案。\n\n"
        "中国历史上第一个王朝是____。\nA. 夏\nB. 商\nC. 周\nD. 秦\n答案：A\n\n"
        "唐朝的都城是____。\nA. 洛阳\nB. 长安\nC. 开封\nD. 南京\n答案：")
    assert lm.tokenizer.convert_ids_to_tokens(ev.choice_ids(lm)) == list("ABCD")


def test_mcq_log_probs_are_the_next_token_ones_and_the_best_letter_wins(ours_and_export):
    _, _, lm, _ = ours_and_export
    model = tiny(max_seq_len=512)  # every prompt with its 5 shots fits
    lm = ev.LM(**{**vars(lm), "model": model, "context": 512})
    items = ev.read_mcq_csv(MCQ / "history_val.csv")
    shots = ev.read_mcq_csv(MCQ / "dev" / "history_dev.csv")
    r = ev.score_mcq(lm, "history", items, shots, batch_size=3)
    letters = ev.choice_ids(lm)
    for item, logprobs, prediction in zip(items, r["logprobs"], r["predictions"]):
        ids, _, _ = ev.mcq_prompt(lm, "history", shots, item)
        with torch.inference_mode():
            reference = F.log_softmax(model(torch.tensor([ids]))[0][0, -1], dim=-1)[letters]
        assert logprobs == pytest.approx(reference.tolist(), abs=1e-5)
        assert prediction == "ABCD"[int(reference.argmax())]
    assert r["correct"] == sum(p == item["answer"] for p, item in zip(r["predictions"], items))


def test_accuracy_counts_per_subject_and_few_shot_files(ours_and_export, capsys):
    _, _, lm, _ = ours_and_export
    b = ev.choice_ids(lm)[1]

    def always_b(tokens):  # a model that answers B to everything
        logits = torch.zeros(*tokens.shape, 6144)
        logits[..., b] = 5.0
        return logits, None

    lm = ev.LM(**{**vars(lm), "model": always_b, "context": 512})
    results = ev.evaluate_mcq(lm, MCQ, shots=5)
    assert [(r["subject"], r["items"], r["correct"], r["fewer_shots"]) for r in results] == [
        ("geography", 4, 1, 0), ("history", 4, 1, 0)]  # one B answer in each, every prompt with its 5 shots
    eval_command.print_mcq(results, 5)
    out = capsys.readouterr().out
    assert "chance 25.0%" in out and "overall                 8     25.0%" in out
    assert "letters picked: A 0, B 8, C 0, D 0" in out


def test_few_shot_examples_dropped_then_prompt_cut_to_fit(ours_and_export):
    _, _, lm, _ = ours_and_export
    items = ev.read_mcq_csv(MCQ / "history_val.csv")
    shots = ev.read_mcq_csv(MCQ / "dev" / "history_dev.csv")
    full, _, _ = ev.mcq_prompt(ev.LM(**{**vars(lm), "context": 4096}), "history", shots, items[0])
    zero, _, _ = ev.mcq_prompt(ev.LM(**{**vars(lm), "context": 4096}), "history", [], items[0])
    between = ev.LM(**{**vars(lm), "context": len(full) - 1})
    ids, kept, cut = ev.mcq_prompt(between, "history", shots, items[0])
    assert kept == 4 and not cut and len(ids) <= len(full) - 1
    ids, kept, cut = ev.mcq_prompt(lm, "history", shots, items[0])  # context 32: shorter than any prompt
    assert len(zero) > 32 and (kept, cut) == (0, True)
    assert ids == [1] + zero[-31:]  # [start] and the prompt's tail, ending with 答案：


def test_ceval_layout_with_dev_beside_the_split(ours_and_export, tmp_path):
    (tmp_path / "val").mkdir()
    shutil.copy(MCQ / "history_val.csv", tmp_path / "val")
    shutil.copytree(MCQ / "dev", tmp_path / "dev")
    assert ev.mcq_subjects(tmp_path / "val") == [("history", tmp_path / "val" / "history_val.csv",
                                                  tmp_path / "dev" / "history_dev.csv")]


@pytest.mark.parametrize("content, message", [
    ("id,question,A,B,C,answer\n0,q,a,b,c,A\n", "bad.csv: no column 'd' in the header id,question,A,B,C,answer"),
    ("id,question,A,B,C,D,answer\n0,q,a,b,c,d,A\n1,q,a,b,c,d,E\n", "bad.csv row 3: answer 'E' is not one of A, B, C, D"),
    ("id,question,A,B,C,D,answer\n0,q,a,b,c,d,\n", "bad.csv row 2: answer '' is not one of A, B, C, D (C-Eval's test"),
    ("id,question,A,B,C,D,answer\n0,q,a,b,c,A\n", "bad.csv row 2: 6 fields but the header has 7"),
])
def test_bad_csv_is_one_line_naming_file_and_row(ours_and_export, tmp_path, content, message):
    run = ours_and_export[0]
    (tmp_path / "bad.csv").write_text(content, encoding="utf-8")
    with pytest.raises(SystemExit) as e:
        eval_command.main(["--ckpt", str(run), "--mcq", str(tmp_path), "--device", "cpu"])
    assert message in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("argv, message", [
    (["--hf", "/nonexistent/qwen", "--bpc", "x.jsonl"], "--hf /nonexistent/qwen: no such directory"),
    (["--bpc", "/nonexistent/x.jsonl"], "/nonexistent/x.jsonl: no such file"),
    (["--mcq", "/nonexistent"], "--mcq /nonexistent: no such directory"),
    (["--mcq", str(MCQ / "dev"), "--shots", "5"], "--shots 5: no few-shot file for geography"),
])
def test_bad_arguments_are_one_line(ours_and_export, argv, message):
    argv = argv if argv[0] == "--hf" else ["--ckpt", str(ours_and_export[0]), "--device", "cpu", *argv]
    with pytest.raises(SystemExit) as e:
        eval_command.main(argv)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_lm_eval_harness_gives_the_same_log_likelihoods(ours_and_export):
    """lm-evaluation-harness (an optional install) scores the same prompts and texts through its HFLM."""
    pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    _, hf_dir, _, lm = ours_and_export
    # max_length 512 on both sides: no cutting (transformers' Llama computes RoPE for any position)
    harness = HFLM(pretrained=str(hf_dir), device="cpu", batch_size=4, dtype="float32", max_length=512)
    items = ev.read_mcq_csv(MCQ / "geography.csv")
    shots = ev.read_mcq_csv(MCQ / "dev" / "geography.csv")[:1]
    lm = ev.LM(**{**vars(lm), "context": 512})
    ours = ev.score_mcq(lm, "geography", items, shots)["logprobs"]
    # the harness prepends no BOS to a context; "<s>" in the text becomes our start token
    requests = [Instance("loglikelihood", {}, ("<s>" + lm.tokenizer.decode(ev.mcq_prompt(lm, "geography", shots, item)[0][1:]),
                                              letter), i) for i, item in enumerate(items) for letter in "ABCD"]
    theirs = [logprob for logprob, _ in harness.loglikelihood(requests)]
    assert theirs == pytest.approx([x for row in ours for x in row], abs=1e-4)
    # each text in one window, after the same start token (<s>, the tokenizer's BOS)
    rolling = harness.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (t,), i) for i, t in enumerate(TEXTS)])
    assert [-x for x in rolling] == pytest.approx(ev.text_nats(lm, TEXTS)[0], rel=1e-5)


def test_sft_reports_the_held_out_news_bpc_of_its_start_and_end(ours_and_export, tmp_path, monkeypatch, capsys):
    import sft
    run, _, ours, _ = ours_and_export
    other = saved(tmp_path, tiny(max_seq_len=32, tie_embeddings=False, dim=32))
    path = write_jsonl(tmp_path / "news.jsonl", TEXTS)
    assert ev.news_bpc([run], path)[run] == pytest.approx(ev.bits_per_char(ours, path)["bpc"], rel=1e-6)
    first_two = write_jsonl(tmp_path / "two.jsonl", TEXTS[:2])
    assert ev.news_bpc([run], path, n_texts=2)[run] == pytest.approx(ev.bits_per_char(ours, first_two)["bpc"])
    monkeypatch.setattr(sft.corpus, "embedded_paths", lambda: {"pretrain_val": path})
    sft.report_news_bpc({"config": {"init_from": str(run)}, "checkpoint": str(other)})
    line = capsys.readouterr().out
    scores = ev.news_bpc([run, other], path)
    assert f"{run} {scores[run]:.3f} -> {other} {scores[other]:.3f}" in line and scores[run] != scores[other]


def test_generation_metrics_count_what_they_name():
    assert ev.repetition("abcdabcd", n=4) == (1, 5)  # abcd comes back once among 5 4-grams
    assert ev.repetition("abc", n=4) == (0, 0)
    assert ev.distinct(["aab", "ab"], 1) == pytest.approx(2 / 5)
    assert ev.distinct(["aab", "ab"], 2) == pytest.approx(2 / 3)


def test_gen_reports_stop_rate_and_examples_per_kind(ours_and_export, monkeypatch, capsys):
    _, _, ours, _ = ours_and_export
    items = ev.read_gen_prompts(ev.GEN_PROMPTS)
    assert {item["kind"] for item in items} == set(ev.GEN_KINDS)  # the shipped prompts cover every kind
    # a model whose every reply stops at once, and one that never stops: stop rate 100% and 0%
    im_end, eos = ours.generator.im_end_id, ours.tokenizer.eos_token_id
    for stop_at_once, rate in ((True, 1.0), (False, 0.0)):
        def fake_generate(prompts, max_new_tokens, stop_ids, **kw):
            assert im_end in stop_ids or stop_ids == (eos,)
            return [[] if stop_at_once else [7] * max_new_tokens for _ in prompts]
        monkeypatch.setattr(ours.model, "generate", fake_generate)
        report = ev.generation_report(ours.generator, items, max_new_tokens=5, samples=2)
        assert all(r["stop_rate"] == rate and r["replies"] == 2 * len(r["examples"]) for r in report.values())
    monkeypatch.undo()
    eval_command.main(["--ckpt", str(ours_and_export[0]), "--gen", "--gen_samples", "1", "--max_new_tokens", "4"])
    out = capsys.readouterr().out
    assert "stop rate" in out and "distinct-2" in out and "你好" in out
