"""TextGenerator: checkpoints and bare .pth files, safe loading, batched sampling, stop tokens,
FILE: prompts, streaming decode, history trimming, the chat loop and the CLI."""

import builtins
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import model_sample
from core.checkpoint import save_checkpoint
from core.inference import StreamDecoder, TextGenerator, encode_chat, fit_history
from k_model import ModelConfig, Transformer

REPO = Path(__file__).resolve().parents[1]
CONFIG = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=6144, max_seq_len=128)


def tiny(**kw):
    torch.manual_seed(0)
    return Transformer(ModelConfig(**{**CONFIG, **kw})).eval()


def always(token_id):
    """A model that says token_id whatever it reads: every layer adds nothing (wo = w2 = 0), every
    embedding is the same vector, and only the head's row token_id points along it."""
    model = tiny(tie_embeddings=False)
    with torch.no_grad():
        for layer in model.layers:
            layer.attention.wo.weight.zero_()
            layer.feed_forward.w2.weight.zero_()
        model.tok_embeddings.weight.fill_(1.0)
        model.output.weight.zero_()
        model.output.weight[token_id] = 1.0
    return model


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return save_checkpoint(tmp_path_factory.mktemp("run"), tiny(), step=1, tokenizer_dir=REPO / "tokenizer_k")


@pytest.fixture(scope="module")
def gen(ckpt):
    return TextGenerator(ckpt.parent, device="cpu")


def test_batched_samples_are_seeded_and_match_single_prompts(gen):
    texts = gen.pretrain_sample(["北京", "人工智能"], num_samples=3, max_new_tokens=8, seed=0)
    assert len(texts) == 6 and all(isinstance(t, str) for t in texts)
    assert gen.pretrain_sample(["北京", "人工智能"], num_samples=3, max_new_tokens=8, seed=0) == texts
    # greedy: the samples of a prompt agree, and a left-padded batch decodes like each prompt alone
    greedy = gen.pretrain_sample(["北京", "人工智能是一门"], num_samples=2, max_new_tokens=8, temperature=0)
    assert greedy[0] == greedy[1] and greedy[2] == greedy[3]
    assert greedy[0] == gen.pretrain_sample("北京", max_new_tokens=8, temperature=0)[0]
    assert greedy[2] == gen.pretrain_sample("人工智能是一门", max_new_tokens=8, temperature=0)[0]
    # the prompt as pretraining saw it: [<s>] + text
    ids = [1] + gen.tokenizer.encode("北京")
    assert greedy[0] == gen.tokenizer.decode(gen.model.generate([ids], 8, temperature=0, stop_ids=(2,))[0])


def test_sft_prompt_is_the_chat_template(gen):
    ids = encode_chat(gen.tokenizer, [{"role": "user", "content": "你好"}])
    assert gen.tokenizer.decode(ids) == \
        "<|im_start|>system\n你是一个AI助手<|im_end|>\n<|im_start|>user\n你好<|im_end|>\n<|im_start|>assistant\n"
    out = gen.model.generate([ids], 8, temperature=0, stop_ids=(4, 2))[0]
    assert gen.sft_sample("你好", max_new_tokens=8, temperature=0) == [gen.tokenizer.decode(out)]


def test_stop_tokens(gen, monkeypatch):
    hao = gen.tokenizer.convert_tokens_to_ids(gen.tokenizer.tokenize("好"))
    assert len(hao) == 1
    monkeypatch.setattr(gen, "model", always(hao[0]))
    assert gen.pretrain_sample("北京", max_new_tokens=5) == ["好" * 5]
    monkeypatch.setattr(gen, "model", always(2))  # </s> ends a document
    assert gen.pretrain_sample("北京", max_new_tokens=5) == [""]
    monkeypatch.setattr(gen, "model", always(4))  # <|im_end|> ends a reply
    assert gen.sft_sample("你好", max_new_tokens=5) == [""]


def test_file_prompt(gen, tmp_path):
    (tmp_path / "prompt.txt").write_text("北京\n", encoding="utf-8")
    assert gen.pretrain_sample(f"FILE:{tmp_path / 'prompt.txt'}", max_new_tokens=6, temperature=0) == \
        gen.pretrain_sample("北京", max_new_tokens=6, temperature=0)
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        gen.sft_sample(f"FILE:{tmp_path / 'missing.txt'}")


