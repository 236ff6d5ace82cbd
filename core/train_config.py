"""
The configuration of a training run: model sizes by name, every setting as one dataclass whose
fields are also the command-line flags of pretrain.py and sft.py, and how the model size is
resolved (preset, flags, the --init_from checkpoint, the tokenizer's vocabulary).

    cfg = parse_config(sys.argv[1:], description, defaults, embedded, lora_defaults)

Precedence, lowest first: TrainConfig's defaults, the script's defaults (pretrain.py / sft.py), the
embedded-run defaults when --data_path is not given, sft.py's LoRA defaults with --lora_rank, the
flags. Size fields left None are then
filled from --preset, else the --init_from checkpoint, else the default preset.
"""

import argparse
import math
import types
from dataclasses import dataclass, field, fields
from pathlib import Path

from tokenizers import Tokenizer

from core import checkpoint, lora

# Model sizes by name; --dim, --n_layers, ... override single fields of a preset.
PRESETS = {
    "tiny": dict(model_type="k", dim=256, n_layers=4, n_heads=4, n_kv_heads=2, max_seq_len=256, dropout=0.0),
    "minimind-26m": dict(model_type="k", dim=512, n_layers=8, n_heads=8, n_kv_heads=2, max_seq_len=512,
                         dropout=0.0),
    "happy-llm-82m": dict(model_type="k", dim=768, n_layers=12, n_heads=16, n_kv_heads=8, max_seq_len=512,
                          dropout=0.0),
    "happy-llm-215m": dict(model_type="k", dim=1024, n_layers=18, n_heads=16, n_kv_heads=8, max_seq_len=512,
                           dropout=0.0),
    "gpt2": dict(model_type="gpt2", dim=512, n_layers=8, n_heads=16, max_seq_len=256, dropout=0.1),
}
SIZE_FIELDS = ("model_type", "dim", "n_layers", "n_heads", "n_kv_heads", "max_seq_len", "dropout", "vocab_size")
VOCAB_MULTIPLE = 64  # an embedding/head row count that is a multiple of 64 keeps matmuls on fast paths


