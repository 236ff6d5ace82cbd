"""
Scoring language models: bits per character of any text, C-Eval / CMMLU multiple choice, generation
diagnostics, and the embedded SFT run's held-out sentiment accuracy. Our checkpoints and any
transformers causal LM go through the same code, each with its own tokenizer (see eval.py, which
prints these, for what each measure means and how it is computed).
"""

import csv
import itertools
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

from core import corpus
from core.generation import release_decoders
from core.inference import DTYPES, TextGenerator, encode_chat

CHOICES = ("A", "B", "C", "D")
CEVAL_HEADER = "以下是中国关于{subject}考试的单项选择题，请选出其中的正确答案。\n\n"
ANSWER_CUE = "答案："
TEXTS_PER_GROUP = 1000  # texts tokenised and scored together: a file of any size streams through
GEN_KINDS = ("chat", "sentiment", "continue")
GEN_PROMPTS = Path(__file__).resolve().parents[1] / "prompts" / "gen.jsonl"
ANSWER_BATCH = 50  # sentiment questions answered together: a batch's prefill holds batch x prompt x prompt scores
NEWS_TEXTS = 250  # held-out news paragraphs scored at the end of an embedded SFT run: seconds per model


@dataclass
class LM:
    """A causal LM and its tokenizer behind one interface."""
    name: str
    model: torch.nn.Module
    tokenizer: object
    context: int  # tokens per forward pass
    device: torch.device
    hf: bool = False  # a transformers model (else ours)
    generator: TextGenerator | None = None  # ours: for --gen

    @property
    def start_id(self) -> int:
        tok = self.tokenizer
        start = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
        if start is None:
            raise ValueError(f"{self.name}: its tokenizer has neither a BOS nor an EOS token to start a text with")
        return start

    def encode(self, text) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def logits(self, tokens, mask):
        """tokens, mask [B, T] (mask 0 on the right padding) -> logits [B, T, V]."""
        if self.hf:
            return self.model(input_ids=tokens, attention_mask=mask).logits
        # ours needs no mask: under causal attention a position never sees the padding after it
        return self.model(tokens)[0]


def load_ours(path, tokenizer_dir=None, device=None, dtype="float32", context=None, compile_step=None) -> LM:
    """A K-Model or GPT2 checkpoint (ckpt dir, run dir or weights file) with its own tokenizer;
    compile_step: as TextGenerator's (for generation_report)."""
    gen = TextGenerator(path, tokenizer_dir=tokenizer_dir, device=device, dtype=dtype, compile_step=compile_step)
    limit = gen.model.config.max_seq_len
    return LM(f"{gen.checkpoint} ({type(gen.model).__name__})", gen.model, gen.tokenizer,
              min(context or limit, limit), gen.device, generator=gen)


