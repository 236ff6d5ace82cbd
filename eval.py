"""
Compare language models the way small Chinese LLMs are compared: bits per character on any text, and
C-Eval / CMMLU multiple choice. Our checkpoints (--ckpt) and any transformers causal LM (--hf: an
export_hf.py export, Qwen, minimind, ...) go through the same scoring code, each with its own tokenizer.

    python eval.py --ckpt out/pretrain --bpc data/embedded/pretrain_val.jsonl
    python eval.py --hf out/hf --bpc news.jsonl wiki.txt
    python eval.py --ckpt out/sft --mcq ceval-exam/val --shots 5
    python eval.py --ckpt out/sft --gen                    # stop rate, distinct-n, repetition

Bits per character (--bpc). Loss per token cannot compare models whose tokenizers cut the text
differently: a tokenizer with longer tokens makes fewer, harder predictions. The information a model
needs for the whole text can be compared: BPC = sum over the text's tokens of -log2 p(token | the
tokens before it) / the number of characters of the text (len(text), Unicode code points). Each text
(a JSON line's "text", or a line of a .txt file) is scored on its own as [start] + its tokens, where
[start] is the tokenizer's BOS token, or its EOS token when it has no BOS (Qwen's <|endoftext|>, the
separator its documents were trained with): the rule of lm-evaluation-harness, the same for every
model. A text longer than the context L (the model's, or --context) is cut into windows: window k
predicts tokens [kL, (k+1)L) from the one token before them and no other context (the first window
from [start]), so every token of the text is scored exactly once.

Multiple choice (--mcq DIR). Every CSV file in DIR is one subject (its name, less a _val/_dev/_test
suffix): C-Eval's `id,question,A,B,C,D,answer[,explanation]` and CMMLU's `,Question,A,B,C,D,Answer`
both read. The prompt is C-Eval's:

    以下是中国关于{subject}考试的单项选择题，请选出其中的正确答案。

    {few-shot question}
    A. ...
    B. ...
    C. ...
    D. ...
    答案：{its answer}

    {question}
    A. ...  (and B, C, D)
    答案：

and the model's answer is the letter most likely to come next: one forward pass per question, the
log-softmax over the whole vocabulary at the last position, read at the token each letter becomes
right after 答案： (normalised over the vocabulary, as lm-evaluation-harness's log-likelihoods are,
not over the four letters; the choice is the same either way). --shots k takes the
first k questions of the subject's file in DIR/dev/ or, as the C-Eval and CMMLU releases are laid
out, in a dev/ folder beside DIR. A prompt longer than the context loses few-shot examples first,
then is cut to its last tokens; the output counts both.

Generation (--gen [FILE], default prompts/gen.jsonl): each prompt answered --gen_samples times with
model_sample.py's default sampling settings; per kind of prompt, the stop rate (replies that end
with their stop token before --max_new_tokens), the mean length, distinct-1/2 and the share of
repeated 4-grams within a reply: whether the model ends its replies and whether it loops.
"""

import argparse
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
from transformers import AutoModelForCausalLM, AutoTokenizer

import corpus
from model_sample import DTYPES, SAMPLING, TextGenerator, encode_chat
from train_config import OneLineParser

CHOICES = ("A", "B", "C", "D")
CEVAL_HEADER = "以下是中国关于{subject}考试的单项选择题，请选出其中的正确答案。\n\n"
ANSWER_CUE = "答案："
TEXTS_PER_GROUP = 1000  # texts tokenised and scored together: a file of any size streams through
GEN_KINDS = ("chat", "sentiment", "continue")
GEN_PROMPTS = Path(__file__).resolve().with_name("prompts") / "gen.jsonl"


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


def load_ours(path, tokenizer_dir=None, device=None, dtype="float32", context=None) -> LM:
    """A K-Model or GPT2 checkpoint (ckpt dir, run dir or weights file) with its own tokenizer."""
    gen = TextGenerator(path, tokenizer_dir=tokenizer_dir, device=device, dtype=dtype)
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
    for start in tqdm(range(0, len(order), batch_size), desc=desc, disable=desc is None, leave=False):
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


def print_mcq(results, shots):
    width = max(len("mean over subjects"), *(len(r["subject"]) for r in results))
    print(f"\n{'subject':{width}s}  items  accuracy  (C-Eval prompt, {shots}-shot, chance 25.0%)")
    for r in results:
        notes = [f"{r['fewer_shots']} with fewer shots"] * bool(r["fewer_shots"]) + [f"{r['cut']} cut"] * bool(r["cut"])
        print(f"{r['subject']:{width}s}  {r['items']:5d}  {100 * r['accuracy']:7.1f}%" + (f"  ({', '.join(notes)} "
              "to fit the context)" if notes else ""))
    items, correct = sum(r["items"] for r in results), sum(r["correct"] for r in results)
    print(f"{'overall':{width}s}  {items:5d}  {100 * correct / items:7.1f}%")
    print(f"{'mean over subjects':{width}s}  {len(results):5d}  "
          f"{100 * sum(r['accuracy'] for r in results) / len(results):7.1f}%")
    # a model that always picks one letter scores that letter's share of the answers
    given = [p for r in results for p in r["predictions"]]
    print("letters picked: " + ", ".join(f"{c} {given.count(c)}" for c in CHOICES))

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
                                     **sampling)
        texts = [tok.decode(out, skip_special_tokens=True) for out in outputs]
        repeated, grams = map(sum, zip(*(repetition(t) for t in texts)))
        report[kind] = {"replies": len(texts), "stop_rate": sum(len(o) < max_new_tokens for o in outputs) / len(texts),
                        "mean_chars": sum(map(len, texts)) / len(texts), "distinct_1": distinct(texts, 1),
                        "distinct_2": distinct(texts, 2), "repeated_4gram": repeated / max(grams, 1),
                        "examples": [(p, texts[i * samples]) for i, p in enumerate(prompts)]}
    return report