def test_happy_llm_pth_with_compile_prefix(tmp_path):
    model = tiny()
    torch.save({f"_orig_mod.{k}": v for k, v in model.state_dict().items()}, tmp_path / "pretrain.pth")
    tokenizer = REPO / "tokenizer_k"
    # a bare weights file may come from another tokenizer of the same size (happy-llm's): it must be named
    with pytest.raises(ValueError, match="no tokenizer beside it: pass --tokenizer DIR"):
        TextGenerator(tmp_path / "pretrain.pth", model_config=CONFIG)
    with pytest.raises(FileNotFoundError, match="config.json beside it or pass --model_config"):
        TextGenerator(tmp_path / "pretrain.pth", tokenizer)
    with pytest.raises(ValueError, match=r"unknown fields \['n_layer'\]"):
        TextGenerator(tmp_path / "pretrain.pth", tokenizer, model_config={**CONFIG, "n_layer": 2})
    with pytest.raises(ValueError, match="size mismatch"):
        TextGenerator(tmp_path / "pretrain.pth", tokenizer, model_config={**CONFIG, "dim": 128})
    gen = TextGenerator(tmp_path / "pretrain.pth", tokenizer, device="cpu", model_config=CONFIG)
    x = torch.randint(0, 6144, (2, 12))
    assert torch.equal(gen.model(x)[0], model(x)[0])
    torch.save(torch.zeros(3), tmp_path / "tensor.pth")
    with pytest.raises(ValueError, match="expected a state dict"):
        TextGenerator(tmp_path / "tensor.pth", tokenizer, model_config=CONFIG)


def test_pretrain_samples_start_with_the_tokenizers_own_bos(tmp_path, gen):
    """happy-llm's tokenizer has <|im_start|> as its BOS: its models get it, ours get <s>."""
    happy = tmp_path / "happy_tokenizer"
    gen.tokenizer.save_pretrained(happy)
    config = json.loads((happy / "tokenizer_config.json").read_text())
    (happy / "tokenizer_config.json").write_text(json.dumps({**config, "bos_token": "<|im_start|>"}))
    ckpt = gen.checkpoint
    theirs = TextGenerator(ckpt, happy, device="cpu")
    prompts = []
    theirs.model.generate = lambda batch, **kw: prompts.extend(batch) or [[] for _ in batch]
    theirs.pretrain_sample("北京", max_new_tokens=2)
    assert prompts[0][0] == 3 and gen.tokenizer.bos_token_id == 1


def test_weights_file_inside_a_checkpoint_and_misplaced_config(ckpt):
    gen = TextGenerator(ckpt / "model.safetensors", device="cpu")  # config.json and tokenizer beside it
    assert gen.model.output.weight is gen.model.tok_embeddings.weight and gen.tokenizer_dir == ckpt
    x = torch.randint(0, 6144, (1, 8))
    assert torch.equal(gen.model(x)[0], TextGenerator(ckpt, device="cpu").model(x)[0])
    with pytest.raises(ValueError, match="model config is for a bare weights file"):
        TextGenerator(ckpt, model_config=CONFIG)


def test_a_pickle_that_runs_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    torch.save({"tok_embeddings.weight": Exploit()}, tmp_path / "evil.pth")
    with pytest.raises(ValueError, match="refused, not a plain state dict.*posix.system"):
        TextGenerator(tmp_path / "evil.pth", REPO / "tokenizer_k", model_config=CONFIG)
    assert not marker.exists()


def test_stream_decoder_releases_only_complete_characters(gen):
    text = "😀𠀀好，世界 ok"  # 4-byte characters come out of byte-level BPE in pieces
    ids = gen.tokenizer.encode(text)
    decoder = StreamDecoder(gen.tokenizer)
    pieces = [decoder.push(i) for i in ids]
    assert "".join(pieces) == decoder.text == text
    assert not any("\ufffd" in p for p in pieces) and "" in pieces  # some tokens held back