def load_hf(path, device=None, dtype="float32", context=None) -> LM:
    """Any transformers causal LM saved in a local directory, with the tokenizer saved beside it."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"--hf {path}: no such directory; download the model first, e.g. "
                                f"`huggingface-cli download Qwen/Qwen2.5-0.5B --local-dir {path}`")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[dtype], local_files_only=True)
    except OSError as e:
        raise FileNotFoundError(f"--hf {path}: not a transformers model directory ({str(e).splitlines()[0]})") from None
    c = model.config
    limit = getattr(c, "max_position_embeddings", None) or getattr(c, "n_positions", None) or context
    if limit is None:
        raise ValueError(f"--hf {path}: its config names no context length: pass --context")
    return LM(f"{path} ({type(model).__name__})", model.to(device).eval(), tokenizer, min(context or limit, limit),
              device, hf=True)


def iter_logits(lm, sequences, batch_size, desc=None):
    """Yield (index, logits [len, V] in fp32) for each token sequence. Sequences of similar length are
    batched together (longest first) and padded on the right: under causal attention padding after a
    position cannot change its logits, so a batch gives what one sequence at a time would."""
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]), reverse=True)
    # disable=None: a bar on a terminal only, none in a log file
    for start in tqdm(range(0, len(order), batch_size), desc=desc, disable=True if desc is None else None, leave=False):
        batch = order[start:start + batch_size]
        tokens = torch.zeros(len(batch), len(sequences[batch[0]]), dtype=torch.long)  # id 0: any id would do
        mask = torch.zeros_like(tokens)
        for row, i in enumerate(batch):
            tokens[row, :len(sequences[i])] = torch.tensor(sequences[i])
            mask[row, :len(sequences[i])] = 1
        with torch.inference_mode():
            logits = lm.logits(tokens.to(lm.device), mask.to(lm.device)).float()
        for row, i in enumerate(batch):
            yield i, logits[row, :len(sequences[i])]

# -----------------------------------------------------------------------------
# bits per character


def windows(ids, start_id, context):
    """(inputs, targets) pairs covering every token of ids once: targets ids[k*context:(k+1)*context],
    inputs the token before each target ([start] for the first)."""
    seq = [start_id] + ids  # seq[j] is the token before ids[j]
    pieces = []
    for i in range(0, len(ids), context):
        targets = ids[i:i + context]
        pieces.append((seq[i:i + len(targets)], targets))
    return pieces


def text_nats(lm, texts, batch_size=8, desc=None) -> tuple[list[float], list[int]]:
    """Per text: the total -ln p of its tokens, and how many tokens were scored."""
    ids = [lm.encode(t) for t in texts]
    pieces = [(t, w) for t, x in enumerate(ids) for w in windows(x, lm.start_id, lm.context)]
    nats = [0.0] * len(texts)
    for i, logits in iter_logits(lm, [inputs for _, (inputs, _) in pieces], batch_size, desc):
        t, (_, targets) = pieces[i]
        nats[t] += F.cross_entropy(logits, torch.tensor(targets, device=logits.device), reduction="sum").item()
    return nats, [len(x) for x in ids]


def bits_per_char(lm, path, batch_size=8, max_texts=None) -> dict:
    """BPC of the texts of a .jsonl ({"text"}) or .txt file (one text a line), read as corpus.py reads
    them; with max_texts, of the first max_texts texts only."""
    totals = {"nats": 0.0, "tokens": 0, "chars": 0, "texts": 0}
    group = []

    def score():
        nats, tokens = text_nats(lm, group, batch_size, desc=f"{Path(path).name} (texts {totals['texts'] + 1}-)")
        totals.update(nats=totals["nats"] + sum(nats), tokens=totals["tokens"] + sum(tokens),
                      chars=totals["chars"] + sum(map(len, group)), texts=totals["texts"] + len(group))
        group.clear()

    for text in itertools.islice(corpus.iter_pretrain_texts(path), max_texts):
        group.append(text)
        if len(group) == TEXTS_PER_GROUP:
            score()
    if group:
        score()
    return {**totals, "bpc": totals["nats"] / math.log(2) / totals["chars"],
            "bits_per_token": totals["nats"] / math.log(2) / totals["tokens"]}

# -----------------------------------------------------------------------------
# multiple choice


def read_mcq_csv(path) -> list[dict]:
    """Questions {"question", "A", "B", "C", "D", "answer"} of a C-Eval or CMMLU CSV file."""
    path = Path(path)
    hint = "expected C-Eval's header id,question,A,B,C,D,answer or CMMLU's ,Question,A,B,C,D,Answer"
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:  # -sig: a spreadsheet's BOM is dropped
            rows = list(csv.reader(f))
    except (UnicodeDecodeError, csv.Error) as e:
        raise ValueError(f"{path}: not a UTF-8 CSV file ({e})") from None
    if not rows:
        raise ValueError(f"{path}: empty file; {hint}")
    columns = {name.strip().lower(): i for i, name in enumerate(rows[0])}
    missing = [name for name in ("question", "a", "b", "c", "d", "answer") if name not in columns]
    if missing:
        raise ValueError(f"{path}: no column {missing[0]!r} in the header {','.join(rows[0])}; {hint}")
    items = []
    for row_number, row in enumerate(rows[1:], 2):  # row 1 is the header, as a spreadsheet counts
        if not any(cell.strip() for cell in row):
            continue
        if len(row) != len(rows[0]):
            raise ValueError(f"{path} row {row_number}: {len(row)} fields but the header has {len(rows[0])}")
        item = {key: row[columns[key.lower()]].strip() for key in ("question", *CHOICES, "answer")}
        item["answer"] = item["answer"].upper()
        if item["answer"] not in CHOICES:
            why = " (C-Eval's test split has no public answers: evaluate its val split)" if not item["answer"] else ""
            raise ValueError(f"{path} row {row_number}: answer {item['answer']!r} is not one of A, B, C, D{why}")
        items.append(item)
    if not items:
        raise ValueError(f"{path}: a header but no questions")
    return items


def format_question(item, with_answer) -> str:
    text = item["question"] + "".join(f"\n{c}. {item[c]}" for c in CHOICES) + "\n" + ANSWER_CUE
    return text + item["answer"] + "\n\n" if with_answer else text


def mcq_prompt(lm, subject, shots, item) -> tuple[list[int], int, bool]:
    """Token ids of the prompt with as many of the few-shot examples as fit in the context, the
    number of examples kept, and whether the prompt had to be cut to its tail even without any."""
    for k in range(len(shots), -1, -1):
        text = (CEVAL_HEADER.format(subject=subject) + "".join(format_question(s, True) for s in shots[:k])
                + format_question(item, False))
        ids = [lm.start_id] + lm.encode(text)
        if len(ids) <= lm.context:
            return ids, k, False
    return [lm.start_id] + ids[len(ids) - lm.context + 1:], 0, True


def choice_ids(lm) -> list[int]:
    """The token each letter becomes right after 答案： (tokenised together, as the model saw the
    few-shot answers): one token per letter, else the letters cannot be compared in one forward."""
    cue = lm.encode(ANSWER_CUE)
    ids = []
    for letter in CHOICES:
        full = lm.encode(ANSWER_CUE + letter)
        if len(full) != len(cue) + 1 or full[:len(cue)] != cue:
            raise ValueError(f"{lm.name}: its tokenizer does not add {letter!r} after {ANSWER_CUE!r} as one token "
                             f"({cue} -> {full}): this letter-scoring cannot rank the choices")
        ids.append(full[-1])
    return ids


def mcq_subjects(folder) -> list[tuple[str, Path, Path | None]]:
    """(subject, questions file, few-shot file or None) for every CSV in folder."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"--mcq {folder}: no such directory (expected a folder of CSV files, "
                                "e.g. C-Eval's val/ or CMMLU's test/)")
    files = sorted(folder.glob("*.csv"))
    if not files:
        raise FileNotFoundError(f"--mcq {folder}: no .csv files in it (expected C-Eval's val/ or CMMLU's test/)")
    dev_dir = folder / "dev" if (folder / "dev").is_dir() else folder.parent / "dev"
    if dev_dir.resolve() == folder.resolve():  # evaluating dev/ itself: a question must not be its own example
        dev_dir = None
    subjects = []
    for path in files:
        subject = re.sub(r"_(val|dev|test)$", "", path.stem)
        names = (f"{subject}_dev.csv", f"{subject}.csv")
        dev = next((dev_dir / n for n in names if dev_dir and (dev_dir / n).is_file()), None)
        subjects.append((subject, path, dev))
    return subjects


