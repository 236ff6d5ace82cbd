"""
奖励函数：grpo.py 用它们给采样出的回复打分；每个都是普通的 Python 函数 reward(prompt, completion, answer) -> float。
阅读顺序：last_number（取回复里的最后一个数）-> arithmetic / sentiment（两个内置奖励）-> arithmetic_problems
（带种子的算术题）-> load_reward（--reward 名字或 path/to/file.py:function）。
可以动手试：写一个自己的奖励（比如回复越短越好），用 --reward my_reward.py:shorter 训练，看模型学到了什么。

Read in this order: last_number -> arithmetic / sentiment -> arithmetic_problems -> load_reward.
Try: write your own reward (say, shorter replies score higher), train with --reward my_reward.py:shorter,
and see what the model learns.

Rewards for grpo.py: plain functions reward(prompt, completion, answer) -> float, where prompt is
the user's question, completion the sampled reply as decoded text (ending with <|im_end|> when the
model closed its turn; cut short otherwise) and answer the reference answer the data gives for the
question (the sentiment label, the arithmetic result, a GSM8K solution). A verifiable reward checks
the reply against that answer; nothing is learned. A reward of 1 or more counts as a correct reply
in grpo.py's held-out accuracy.
"""

import importlib.util
import random
import re
from pathlib import Path

from core.corpus import LABELS, halfwidth

END = "<|im_end|>"  # how a reply that closed its turn ends
FORMAT_REWARD = 0.1  # for closing the turn: a reply that rambles on until the token limit gets less
# a number: an optional minus sign, digits with optional thousands commas, an optional decimal part
NUMBER = re.compile(r"-?\d+(?:,\d{3})*(?:\.\d+)?")


def last_number(text) -> float | None:
    """The last number written in text, or None: full-width digits count (２３ is 23), thousands
    commas are dropped (1,234 is 1234), a minus sign right before the digits makes it negative."""
    found = NUMBER.findall(halfwidth(text).replace("−", "-"))  # U+2212, the minus sign of typeset maths
    return float(found[-1].replace(",", "")) if found else None


def arithmetic(prompt, completion, answer) -> float:
    """1 when the last number of the reply equals the last number of the answer (GSM8K's "#### 72"
    ends with it; the arithmetic task's answer is the number itself), else 0; no number is 0."""
    got, expected = last_number(completion), last_number(answer)
    return float(got is not None and expected is not None and got == expected)


def sentiment(prompt, completion, answer) -> float:
    """1 when the reply names the right label (正面 / 负面) and not the other, else 0; plus
    FORMAT_REWARD when it closes its turn."""
    text = completion.removesuffix(END) if completion.endswith(END) else completion
    other = LABELS[1 - LABELS.index(answer)] if answer in LABELS else None
    correct = answer in text and (other is None or other not in text)
    return float(correct) + FORMAT_REWARD * completion.endswith(END)


REWARDS = {"arithmetic": arithmetic, "sentiment": sentiment}


def arithmetic_problems(seed, n) -> list[tuple[str, str]]:
    """n (question, answer) pairs from a seeded generator: a + b with two-digit numbers, a × b with
    a two-digit and a one-digit number, asked in Chinese."""
    rng = random.Random(seed)
    problems = []
    for _ in range(n):
        if rng.random() < 0.5:
            a, b = rng.randint(10, 99), rng.randint(10, 99)
            problems.append((f"计算 {a} + {b} = ?", str(a + b)))
        else:
            a, b = rng.randint(10, 99), rng.randint(2, 9)
            problems.append((f"计算 {a} × {b} = ?", str(a * b)))
    return problems


def load_reward(spec):
    """--reward: a name of REWARDS, or path/to/file.py:function (a function of the same signature)."""
    if spec in REWARDS:
        return REWARDS[spec]
    path, _, name = spec.rpartition(":")
    if not path.endswith(".py") or not name:
        raise SystemExit(f"--reward {spec}: not one of {', '.join(REWARDS)}, nor path/to/file.py:function")
    if not Path(path).is_file():
        raise SystemExit(f"--reward {spec}: no such file {path}")
    module_spec = importlib.util.spec_from_file_location(Path(path).stem, path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    reward = getattr(module, name, None)
    if not callable(reward):
        raise SystemExit(f"--reward {spec}: {path} defines no function {name}(prompt, completion, answer)")
    return reward
