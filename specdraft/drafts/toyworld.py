"""The built-in toy world: a seeded synthetic task suite, its BPE tokenizer and model shapes.

Four task families echo AdaSPEC's evaluation: arithmetic word problems with step-by-step answers
(GSM8K-like), instruction following (Alpaca-like), short code from a spec (MBPP-like) and summaries
of a short story (CNN/DM-like). Every response mixes template tokens that any small model predicts
with content tokens that need computation or copying, so a small draft has a real capacity gap.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path

TASKS = ("arithmetic", "instruction", "code", "summary")

NAMES = ["Tom", "Anna", "Ben", "Mia", "Sam", "Lucy", "Max", "Eva", "Leo", "Ivy", "Noah", "Zoe"]
ITEMS = ["apples", "pens", "books", "coins", "cards", "eggs", "shells", "stamps", "cups", "hats"]
PLACES = ["market", "park", "school", "library", "beach", "farm", "station", "museum"]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
FOODS = ["fish", "bread", "cake", "soup", "rice", "pie", "plums", "cheese"]
WORDS = ["cat", "dog", "sun", "tree", "lamp", "rock", "bird", "ship", "star", "moon", "fox", "cup"]
COLORS = ["red", "blue", "green", "black", "white", "brown", "pink", "gold"]
OPS = {"add": ("plus", "+"), "sub": ("minus", "-"), "mul": ("times", "*")}


def _arithmetic(rng: random.Random) -> tuple[str, str]:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    a, b = rng.randint(2, 9), rng.randint(1, 9)
    if rng.random() < 0.5:
        c = rng.randint(1, a + b - 1)
        prompt = (
            f"Question: {name} has {a} {item}. {name} gets {b} more and then gives away {c}. "
            f"How many {item} does {name} have now?"
        )
        response = (
            f"{name} starts with {a} {item}. {a} + {b} = {a + b}. "
            f"{a + b} - {c} = {a + b - c}. The answer is {a + b - c}."
        )
    else:
        prompt = (
            f"Question: {name} buys {a} bags with {b} {item} in each bag. How many {item} is that?"
        )
        response = f"Each bag has {b} {item}. {a} * {b} = {a * b}. The answer is {a * b}."
    return prompt, response


def _instruction(rng: random.Random) -> tuple[str, str]:
    kind = rng.randrange(4)
    if kind == 0:
        word = rng.choice(WORDS)
        return (
            f"Instruction: Write the word {word} backwards.",
            f"The word {word} backwards is {word[::-1]}.",
        )
    if kind == 1:
        word, n = rng.choice(WORDS), rng.randint(2, 4)
        return (
            f"Instruction: Repeat the word {word} {n} times.",
            "Here it is: " + " ".join([word] * n) + ".",
        )
    if kind == 2:
        words = rng.sample(WORDS, 3)
        return (
            f"Instruction: Sort these words: {', '.join(words)}.",
            f"In order: {', '.join(sorted(words))}.",
        )
    color, item = rng.choice(COLORS), rng.choice(ITEMS)
    return (
        f"Instruction: Describe the {color} {item} in one sentence.",
        f"The {item} are {color} and they look nice.",
    )


def _code(rng: random.Random) -> tuple[str, str]:
    kind = rng.randrange(5)
    arg = rng.choice(["x", "n", "value", "num"])
    items = rng.choice(["xs", "items", "values", "nums"])
    n = rng.randint(1, 20)
    if kind in (0, 1):
        op = rng.choice(sorted(OPS))
        word, symbol = OPS[op]
        if kind == 0:
            name = f"{op}_{n}"
            return (
                f"Task: Write a function {name} that returns {arg} {word} {n}.",
                f"def {name}({arg}):\n    return {arg} {symbol} {n}",
            )
        name = f"{op}_all"
        return (
            f"Task: Write a function {name} that returns each item of {items} {word} {n}.",
            f"def {name}({items}):\n    return [{arg} {symbol} {n} for {arg} in {items}]",
        )
    if kind == 2:
        cmp, word, symbol = rng.choice([("gt", "greater", ">"), ("lt", "less", "<")])
        name = f"keep_{cmp}_{n}"
        return (
            f"Task: Write a function {name} that keeps the items of {items} {word} than {n}.",
            f"def {name}({items}):\n    return [{arg} for {arg} in {items} if {arg} {symbol} {n}]",
        )
    if kind == 3:
        who = rng.choice(NAMES).lower()
        return (
            f"Task: Write a function greet_{who} that returns the text hello {who}.",
            f"def greet_{who}():\n    return 'hello {who}'",
        )
    word = rng.choice(WORDS)
    return (
        f"Task: Write a function count_{word} that counts how often {word} appears in {items}.",
        f"def count_{word}({items}):\n    return {items}.count('{word}')",
    )


def _summary(rng: random.Random) -> tuple[str, str]:
    a, b = rng.sample(NAMES, 2)
    place, day = rng.choice(PLACES), rng.choice(DAYS)
    food, item = rng.choice(FOODS), rng.choice(ITEMS)
    color = rng.choice(COLORS)
    prompt = (
        f"Story: On {day}, {a} went to the {place}. The sky was {color}. "
        f"{a} bought some {food} and met {b}. {b} had lost the {item}, so they looked for them together. "
        "Summarize the story."
    )
    response = (
        f"Summary: {a} met {b} at the {place} on {day}, bought {food} and helped find the {item}."
    )
    return prompt, response


TASK_MAKERS: dict[str, Callable[[random.Random], tuple[str, str]]] = {
    "arithmetic": _arithmetic,
    "instruction": _instruction,
    "code": _code,
    "summary": _summary,
}


def make_examples(n_per_task: int, seed: int) -> list[dict[str, str]]:
    """Deterministic examples, interleaved across tasks: [{prompt, response, task}]."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n_per_task):
        for task in TASKS:
            prompt, response = TASK_MAKERS[task](rng)
            rows.append({"prompt": prompt + "\nAnswer:", "response": " " + response, "task": task})
    return rows