def arg(default, help, **kw):
    """A config field that is also a command-line flag --name (kw: choices, aliases)."""
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class TrainConfig:
    """Every setting of a run. Each field is a flag --name; None means "derived", see its help."""
    kind: str = field(default="pretrain", metadata={"help": None})  # set by the script, not a flag
    # data
    data_path: str | None = arg(None, "training data: pretraining .jsonl/.txt or SFT .jsonl; "
                                      "None: the embedded default corpus")
    embedded_recipe: bool = arg(False, "with --data_path: keep the embedded run's defaults (the tiny model and "
                                       "its recipe for a CPU, each flag's 'embedded run' value below) instead of "
                                       "the real-data ones")
    val_fraction: float = arg(0.005, "share of the samples of --data_path held out for validation "
                                     "(every 1/val_fraction-th sample; the embedded corpus has its own split)")
    tokenizer_dir: str = arg("tokenizer_k", "tokenizer directory (train_tokenizer.py)")
    cache_dir: str = arg("data/cache", "where the tokenised data is cached")
    replay: float = arg(0.0, "SFT: this share of the training samples are pretraining windows (--replay_path), "
                             "so fine-tuning does not forget the pretrained text; 0: none")
    replay_path: str | None = arg(None, "SFT with --replay: the pretraining text to replay; None: the embedded "
                                        "pretraining corpus")
    packing: bool = arg(True, "pretraining: pack documents into full windows of max_seq_len (false: one document "
                              "per row, cut or padded to max_seq_len, as happy-llm's PretrainDataset)")
    group_by_length: bool = arg(False, "SFT: put samples of similar length in the same global batch (less "
                                       "padding to compute; the batches come in random order)")
    num_workers: int = arg(4, "DataLoader worker processes")
    # model
    preset: str | None = arg(None, "model size by name; None: tiny for the embedded corpus, the "
                                   "--init_from checkpoint's size, else happy-llm-215m (gpt2 for --model gpt2)",
                             choices=list(PRESETS))
    model_type: str | None = arg(None, "architecture: k (Llama2-style K-Model) or gpt2 (baseline); None: the "
                                       "preset's", choices=list(checkpoint.MODEL_TYPES), aliases=("--model",))
    dim: int | None = arg(None, "model width; None: the preset's")
    n_layers: int | None = arg(None, "number of layers; None: the preset's")
    n_heads: int | None = arg(None, "attention heads; None: the preset's")
    n_kv_heads: int | None = arg(None, "key/value heads (GQA, K-Model only); None: the preset's")
    max_seq_len: int | None = arg(None, "context length = training sequence length; None: the preset's")
    dropout: float | None = arg(None, "dropout; None: the preset's")
    vocab_size: int | None = arg(None, "embedding rows; None: the tokenizer's size rounded up to a multiple "
                                       f"of {VOCAB_MULTIPLE} (or the --init_from checkpoint's)")
    init_from: str | None = arg(None, "start from the weights of this checkpoint (a ckpt dir or an out_dir)")
    # optimization
    epochs: int = arg(1, "passes over the training data (unless --max_steps or --time_limit stop earlier)")
    max_steps: int | None = arg(None, "optimizer steps to run (overrides --epochs)")
    time_limit: float | None = arg(None, "seconds for the whole run, data preparation, compilation, evaluations "
                                         "and checkpoints included; the LR schedule is planned to end inside it")
    fit_schedule: bool = arg(True, "with --time_limit, plan the LR schedule to end inside it (false: keep the "
                                   "--epochs/--max_steps schedule and stop where the time runs out)")
    batch_size: int = arg(64, "samples per micro-batch per process")
    accumulation_steps: int = arg(8, "micro-batches per optimizer step")
    learning_rate: float = arg(2e-4, "peak learning rate")
    warmup_iters: int = arg(0, "linear warmup steps before the cosine decay")
    final_lr_frac: float = arg(0.1, "the cosine ends at learning_rate times this (happy-llm: 0.1)")
    weight_decay: float = arg(0.1, "AdamW weight decay, applied to matrices only")
    optimizer: str = arg("adamw", "adamw, or muon: Muon for the hidden matrices (at --muon_lr), AdamW for the "
                                  "embeddings, head and norms (core/optim.py)", choices=["adamw", "muon"])
    muon_lr: float = arg(0.02, "with --optimizer muon: the peak learning rate of the Muon matrices (the "
                               "schedule scales it as it scales --learning_rate)")
    embedding_lr: float | None = arg(None, "with --optimizer muon: the peak AdamW learning rate of the token "
                                           "embedding (tied to the output head); None: --learning_rate")
    grad_clip: float = arg(1.0, "clip the gradient norm to this (0: no clipping)")
    seed: int = arg(42, "seed of the initial weights and the data order")
    # LoRA (lora.py), DPO (dpo.py) and GRPO (grpo.py)
    lora_rank: int = arg(0, "LoRA: freeze the --init_from model and train rank-r adapters W + (alpha/r)*B*A "
                            "instead (sft.py then defaults to --init_from out/sft, else out/pretrain, --out_dir out/lora, "
                            "--learning_rate 2e-3, and --lora_embeddings when the base has not been through SFT); "
                            "0: off, every weight trains")
    lora_alpha: float = arg(16.0, "LoRA: the adapters' scale alpha (the update is multiplied by alpha/rank)")
    lora_targets: str = arg("wq,wk,wv,wo,w1,w2,w3", "LoRA: comma-separated linear layers to adapt (attention "
                                                    "wq,wk,wv,wo; SwiGLU w1,w2,w3)")
    lora_dropout: float = arg(0.0, "LoRA: dropout on the adapters' input")
    lora_embeddings: bool = arg(False, "LoRA: also train the token embedding (tied to the output head) in full, "
                                       "saved as peft's modules_to_save")
    beta: float = arg(0.1, "DPO, GRPO: how far the policy may move from the reference (larger: closer to it; "
                           "GRPO: the weight of its KL term, 0 switches the term and the reference off)")
    sft_weight: float = arg(0.0, "DPO: add this times the chosen reply's mean token NLL to the loss (RPO), "
                                 "which keeps DPO from lowering the chosen reply's likelihood")
    reward: str | None = arg(None, "GRPO: the reward, a name in core/rewards.py (sentiment, arithmetic) or "
                                   "path/to/file.py:function; None: sentiment, or arithmetic with --data_path")
    num_generations: int = arg(8, "GRPO: replies sampled per prompt (the group whose rewards are compared)")
    grpo_iterations: int = arg(1, "GRPO: optimizer steps on each batch of replies (mu; above 1 the clip acts, and "
                                  "the prompts dealt to the steps that reuse replies are passed over)")
    epsilon: float = arg(0.2, "GRPO: clip the policy ratio to [1 - epsilon, 1 + epsilon] (PPO's clip)")
    temperature: float = arg(1.0, "GRPO: the sampling temperature of the replies")
    max_new_tokens: int = arg(256, "GRPO: the longest reply sampled")
    # hardware
    device: str = arg("auto", "auto (cuda if available, else cpu), cpu, cuda, cuda:N")
    dtype: str = arg("auto", "auto: bfloat16 where the hardware has it, else float16 on CUDA, float32 on CPU",
                     choices=["auto", "bfloat16", "float16", "float32"])
    gpus: str | None = arg(None, "comma-separated GPU ids, e.g. 0,1: one DDP process per GPU")
    parallel: str = arg("ddp", "with several processes (--gpus 0,1, torchrun): ddp (each holds the whole model), fsdp "
                               "(each holds a shard of the weights, gradients and AdamW state: for models that do not "
                               "fit one GPU), or dp (nn.DataParallel in one process, with --gpus)",
                        choices=["ddp", "fsdp", "dp"])
    compile: bool | None = arg(None, "torch.compile the model; None: on for CUDA, off on the CPU (little gain there)")
    activation_checkpointing: bool = arg(False, "recompute each block's activations in the backward pass instead of "
                                                "keeping them: a larger --batch_size fits, for ~1/3 more compute")
    # evaluation, logging, checkpoints
    eval_interval: int = arg(1000, "evaluate every this many steps (and before the first and after the last)")
    eval_batches: int = arg(50, "at most this many batches per evaluation, shared by the processes")
    log_interval: int = arg(100, "log every this many steps")
    save_interval: int = arg(1000, "checkpoint every this many steps (and at the end)")
    keep_checkpoints: int = arg(3, "keep the newest this many checkpoints")
    out_dir: str = arg("out/pretrain", "output directory: checkpoints, metrics.jsonl, swanlog/")
    resume: bool = arg(False, "continue the run in --out_dir from its newest checkpoint; with a larger "
                              "--max_steps/--epochs (or another --time_limit) it trains longer")
    overwrite: bool = arg(False, "start afresh in an --out_dir that holds checkpoints, deleting them")
    plot: bool = arg(True, "draw the run's curves (metrics.jsonl) into out_dir/curves.png at the end")
    use_swanlab: bool = arg(False, "track the run with SwanLab")
    swanlab_mode: str = arg("offline", "offline (no account, sync later), local, cloud, disabled",
                            choices=["offline", "local", "cloud", "disabled"])

    def model_config(self) -> dict:
        """The keyword arguments of the model's config class (k_model.ModelConfig / gpt2_model.GPT2Config)."""
        config_fields = {f.name for f in fields(checkpoint.MODEL_TYPES[self.model_type][0])}
        return {name: getattr(self, name) for name in SIZE_FIELDS if name in config_fields}