def score_mcq(lm, subject, items, shots=(), batch_size=8) -> dict:
    """Log-probabilities of the four letters for each question, the predictions and the accuracy."""
    letters = choice_ids(lm)
    prompts = [mcq_prompt(lm, subject, shots, item) for item in items]
    logprobs = [None] * len(items)
    for i, logits in iter_logits(lm, [ids for ids, _, _ in prompts], batch_size):
        logprobs[i] = F.log_softmax(logits[-1], dim=-1)[letters].tolist()
    predictions = [CHOICES[max(range(4), key=lp.__getitem__)] for lp in logprobs]
    correct = sum(p == item["answer"] for p, item in zip(predictions, items))
    return {"subject": subject, "items": len(items), "correct": correct, "accuracy": correct / len(items),
            "logprobs": logprobs, "predictions": predictions,
            "fewer_shots": sum(k < len(shots) for _, k, _ in prompts), "cut": sum(cut for _, _, cut in prompts)}


def evaluate_mcq(lm, folder, shots=0, batch_size=8) -> list[dict]:
    results = []
    for subject, path, dev in tqdm(mcq_subjects(folder), desc="subjects", leave=False):
        if shots and dev is None:
            raise FileNotFoundError(f"--shots {shots}: no few-shot file for {subject} (looked for "
                                    f"{subject}_dev.csv and {subject}.csv in {Path(folder) / 'dev'} and "
                                    f"{Path(folder).parent / 'dev'}); pass --shots 0")
        examples = read_mcq_csv(dev)[:shots] if shots else []
        results.append(score_mcq(lm, subject, read_mcq_csv(path), examples, batch_size))
    return results


# -----------------------------------------------------------------------------
# generation: does the model stop, and does it repeat itself?


