"""How a run's settings resolve (core/train_config.py): flags over a script's defaults, over the
embedded run's, then the model size from a preset."""

from conftest import TOKENIZER_DIR as TOKENIZER

import pretrain
from core import train_config


def test_booleans_really_parse():
    base = ["--tokenizer_dir", str(TOKENIZER)]
    for text, value in [("False", False), ("true", True), ("0", False), ("yes", True), ("no", False)]:
        assert train_config.parse_config(base + ["--use_swanlab", text], "", {}, {}).use_swanlab is value
    assert train_config.parse_config(base + ["--use_swanlab"], "", {}, {}).use_swanlab is True
    assert train_config.parse_config(base, "", {}, {}).use_swanlab is False


def test_presets_and_defaults_resolve(pretrain_jsonl):
    base = ["--tokenizer_dir", str(TOKENIZER)]
    embedded = train_config.parse_config(base, "", {}, {"batch_size": 16})
    assert (embedded.dim, embedded.batch_size, embedded.vocab_size) == (train_config.PRESETS["tiny"]["dim"], 16, 6144)
    real = train_config.parse_config(base + ["--data_path", str(pretrain_jsonl)], "", {}, {"batch_size": 16})
    assert (real.dim, real.n_layers, real.n_heads, real.n_kv_heads, real.batch_size) == (1024, 18, 16, 8, 64)
    small = train_config.parse_config(base + ["--preset", "minimind-26m", "--n_layers", "4"], "", {}, {})
    assert (small.dim, small.n_layers, small.n_kv_heads) == (512, 4, 2)
    gpt2 = train_config.parse_config(base + ["--model", "gpt2", "--data_path", str(pretrain_jsonl)], "", {}, {})
    assert (gpt2.model_type, gpt2.dim, gpt2.n_layers, gpt2.n_heads) == ("gpt2", 512, 8, 16)


def test_embedded_recipe_on_your_own_data_is_the_embedded_default_with_another_file(pretrain_jsonl):
    argv = ["--tokenizer_dir", str(TOKENIZER)]
    default = train_config.parse_config(argv, "", pretrain.DEFAULTS, pretrain.EMBEDDED)
    mine = train_config.parse_config(argv + ["--data_path", str(pretrain_jsonl), "--embedded_recipe"], "",
                                     pretrain.DEFAULTS, pretrain.EMBEDDED)
    assert (mine.data_path, mine.dim, mine.optimizer, mine.time_limit) == (str(pretrain_jsonl), 192, "muon", 360)
    assert {**vars(mine), "data_path": None, "embedded_recipe": False} == vars(default)