def str2bool(text):
    value = text.strip().lower()
    if value in ("1", "true", "yes", "y", "on"):
        return True
    if value in ("0", "false", "no", "n", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false (or 1/0, yes/no), got {text!r}")


class OneLineParser(argparse.ArgumentParser):
    def error(self, message):  # one line naming the flag, not the usage block of 40 flags
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def parse_config(argv, description, defaults, embedded, lora_defaults=None) -> TrainConfig:
    """Flags over the script's defaults, over the embedded-run defaults when --data_path is not
    given or --embedded_recipe is. lora_defaults(flags given) -> the script's settings when
    --lora_rank is given (sft.py's).
    Model size fields left None are then filled from the preset or the init checkpoint."""
    parser = OneLineParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter,
                           argument_default=argparse.SUPPRESS)
    for f in fields(TrainConfig):
        if f.metadata.get("help") is None:
            continue
        default = defaults.get(f.name, f.default)
        shown = f"default: {default}" + (f"; embedded run: {embedded[f.name]}" if f.name in embedded else "")
        type_ = f.type.__args__[0] if isinstance(f.type, types.UnionType) else f.type  # str | None -> str
        kw = dict(type=type_, choices=f.metadata.get("choices"))
        if type_ is bool:  # --flag, --flag true, --flag False, --flag 0 all parse
            kw = dict(type=str2bool, nargs="?", const=True, metavar="BOOL")
        parser.add_argument(f"--{f.name}", *f.metadata.get("aliases", ()), dest=f.name,
                            help=f"{f.metadata['help']} ({shown})", **kw)
    given = vars(parser.parse_args(argv))
    lora_settings = lora_defaults(given) if given.get("lora_rank") and lora_defaults else {}
    embedded_run = "data_path" not in given or given.get("embedded_recipe", False)
    cfg = TrainConfig(**{**defaults, **(embedded if embedded_run else {}), **lora_settings, **given})
    for name in ("batch_size", "accumulation_steps", "epochs", "eval_interval", "eval_batches",
                 "log_interval", "save_interval", "keep_checkpoints"):
        if getattr(cfg, name) < 1:
            raise SystemExit(f"--{name} {getattr(cfg, name)}: must be at least 1")
    for name in ("learning_rate", "muon_lr", "embedding_lr"):
        if getattr(cfg, name) is not None and getattr(cfg, name) <= 0:
            raise SystemExit(f"--{name} {getattr(cfg, name)}: must be above 0 (a learning rate)")
    if cfg.max_steps is not None and cfg.max_steps < 1:
        raise SystemExit(f"--max_steps {cfg.max_steps}: must be at least 1")
    if cfg.data_path is not None and not Path(cfg.data_path).is_file():
        raise SystemExit(f"--data_path {cfg.data_path}: no such file")
    if cfg.group_by_length and cfg.kind != "sft":
        raise SystemExit(f"--group_by_length: for sft.py only ({cfg.kind}'s samples are not grouped); leave it out")
    if not 0 <= cfg.replay < 1:
        raise SystemExit(f"--replay {cfg.replay}: must be at least 0 and below 1 (a share of the samples)")
    if not 0 < cfg.val_fraction < 1:
        raise SystemExit(f"--val_fraction {cfg.val_fraction}: must be between 0 and 1")
    cfg = resolve_model_size(cfg, embedded_run)
    check_post_training(cfg)
    check_sharding(cfg)
    return cfg