def test_fit_history_drops_oldest_turns(gen):
    history = []
    for i in range(4):
        history += [{"role": "user", "content": f"问题{i}" * 10},
                    {"role": "assistant", "content": f"回答{i}" * 10}]
    history.append({"role": "user", "content": "最后的问题"})
    full = len(encode_chat(gen.tokenizer, history))
    ids, kept = fit_history(gen.tokenizer, history, budget=full)
    assert kept == history and len(ids) == full
    ids, kept = fit_history(gen.tokenizer, history, budget=full - 1)
    assert kept == history[2:] and len(ids) <= full - 1  # one user/assistant pair dropped
    ids, kept = fit_history(gen.tokenizer, history, budget=20)
    assert kept == history[-1:] and len(ids) > 20  # a lone turn is returned as is


def test_ctrl_c_stops_the_reply_not_the_chat(gen, monkeypatch, capsys):
    lines = iter(["你好", "再见", "/quit"])
    monkeypatch.setattr(builtins, "input", lambda prompt="": next(lines))
    hao = gen.tokenizer.convert_tokens_to_ids(gen.tokenizer.tokenize("好"))[0]
    prompts = []

    def stream(ids, **kw):
        prompts.append(gen.tokenizer.decode(ids))
        yield hao
        if len(prompts) == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(gen.model, "stream", stream)
    model_sample.chat(gen)
    out = capsys.readouterr().out
    assert out.count("tokens/s") == 2 and "[stopped]" in out
    assert "<|im_start|>assistant\n好<|im_end|>" in prompts[1]  # the partial reply stays in the history


def test_chat_over_stdin(ckpt):
    result = subprocess.run(
        [sys.executable, "model_sample.py", "--chat", "--ckpt", str(ckpt), "--max_new_tokens", "8",
         "--device", "cpu"],
        cwd=REPO, input="你好\n/reset\n今天天气怎么样？\n", capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr  # EOF after the last line ends the chat
    assert result.stdout.count("assistant> ") == 2 and result.stdout.count("tokens/s)") == 2
    assert "(history cleared)" in result.stdout


def test_cli_samples_the_newest_checkpoints(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["model_sample.py", "--device", "cpu"])
    with pytest.raises(SystemExit, match="no checkpoint in out/pretrain or out/sft: run `python pretrain.py` "
                                         "then `python sft.py` first") as e:
        model_sample.main()
    assert e.value.code != 0 and "\n" not in str(e.value)
    save_checkpoint("out/pretrain", tiny(), step=1, tokenizer_dir=REPO / "tokenizer_k")
    save_checkpoint("out/pretrain", tiny(), step=2, tokenizer_dir=REPO / "tokenizer_k")
    model_sample.main()
    out = capsys.readouterr().out
    assert "pretrain samples from out/pretrain/ckpt-0000002" in out and "run `python sft.py`" in out
    save_checkpoint("out/sft", tiny(), step=5, tokenizer_dir=REPO / "tokenizer_k")
    model_sample.main()
    out = capsys.readouterr().out
    assert "sft samples from out/sft/ckpt-0000005" in out
    assert all(p in out for p in model_sample.PRETRAIN_PROMPTS + model_sample.SFT_PROMPTS)


@pytest.mark.parametrize("flags, message", [(["--top_p", "0"], r"--top_p=0.0: must be in \(0, 1\]"),
                                            (["--temperature", "-1"], "--temperature=-1.0")])
def test_cli_sampling_flags_are_checked_in_one_line(ckpt, flags, message, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["model_sample.py", "--ckpt", str(ckpt), "--device", "cpu", *flags])
    with pytest.raises(SystemExit, match=message) as e:
        model_sample.main()
    assert "\n" not in str(e.value)


def test_seeded_samples_are_the_tokens_of_generation_generate(gen):
    """model_sample.py's TextGenerator decodes through generation.generate with its defaults: a seed
    gives the same tokens either way."""
    from core import generation
    from core.inference import SAMPLING
    texts = gen.pretrain_sample(["北京", "人工智能"], num_samples=2, max_new_tokens=8, seed=3)
    batch = [[1] + gen.tokenizer.encode(p) for p in ["北京", "人工智能"] for _ in range(2)]
    outputs = generation.generate(gen.model, batch, max_new_tokens=8, stop_ids=(2,),
                                  generator=torch.Generator().manual_seed(3), **SAMPLING)
    assert texts == [gen.tokenizer.decode(o, skip_special_tokens=True) for o in outputs]
    assert len(set(texts[:2])) == 2  # sampled, not greedy: the two samples of a prompt differ