def print_generation(report, sampling, max_new_tokens):
    print(f"\ngeneration ({', '.join(f'{k} {v}' for k, v in sampling.items())}, at most {max_new_tokens} new tokens)")
    print(f"{'kind':10s} {'replies':>7s} {'stop rate':>9s} {'mean chars':>10s} {'distinct-1':>10s} "
          f"{'distinct-2':>10s} {'repeated 4-grams':>16s}")
    for kind, r in report.items():
        print(f"{kind:10s} {r['replies']:7d} {100 * r['stop_rate']:8.1f}% {r['mean_chars']:10.1f} "
              f"{r['distinct_1']:10.3f} {r['distinct_2']:10.3f} {100 * r['repeated_4gram']:15.1f}%")
    for kind, r in report.items():
        print(f"\n-- {kind}: the first reply to each prompt")
        for prompt, text in r["examples"]:
            print(f"{prompt!r} -> {text!r}")

# -----------------------------------------------------------------------------
# command line


def main(argv=None):
    parser = OneLineParser(description=__doc__.split("\n\n")[0].strip(),
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    model = parser.add_mutually_exclusive_group(required=True)
    model.add_argument("--ckpt", help="our checkpoint: a ckpt dir, a run dir (its newest ckpt-*) or a weights file")
    model.add_argument("--hf", help="a local transformers causal LM directory (an export_hf.py export, Qwen, ...)")
    parser.add_argument("--tokenizer", default=None, help="with --ckpt: default the checkpoint's own, else tokenizer_k/")
    parser.add_argument("--bpc", nargs="+", metavar="FILE", default=[],
                        help='bits per character of each file (.jsonl with "text", or .txt one text a line)')
    parser.add_argument("--mcq", metavar="DIR", help="multiple choice: every C-Eval/CMMLU CSV in DIR")
    parser.add_argument("--shots", type=int, default=0, choices=range(6), help="few-shot examples per question")
    parser.add_argument("--gen", nargs="?", const=str(GEN_PROMPTS), metavar="FILE",
                        help="generation diagnostics (stop rate, distinct-n, repetition) on the prompts of FILE "
                             f"(default {GEN_PROMPTS.relative_to(GEN_PROMPTS.parents[1])}), with model_sample.py's "
                             "default sampling settings")
    parser.add_argument("--gen_samples", type=int, default=4, help="--gen: replies per prompt")
    parser.add_argument("--max_new_tokens", type=int, default=128, help="--gen: new tokens per reply at most")
    parser.add_argument("--context", type=int, default=None, help="tokens per forward pass (default: the model's)")
    parser.add_argument("--batch_size", type=int, default=8, help="sequences per forward pass")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--dtype", default="float32", choices=list(DTYPES))
    args = parser.parse_args(argv)
    if not args.bpc and not args.mcq and not args.gen:
        parser.error("nothing to evaluate: pass --bpc FILE [FILE ...], --mcq DIR and/or --gen")
    if args.gen and args.hf:
        parser.error("--gen goes with --ckpt (our decoding loop and chat template)")
    if args.tokenizer and args.hf:
        parser.error("--tokenizer goes with --ckpt; an --hf directory holds its own tokenizer")
    for flag in ("context", "batch_size"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            parser.error(f"--{flag} {getattr(args, flag)}: must be at least 1")
    try:
        lm = (load_hf(args.hf, args.device, args.dtype, args.context) if args.hf else
              load_ours(args.ckpt, args.tokenizer, args.device, args.dtype, args.context))
        params = sum(p.numel() for p in lm.model.parameters())
        tasks = [f"bits per character of {len(args.bpc)} file(s)"] * bool(args.bpc) + [
            f"multiple choice in {args.mcq}, {args.shots}-shot"] * bool(args.mcq) + [
            f"generation on {args.gen}"] * bool(args.gen)
        print(f"model      {lm.name}, {params / 1e6:.2f}M parameters, {lm.device} {args.dtype}\n"
              f"tokenizer  {len(lm.tokenizer)} tokens; each text scored as "
              f"{lm.tokenizer.convert_ids_to_tokens(lm.start_id)} + text, <= {lm.context} tokens a window\n"
              f"evaluating {' and '.join(tasks)}, batch size {args.batch_size}")
        if args.bpc:
            print(f"\n{'file':40s} {'texts':>7s} {'characters':>11s} {'tokens':>10s} {'chars/token':>11s} "
                  f"{'bits/token':>10s} {'BPC':>7s}")
        for path in args.bpc:
            r = bits_per_char(lm, path, args.batch_size)
            print(f"{str(path):40s} {r['texts']:7,d} {r['chars']:11,d} {r['tokens']:10,d} "
                  f"{r['chars'] / r['tokens']:11.3f} {r['bits_per_token']:10.4f} {r['bpc']:7.4f}")
        if args.mcq:
            print_mcq(evaluate_mcq(lm, args.mcq, args.shots, args.batch_size), args.shots)
        if args.gen:
            report = generation_report(lm.generator, read_gen_prompts(args.gen), args.max_new_tokens,
                                       args.gen_samples, **SAMPLING)
            print_generation(report, SAMPLING, args.max_new_tokens)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"eval.py: {e}") from None


if __name__ == "__main__":
    main()
