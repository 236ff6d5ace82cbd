"""bench/bench_quality.py's arms: the flags of the "happy-llm" arm over pretrain.py's embedded defaults must
give the tutorial's recipe, whatever those defaults become (Muon, replay and grouping are ours, not its)."""

import math
import sys

import pytest
from conftest import REPO
from conftest import TOKENIZER_DIR as TOKENIZER

import pretrain
import sft
from core import train_config

sys.path.insert(0, str(REPO / "bench"))
import bench_quality  # noqa: E402


@pytest.mark.parametrize("script", [pretrain, sft])
def test_the_happy_llm_arm_is_the_tutorials_recipe(script):
    stage = "pretrain" if script is pretrain else "sft"
    argv = ["--tokenizer_dir", str(TOKENIZER), *bench_quality.ARMS["happy-llm"][stage]]
    defaults = {**script.DEFAULTS, "init_from": None}  # sft.py's points at the user's out/pretrain when it exists
    cfg = train_config.parse_config(argv, "", defaults, script.EMBEDDED)
    assert (cfg.optimizer, cfg.learning_rate, cfg.weight_decay, cfg.warmup_iters) == ("adamw", 2e-4, 0, 0)
    assert (cfg.batch_size, cfg.accumulation_steps, cfg.max_seq_len, cfg.dtype) == (8, 1, 512, "float32")
    assert (cfg.epochs, cfg.fit_schedule, cfg.replay, cfg.group_by_length) == (1, False, 0, False)
    if script is pretrain:
        assert (cfg.packing, cfg.dim, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads) == (False, 256, 4, 4, 2)


def test_unigram_reference_is_add_one_character_frequencies(tmp_path):
    train, text = tmp_path / "train.jsonl", tmp_path / "text.jsonl"
    train.write_text('{"text": "天天"}\n{"text": "地"}\n', encoding="utf-8")  # 天 2, 地 1
    text.write_text('{"text": "天地人"}\n', encoding="utf-8")  # 人 is not in the training mix
    # alphabet {天, 地, 人}, 3 training characters: p = 3/6, 2/6, 1/6
    assert bench_quality.unigram_bpc(train, text) == pytest.approx(math.log2(6 ** 3 / (3 * 2 * 1)) / 3)


@pytest.mark.parametrize("extra, expected", [
    ([], "embedded.jsonl"),
    (["--dim", "192", "--data_path", "/data/mix.jsonl"], "/data/mix.jsonl"),
    (["--data_path=/data/mix.jsonl", "--dim", "192"], "/data/mix.jsonl"),
])
def test_unigram_reference_reads_the_mix_the_runs_pretrain_on(extra, expected):
    assert str(bench_quality.pretraining_mix(extra, "embedded.jsonl")) == expected
