"""The transformers.Trainer recipes (hf_pretrain.py, hf_sft.py): a few steps of each on tiny models,
checkpoints that reload, the SFT loss mask, a learned stop token, and agreement with our own loop."""

import json
import sys

import pytest
import torch
from conftest import REPO, write_jsonl
from conftest import TOKENIZER_DIR as TOKENIZER
from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

import hf_pretrain
import hf_sft

IM_END = "<|im_end|>"
TINY = ["--hidden_size", "64", "--num_layers", "2", "--num_heads", "4", "--num_kv_heads", "2",
        "--intermediate_size", "128"]
QUIET = ["--swanlab", "disabled", "--no-bf16", "--use_cpu", "--logging_steps", "2"]


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(TOKENIZER)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory, pretrain_jsonl):
    """hf_pretrain.py for 6 steps on the seq-monkey-shaped fixture: its output directory. SwanLab runs
    in its default offline mode here: a login prompt would hang the test, a login error fail it."""
    tmp = tmp_path_factory.mktemp("hf_pretrain")
    return hf_pretrain.main([
        "--data_path", str(pretrain_jsonl), "--out_dir", str(tmp / "out"),
        "--cache_dir", str(tmp / "cache"), "--block_size", "64", "--batch_size", "4", "--max_steps", "6",
        "--warmup_steps", "2", "--eval_steps", "3", "--save_steps", "3", "--max_eval_blocks", "8",
        "--sample_tokens", "8", *TINY, *QUIET[2:]])


def test_boolean_flags_really_parse():
    assert hf_pretrain.parse_args([]).bf16 is None  # auto
    assert hf_pretrain.parse_args(["--bf16"]).bf16 is True
    assert hf_pretrain.parse_args(["--no-bf16"]).bf16 is False
    assert hf_sft.parse_args(["--no-gradient_checkpointing"]).gradient_checkpointing is False
    assert hf_sft.parse_args(["--gradient_checkpointing"]).gradient_checkpointing is True


def test_pretrain_checkpoint_reloads(pretrained, tokenizer):
    model = AutoModelForCausalLM.from_pretrained(pretrained)
    reloaded = AutoTokenizer.from_pretrained(pretrained)
    assert model.config.model_type == "qwen2" and model.config.vocab_size == len(tokenizer)
    assert reloaded.pad_token_id == 0 and reloaded.eos_token_id == 2  # <unk> pads, </s> stays learnable
    assert sorted(p.name for p in pretrained.glob("checkpoint-*")) == ["checkpoint-3", "checkpoint-6"]
    assert list((pretrained / "swanlog").glob("run-*"))  # the offline SwanLab run, kept beside the model
    ids = torch.tensor([reloaded("<s>人工智能")["input_ids"]])
    assert torch.isfinite(model(ids).logits).all()


def test_pretrain_blocks_are_full_and_keep_short_documents(tmp_path, tokenizer):
    # 300 documents each far shorter than a block: joined per batch, they still fill blocks
    path = write_jsonl(tmp_path / "short.jsonl", [{"id": i, "title": "t", "tags": "", "text": f"北京市第{i}条新闻。"}
                                                  for i in range(300)])
    train, test = hf_pretrain.block_datasets(path, tokenizer, 32, None, str(tmp_path / "cache"))
    assert len(train) > 50 and len(test) > 3
    assert {len(ids) for ids in train["input_ids"]} == {32}
    assert train[0]["input_ids"][0] == tokenizer.bos_token_id