def read_gen_prompts(path) -> list[dict]:
    """{"kind", "prompt"} lines: kind chat or sentiment (answered through the chat template, a reply
    ends at <|im_end|>) or continue (raw continuation after <s>, as pretraining saw text; ends at </s>)."""
    items = []
    for i, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            item = json.loads(line)
            if item.get("kind") not in GEN_KINDS or not isinstance(item.get("prompt"), str):
                raise ValueError(f"{path} line {i}: expected {{\"kind\": one of {GEN_KINDS}, \"prompt\": text}}")
            items.append(item)
    return items


def repetition(text, n=4) -> tuple[int, int]:
    """(n-grams of characters in text that repeat an earlier one of the same text, all its n-grams)."""
    grams = [text[i:i + n] for i in range(len(text) - n + 1)]
    return len(grams) - len(set(grams)), len(grams)


def distinct(texts, n) -> float:
    """distinct-n (Li et al. 2016): distinct character n-grams over all n-grams of all replies."""
    grams = [t[i:i + n] for t in texts for i in range(len(t) - n + 1)]
    return len(set(grams)) / max(len(grams), 1)


def generation_report(gen, items, max_new_tokens=128, samples=4, seed=0, **sampling) -> dict:
    """Per kind of prompt: every prompt answered `samples` times with the given sampling settings;
    stop rate (the share of replies that end with their stop token before max_new_tokens), mean reply
    length in characters, distinct-1/2 over all replies, and the repeated 4-gram rate."""
    tok = gen.tokenizer
    report = {}
    for kind in GEN_KINDS:
        prompts = [item["prompt"] for item in items if item["kind"] == kind]
        if not prompts:
            continue
        if kind == "continue":
            ids, stops = [[tok.bos_token_id] + tok.encode(p) for p in prompts], (tok.eos_token_id,)
        else:
            ids = [encode_chat(tok, [{"role": "user", "content": p}]) for p in prompts]
            stops = (gen.im_end_id, tok.eos_token_id)
        batch = [x for x in ids for _ in range(samples)]
        generator = torch.Generator(gen.device).manual_seed(seed)
        outputs = gen.model.generate(batch, max_new_tokens=max_new_tokens, stop_ids=stops, generator=generator,
                                     **gen.decoding, **sampling)
        texts = [tok.decode(out, skip_special_tokens=True) for out in outputs]
        repeated, grams = map(sum, zip(*(repetition(t) for t in texts)))
        report[kind] = {"replies": len(texts), "stop_rate": sum(len(o) < max_new_tokens for o in outputs) / len(texts),
                        "mean_chars": sum(map(len, texts)) / len(texts), "distinct_1": distinct(texts, 1),
                        "distinct_2": distinct(texts, 2), "repeated_4gram": repeated / max(grams, 1),
                        "examples": [(p, texts[i * samples]) for i, p in enumerate(prompts)]}
    return report

# -----------------------------------------------------------------------------
# the embedded SFT run: held-out sentiment accuracy, and what SFT costs the pretrained model


def sentiment_evals(cfg):
    """{name: fn(model) -> float} for the trainer: the embedded SFT/DPO run's held-out sentiment accuracy
    (greedy answers, 4 new tokens at most); none for a --data_path run."""
    if cfg.data_path is not None:
        return {}
    tokenizer = PreTrainedTokenizerFast.from_pretrained(cfg.tokenizer_dir)
    stop = tokenizer.convert_tokens_to_ids("<|im_end|>")
    items = corpus.sentiment_test_set(corpus.embedded_paths()["sft_test"])

    def answer(model, prompts):
        ids = [encode_chat(tokenizer, p) for p in prompts]
        replies = []
        # 4 new tokens: compiling the step would cost more than it saves (on CUDA it is still captured)
        for i in range(0, len(ids), ANSWER_BATCH):
            replies += model.generate(ids[i:i + ANSWER_BATCH], max_new_tokens=4, temperature=0, stop_ids=(stop,),
                                      compile_step=False)
        release_decoders(model)  # the training run gets the KV cache's memory back
        return [tokenizer.decode(r) for r in replies]

    return {"sentiment_acc": lambda model: corpus.sentiment_accuracy(items, lambda p: answer(model, p))[0]}


def news_bpc(checkpoints, path, n_texts=NEWS_TEXTS) -> dict:
    """{checkpoint: bits per character of the first n_texts texts of path}, as eval.py --bpc scores."""
    return {ckpt: bits_per_char(load_ours(ckpt), path, max_texts=n_texts)["bpc"] for ckpt in checkpoints}