def make_toy_dataset(n_train_per_task: int, n_eval_per_task: int, seed: int):
    """A `datasets.DatasetDict` with `train` and `eval` splits of fields prompt, response, task.

    The eval split is drawn from another seed stream and never repeats a training prompt.
    """
    from datasets import Dataset, DatasetDict

    train = make_examples(n_train_per_task, seed)
    seen = {row["prompt"] for row in train}
    rng = random.Random(seed + 1_000_003)
    per_task: dict[str, list[dict[str, str]]] = {task: [] for task in TASKS}
    for task, rows in per_task.items():
        for _ in range(1000 * n_eval_per_task):
            if len(rows) == n_eval_per_task:
                break
            prompt, response = TASK_MAKERS[task](rng)
            row = {"prompt": prompt + "\nAnswer:", "response": " " + response, "task": task}
            if row["prompt"] not in seen:
                seen.add(row["prompt"])
                rows.append(row)
        else:
            raise ValueError(
                f"the toy {task} task has too few distinct prompts for {n_eval_per_task} eval rows"
            )
    eval_rows = [per_task[task][i] for i in range(n_eval_per_task) for task in TASKS]
    return DatasetDict({"train": Dataset.from_list(train), "eval": Dataset.from_list(eval_rows)})


PAD, BOS, EOS = "<|pad|>", "<|bos|>", "<|eos|>"


def train_toy_tokenizer(texts: list[str], vocab_size: int, out_dir: Path):
    """Train a byte-level BPE tokenizer on `texts` and save it as a HF fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD, BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token=PAD, bos_token=BOS, eos_token=EOS, model_max_length=512
    )
    fast.padding_side = "right"
    fast.save_pretrained(out_dir)
    return fast