def test_pretrain_bad_inputs_name_the_file_and_the_fix(tmp_path, tokenizer):
    def error(path):
        with pytest.raises(SystemExit) as e:
            hf_pretrain.block_datasets(path, tokenizer, 32, None, str(tmp_path / "cache"))
        assert f"--data_path {path}:" in str(e.value) and "\n" not in str(e.value)
        return str(e.value)

    assert "no such file" in error(tmp_path / "missing.jsonl")
    assert "no such file" in error(tmp_path)  # a directory
    (tmp_path / "empty.jsonl").write_text("")
    assert "empty" in error(tmp_path / "empty.jsonl")
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "第一篇"}\n{"text": "第二\n', encoding="utf-8")
    assert "python deal_dataset.py chunk" in error(broken)
    path = write_jsonl(tmp_path / "sft.jsonl", [{"instruct": "a", "input": "", "label": "b"}] * 3)
    assert "need a 'text' field" in error(path)
    assert "lower --block_size" in error(write_jsonl(tmp_path / "tiny.jsonl", [{"text": "短"}] * 10))


def test_sft_bad_inputs_name_the_file_and_the_fix(tmp_path, tokenizer):
    collator = hf_sft.SFTCollator(tokenizer, max_len=64)

    def error(path):
        with pytest.raises(SystemExit) as e:
            hf_sft.build_datasets(path, collator, 0.1, str(tmp_path / "cache"))
        assert f"--data_path {path}:" in str(e.value) and "\n" not in str(e.value)
        return str(e.value)

    assert "no such file" in error(tmp_path / "missing.jsonl")
    (tmp_path / "empty.jsonl").write_text("")
    assert "empty" in error(tmp_path / "empty.jsonl")
    (tmp_path / "garbage.jsonl").write_text("not json\n{oops\n")
    assert '{"instruct", "input", "label"}' in error(tmp_path / "garbage.jsonl")  # the formats it reads
    with pytest.raises(SystemExit, match="no transformers model there; run `python hf_pretrain.py`"):
        hf_sft.load_model_and_tokenizer(tmp_path, None)


def test_hub_model_option_uses_that_config_and_tokenizer(tmp_path, tokenizer):
    # what --hub_model (e.g. a ModelScope download of Qwen2-0.5B) gives, offline: a directory holding a
    # config and a tokenizer that, like Qwen2's, has no BOS and pads with its EOS
    tokenizer.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**config, "pad_token": "</s>", "bos_token": None}))
    Qwen2Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                num_attention_heads=2, num_key_value_heads=1).save_pretrained(tmp_path)
    args = hf_pretrain.parse_args(["--hub_model", str(tmp_path), "--modelscope"])
    assert hf_pretrain.fetch_hub_model(args.hub_model, args.modelscope) == str(tmp_path)  # no download
    patched = hf_pretrain.load_tokenizer(args.hub_model)
    assert patched.pad_token == "<|pad|>" and patched.eos_token == "</s>"
    model = hf_pretrain.build_model(args, patched)
    assert model.config.hidden_size == 32 and model.config.num_hidden_layers == 1  # not the size flags
    assert model.config.vocab_size == len(patched) == len(tokenizer) + 1  # room for the added pad token
    assert model.config.pad_token_id == patched.pad_token_id != patched.eos_token_id
    # without a BOS, documents are still separated: each ends with EOS, whose label is kept
    docs = write_jsonl(tmp_path / "docs.jsonl", [{"text": f"北京市第{i}条新闻。"} for i in range(200)])
    train, test = hf_pretrain.block_datasets(docs, patched, 32, None, str(tmp_path / "cache"))
    blocks = torch.tensor([*train["input_ids"], *test["input_ids"]])
    assert (blocks == patched.eos_token_id).sum() >= 150
    batch = hf_pretrain.DataCollatorForLanguageModeling(patched, mlm=False)([{"input_ids": b} for b in blocks[:4]])
    assert (batch["labels"] == batch["input_ids"]).all()  # no token, EOS included, is masked out


def test_sft_gives_a_tokenizer_that_pads_with_a_stop_token_its_own_pad(tmp_path, tokenizer):
    Qwen2ForCausalLM(Qwen2Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=1)).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**config, "pad_token": IM_END}))
    model, patched = hf_sft.load_model_and_tokenizer(tmp_path, None)
    assert patched.pad_token == "<|pad|>" and patched.pad_token_id == len(tokenizer)
    assert model.get_input_embeddings().weight.shape[0] == len(patched)  # the new id has an embedding
    assert model.generation_config.pad_token_id == patched.pad_token_id



