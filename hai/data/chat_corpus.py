"""A small synthetic chat corpus, generated here without a network: the default source of ``hai prepare
data.format=chat`` (``data.source`` unset) and the SFT tests' and demo's data.

Deterministic conversations from a seed: arithmetic, capitals of countries, word reversal and capitalization, letter
counts, "what comes after", tiny Python functions, a greeting before a question (multi-turn), some with a system
prompt. About two thirds are written as ``{"messages": [...]}`` rows, the rest as ``{"prompt", "completion"}`` rows, so
both forms are read. Every conversation renders to at most 124 bytes with the byte tokenizer's built-in template
(fits ``train.seq_len=128``).

    python -m hai.data.chat_corpus OUT.jsonl [--rows N] [--seed S]
"""

from __future__ import annotations

import argparse
import json
import os
import random

__all__ = ["conversations", "write_corpus", "CORPUS_VERSION", "CAPITALS"]

CORPUS_VERSION = 1

CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid", "Japan": "Tokyo", "China": "Beijing",
    "Egypt": "Cairo", "Kenya": "Nairobi", "Peru": "Lima", "Chile": "Santiago", "Canada": "Ottawa",
    "Norway": "Oslo", "Sweden": "Stockholm", "Poland": "Warsaw", "Greece": "Athens", "Austria": "Vienna",
    "Portugal": "Lisbon", "Ireland": "Dublin", "Russia": "Moscow", "India": "New Delhi", "Cuba": "Havana",
    "Mexico": "Mexico City", "Brazil": "Brasilia", "Turkey": "Ankara", "Iran": "Tehran", "Iraq": "Baghdad",
    "Vietnam": "Hanoi", "Thailand": "Bangkok", "Finland": "Helsinki", "Denmark": "Copenhagen",
}
_WORDS = ["apple", "river", "python", "garden", "window", "silver", "planet", "rocket", "yellow", "camera", "bridge",
          "forest", "orange", "guitar", "pencil", "summer", "winter", "castle", "dragon", "laptop", "coffee", "butter"]
_FUNCS = [("square", "x * x"), ("double", "2 * x"), ("negate", "-x"), ("half", "x / 2"), ("increment", "x + 1"),
          ("cube", "x ** 3"), ("is_even", "x % 2 == 0"), ("absolute", "abs(x)")]
_SYSTEM = ["Be helpful.", "Answer briefly."]
_GREET = [("Hi!", "Hello!"), ("Hello.", "Hi!")]


def _arith(r: random.Random) -> tuple[str, str]:
    a, b = r.randint(0, 99), r.randint(0, 99)
    op = r.choice("+-*")
    if op == "*":
        a, b = a % 13, b % 13
    value = {"+": a + b, "-": a - b, "*": a * b}[op]
    return f"What is {a} {op} {b}?", f"{a} {op} {b} = {value}."


def _capital(r: random.Random) -> tuple[str, str]:
    country = r.choice(sorted(CAPITALS))
    return f"What is the capital of {country}?", f"The capital of {country} is {CAPITALS[country]}."


def _reverse(r: random.Random) -> tuple[str, str]:
    w = r.choice(_WORDS)
    return f"Reverse the word {w}.", w[::-1]


def _upper(r: random.Random) -> tuple[str, str]:
    w = r.choice(_WORDS)
    return f"Write {w} in capital letters.", w.upper()


def _count(r: random.Random) -> tuple[str, str]:
    w = r.choice(_WORDS)
    return f"How many letters are in {w}?", f"{w} has {len(w)} letters."


def _after(r: random.Random) -> tuple[str, str]:
    n = r.randint(0, 998)
    return f"What number comes after {n}?", f"{n + 1} comes after {n}."


def _function(r: random.Random) -> tuple[str, str]:
    name, body = r.choice(_FUNCS)
    return f"Write a Python function {name}.", f"def {name}(x):\n    return {body}"


_TASKS = [_arith, _capital, _reverse, _upper, _count, _after, _function]


def conversations(n: int, seed: int = 0) -> list[dict]:
    """``n`` rows (``{"messages": ...}`` or ``{"prompt", "completion"}``), the same for the same seed."""
    r = random.Random(seed)
    rows = []
    for _ in range(n):
        question, answer = r.choice(_TASKS)(r)
        kind = r.random()
        if kind < 1 / 3:
            rows.append({"prompt": question, "completion": answer})
            continue
        messages = []
        if kind < 0.45:
            messages.append({"role": "system", "content": r.choice(_SYSTEM)})
        if kind > 0.85:
            hello, reply = r.choice(_GREET)
            messages += [{"role": "user", "content": hello}, {"role": "assistant", "content": reply}]
        messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        rows.append({"messages": messages})
    return rows


def write_corpus(path: str, n: int = 6000, seed: int = 0) -> str:
    """Write ``n`` rows as jsonl (atomically); returns the path."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        for row in conversations(n, seed):
            f.write(json.dumps(row) + "\n")
    os.replace(tmp, path)
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="write the synthetic chat corpus as jsonl")
    p.add_argument("out")
    p.add_argument("--rows", type=int, default=6000)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    print(write_corpus(a.out, a.rows, a.seed))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