def check_sharding(cfg):
    """What --parallel fsdp rules out: under it each process holds only a shard of every matrix."""
    if cfg.parallel != "fsdp":
        return
    # refused rather than gathered: Muon orthogonalises each whole update matrix (core/optim.py), and
    # gathering every matrix onto every process at each step would give back the memory FSDP saves
    if cfg.optimizer == "muon":
        raise SystemExit("--optimizer muon with --parallel fsdp: Muon needs whole matrices and FSDP keeps only shards "
                         "of them on each process; pass --optimizer adamw")
    if cfg.lora_rank:
        raise SystemExit("--lora_rank with --parallel fsdp: the frozen model and its small adapters fit where DDP "
                         "fits; drop --parallel fsdp")
    if cfg.kind == "grpo":  # each process decodes its own replies, for as many steps as they take
        raise SystemExit("grpo.py with --parallel fsdp: sampling runs the model a different number of times on each "
                         "process, which FSDP's weight gathers cannot follow; use --parallel ddp")


def check_post_training(cfg):
    """The LoRA and DPO flags: sane values, and a trained model to start from."""
    if (cfg.lora_rank < 0 or cfg.lora_alpha <= 0 or not 0 <= cfg.lora_dropout < 1 or cfg.beta < 0
            or (cfg.beta == 0 and cfg.kind == "dpo") or cfg.sft_weight < 0):
        raise SystemExit(f"--lora_rank {cfg.lora_rank} --lora_alpha {cfg.lora_alpha} --lora_dropout "
                         f"{cfg.lora_dropout} --beta {cfg.beta} --sft_weight {cfg.sft_weight}: need rank >= 0, "
                         "alpha > 0, 0 <= dropout < 1, beta > 0 (GRPO: >= 0), sft_weight >= 0")
    unknown = sorted(set(cfg.lora_targets.split(",")) - set(lora.TARGETS))
    if unknown:
        raise SystemExit(f"--lora_targets {cfg.lora_targets}: unknown {','.join(unknown)}; choose from "
                         f"{','.join(lora.TARGETS)}")
    if cfg.lora_embeddings and (not cfg.lora_rank or cfg.kind in ("dpo", "grpo")):
        raise SystemExit("--lora_embeddings: trains the embedding beside LoRA adapters (needs --lora_rank); not with "
                         "dpo.py or grpo.py, whose reference is the base with the adapters off")
    if cfg.lora_rank and cfg.model_type == "gpt2":
        raise SystemExit("--lora_rank with --model gpt2: LoRA adapts the K-Model (its adapters are saved for the "
                         "exported Llama); the gpt2 baseline has none")
    if cfg.num_generations < 2 or cfg.grpo_iterations < 1 or cfg.epsilon <= 0 or cfg.temperature <= 0 \
            or cfg.max_new_tokens < 1:
        raise SystemExit(f"--num_generations {cfg.num_generations} --grpo_iterations {cfg.grpo_iterations} --epsilon "
                         f"{cfg.epsilon} --temperature {cfg.temperature} --max_new_tokens {cfg.max_new_tokens}: need "
                         "a group of >= 2 replies, >= 1 iteration, epsilon > 0, temperature > 0, >= 1 new token")
    if (cfg.lora_rank or cfg.kind in ("dpo", "grpo")) and not cfg.init_from and not cfg.resume:
        raise SystemExit(f"{'--lora_rank' if cfg.lora_rank else cfg.kind + '.py'}: fine-tunes a trained model; pass "
                         "--init_from CKPT (e.g. out/pretrain or out/sft)")