def test_collator_masks_exactly_prompt_and_padding(tokenizer):
    records = [{"instruct": "把这句话翻译成英文", "input": "今天天气很好", "label": "The weather is nice today."},
               {"instruct": "你好", "input": "", "label": "你好！有什么可以帮你？"}]
    collator = hf_sft.SFTCollator(tokenizer, max_len=256)
    batch = collator([{"messages": m} for m in map(lambda r: hf_sft.corpus.to_messages(r), records)])
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    for row, record in enumerate(records):
        ids, labels, mask = batch["input_ids"][row], batch["labels"][row], batch["attention_mask"][row]
        prompt = tokenizer.apply_chat_template(
            [{"role": "user", "content": f"{record['instruct']}\n{record['input']}" if record["input"]
              else record["instruct"]}], tokenize=False, add_generation_prompt=True)
        assert prompt.startswith("<|im_start|>system\n你是一个AI助手<|im_end|>\n")
        n_prompt = len(tokenizer(prompt)["input_ids"])
        n_real = int(mask.sum())
        assert (labels[:n_prompt] == -100).all()                       # the prompt is never trained
        assert (labels[n_real:] == -100).all() and (ids[n_real:] == tokenizer.pad_token_id).all()
        assert (labels[n_prompt:n_real] == ids[n_prompt:n_real]).all()  # the reply is, all of it
        assert tokenizer.decode(labels[labels != -100]) == record["label"] + IM_END
    assert batch["attention_mask"][1].sum() < batch["input_ids"].shape[1]  # row 1 was padded
    assert tokenizer.pad_token_id not in (tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids(IM_END))


def test_sft_reads_belle_and_alpaca_one_example_per_reply(tmp_path, tokenizer, belle_jsonl, alpaca_jsonl):
    collator = hf_sft.SFTCollator(tokenizer, max_len=256)
    examples = {}
    for path in (belle_jsonl, alpaca_jsonl):
        train, test = hf_sft.build_datasets(path, collator, 0.05, str(tmp_path / "cache"))
        examples[path] = len(train) + len(test)
        batch = collator([train[i] for i in range(4)])
        assert (batch["labels"] != -100).any(dim=1).all()  # every example trains some reply tokens
    # no prompt reaches 256 tokens here, so every reply is one example: alpaca has one per record,
    # belle's multi-turn dialogues have several
    assert examples[alpaca_jsonl] == 1000
    assert examples[belle_jsonl] == sum(m["role"] == "assistant" for c in hf_sft.corpus.iter_conversations(belle_jsonl)
                                        for m in c) > 1000


def test_sft_from_pretrain_checkpoint_saves_a_reloadable_model(pretrained, tmp_path):
    data = write_jsonl(tmp_path / "instruct.jsonl", [{"instruct": f"第{i}题", "input": "", "label": "答案"}
                                                      for i in range(20)])
    out = hf_sft.main(["--data_path", str(data), "--init_from", str(pretrained), "--out_dir", str(tmp_path / "sft"),
                       "--cache_dir", str(tmp_path / "cache"), "--max_steps", "2", "--eval_steps", "2",
                       "--save_steps", "2", "--max_len", "64", "--eval_size", "0.1", *QUIET])
    model, tokenizer = hf_sft.load_model_and_tokenizer(out, None)
    assert model.generation_config.eos_token_id == [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids(IM_END)]
    assert isinstance(hf_sft.infer(model, tokenizer, "第1题", max_new_tokens=4), str)