def resolve_model_size(cfg, embedded_run):
    init = None
    if cfg.init_from:
        init = checkpoint.latest_checkpoint(cfg.init_from)
        if init is None:
            raise SystemExit(f"--init_from {cfg.init_from}: no checkpoint there (expected ckpt-*/ or "
                             "model.safetensors); train one first or pass another directory")
    if init is not None:  # the exact checkpoint, saved with the run (dpo.py's reference when resuming)
        cfg.init_from = str(init)
    if cfg.preset is None and init is not None:
        source = checkpoint.read_config(init)
    else:
        default = "tiny" if embedded_run else "gpt2" if cfg.model_type == "gpt2" else "happy-llm-215m"
        source = PRESETS[cfg.preset or default]
    for name in SIZE_FIELDS:
        if getattr(cfg, name) is None and name in source:
            setattr(cfg, name, source[name])
    size = tokenizer_size(cfg.tokenizer_dir)
    if cfg.vocab_size is None:
        cfg.vocab_size = VOCAB_MULTIPLE * math.ceil(size / VOCAB_MULTIPLE)
    if cfg.vocab_size < size:
        raise SystemExit(f"--vocab_size {cfg.vocab_size}: smaller than the tokenizer's {size} tokens")
    if cfg.model_type == "gpt2" and cfg.n_kv_heads not in (None, cfg.n_heads):
        raise SystemExit(f"--n_kv_heads {cfg.n_kv_heads}: the gpt2 baseline has one key/value head per head; "
                         "drop the flag")
    try:  # dim divisible by n_heads and the like, checked by the model's config class
        checkpoint.MODEL_TYPES[cfg.model_type][0](**cfg.model_config())
    except ValueError as e:
        raise SystemExit(f"model size flags: {e}") from None
    return cfg


def tokenizer_size(tokenizer_dir):
    path = Path(tokenizer_dir) / "tokenizer.json"
    if not path.is_file():
        raise SystemExit(f"--tokenizer_dir {tokenizer_dir}: no tokenizer.json there; run train_tokenizer.py "
                         "or pass the directory that holds it")
    return Tokenizer.from_file(str(path)).get_vocab_size(with_added_tokens=True)