def test_sentiment_accuracy_draws_a_fair_subset(tmp_path, monkeypatch):
    # the embedded test file lists all 正面 questions first: the top 10 would all be 正面
    records = [{"instruct": f"判断下面这条评论的情感是正面还是负面。\n评论{i}", "input": "", "label": label}
               for label in ("正面", "负面") for i in range(20)]
    monkeypatch.setattr(hf_sft, "infer", lambda *args, **kwargs: "正面")
    accuracy, baseline, n = hf_sft.sentiment_accuracy(None, None, write_jsonl(tmp_path / "test.jsonl", records), 10)
    assert n == 10 and 0 < accuracy < 1 and baseline == max(accuracy, 1 - accuracy)


def test_sft_starts_from_an_exported_k_model(tmp_path, monkeypatch, belle_jsonl):
    # export_hf.py's output is a plain LlamaForCausalLM directory: hf_sft.py fine-tunes it as is
    import export_hf
    from core.checkpoint import save_checkpoint
    from k_model import ModelConfig, Transformer
    torch.manual_seed(0)
    model = Transformer(ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=128))
    save_checkpoint(tmp_path / "k", model, step=1, tokenizer_dir=TOKENIZER)
    monkeypatch.setattr(sys, "argv", ["export_hf.py", "--ckpt", str(tmp_path / "k"), "--out_dir", str(tmp_path / "hf")])
    export_hf.main()
    out = hf_sft.main(["--data_path", str(belle_jsonl), "--init_from", str(tmp_path / "hf"),
                       "--out_dir", str(tmp_path / "sft"), "--cache_dir", str(tmp_path / "cache"), "--max_steps", "2",
                       "--eval_steps", "2", "--save_steps", "2", "--max_len", "128", *QUIET])
    assert AutoModelForCausalLM.from_pretrained(out).config.model_type == "llama"


def test_sft_learns_to_stop_and_infer_returns_only_the_reply(tmp_path, tokenizer):
    # A tiny model trained on one fixed answer: it must reproduce it and then stop at <|im_end|>.
    # That needs <|im_end|> trained (pad != EOS) and infer() to cut the prompt off.
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    Qwen2ForCausalLM(config).save_pretrained(tmp_path / "init")
    tokenizer.save_pretrained(tmp_path / "init")
    data = write_jsonl(tmp_path / "instruct.jsonl", [{"instruct": f"请回答第{i}个问题", "input": "补充" * (i % 5),
                                                      "label": "好的，没问题"} for i in range(40)])
    out = hf_sft.main(["--data_path", str(data), "--init_from", str(tmp_path / "init"), "--out_dir",
                       str(tmp_path / "sft"), "--cache_dir", str(tmp_path / "cache"), "--max_steps", "60",
                       "--lr", "1e-2", "--warmup_steps", "5", "--eval_steps", "60", "--save_steps", "60",
                       "--eval_size", "0.1", "--max_len", "64", *QUIET])
    model, tokenizer = hf_sft.load_model_and_tokenizer(out, None)
    assert hf_sft.infer(model, tokenizer, "请回答第99个问题", max_new_tokens=20) == "好的，没问题"


def test_trainer_matches_our_loop_step_by_step(tmp_path, pretrain_jsonl):
    # bench/bench_crosscheck.py at toy size: same weights, batches, schedule and AdamW on both sides
    sys.path.insert(0, str(REPO / "bench"))
    import bench_crosscheck
    args = bench_crosscheck.parse_args(["--steps", "12", "--warmup", "3", "--batch", "4", "--seq", "64", "--dim", "64",
                                        "--n_layers", "2", "--eval_every", "6", "--val_windows", "8"])
    fixture = pretrain_jsonl
    _, loop, hf = bench_crosscheck.crosscheck(args, fixture, fixture, tmp_path / "cache", tmp_path / "out")
    assert hf["lrs"] == pytest.approx(loop["lrs"], rel=1e-9, abs=1e-12)  # cosine_with_min_lr == our schedule
    assert hf["losses"] == pytest.approx(loop["losses"], rel=1e-4)
    assert hf["vals"].keys() == loop["vals"].keys() == {6, 12}
    assert hf["vals"] == pytest.approx(loop["vals"], rel=1e-4)
    assert loop["vals"][12] < loop["vals"][6]  # and both actually learned
