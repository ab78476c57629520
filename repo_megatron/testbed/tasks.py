"""Arithmetic problems for the testbed, and the two styles their solutions are written in.

- **Sums** ``3+5`` -> ``8``: the learning test's task. The warm-up ends the answer right in
  only a share of its examples and slips a trailing zero otherwise (:func:`slipped_sum`), so
  the policy starts right some of the time and GRPO has something to reinforce.
- **Products** ``a*b``: one-digit x one-digit are *easy* (the warm-up teaches them);
  two-digit x one-digit are *hard* (never answered in the warm-up: on-policy the policy writes
  the format with a wrong number). Each product has an expert solution, the off-policy
  knowledge ``k``.

The policy's own style is terse, :func:`own_style`: ``37*8=296``. The expert's style differs in
wording, order and format, :func:`expert_solution`:
``Take 8 times 37: 8*30 is 240 and 8*7 is 56, so 240+56 gives 296.`` A trace in the expert's
style is therefore genuinely off-policy (LUFFY injects it as is); a rephrase of it by the
policy comes out in the policy's style.
"""

from __future__ import annotations

import random
from typing import Iterable

Problem = dict  # {"question", "answer", "solution" (None for sums)}

# A short rephrasing prompt P(q, k) for the character-level model (the default template is
# ~450 characters of instructions that a 1M-parameter model cannot read anyway). The problem
# comes last, so it sits right before the answer as in the plain prompt q.
REPHRASE_TEMPLATE = "Reference: {solution}\nProblem: {question}"


def product_problem(a: int, b: int) -> Problem:
    """``a*b`` with the expert's worked solution."""
    return {"question": f"{a}*{b}", "answer": str(a * b), "solution": expert_solution(a, b)}


def expert_solution(a: int, b: int) -> str:
    """The expert's style: words, the multiplier first, partial products of tens and ones."""
    if a < 10:
        return f"Take {b} times {a}, which gives {a * b}."
    tens, ones = a - a % 10, a % 10
    return (f"Take {b} times {a}: {b}*{tens} is {b * tens} and {b}*{ones} is {b * ones}, "
            f"so {b * tens}+{b * ones} gives {a * b}.")


def own_style(problem: Problem, answer: str | None = None) -> str:
    """The policy's style: ``question=answer`` (``answer`` defaults to the right one)."""
    return f"{problem['question']}={problem['answer'] if answer is None else answer}"


def sum_problem(a: int, b: int) -> Problem:
    return {"question": f"{a}+{b}", "answer": str(a + b), "solution": None}


def slipped_sum(problem: Problem, rng: random.Random, correct_share: float) -> str:
    """A warm-up target for a sum: the sum with probability ``correct_share``, otherwise the
    systematic slip of a trailing zero (``3+5`` -> ``80``). The sum itself is always right, so
    one shared decision (stop, or write the zero) separates right from wrong on every prompt:
    what RL can shift in a few steps without new knowledge."""
    return problem["answer"] + ("" if rng.random() < correct_share else "0")


def all_sums() -> list[Problem]:
    """``a+b`` for one-digit a, b."""
    return [sum_problem(a, b) for a in range(1, 10) for b in range(1, 10)]


def easy_products() -> list[Problem]:
    return [product_problem(a, b) for a in range(2, 10) for b in range(2, 10)]


def hard_products() -> list[Problem]:
    """Two-digit x one-digit with a three-digit product (no multiples of ten)."""
    return [product_problem(a, b) for a in range(12, 100) if a % 10 for b in range(3, 10)
            if a * b >= 100]


def pick(problems: Iterable[Problem], n: int, rng: random.Random,
         exclude: Iterable[Problem] = ()) -> list[Problem]:
    """``n`` distinct problems not in ``exclude`` (by question), in a seeded random order."""
    taken = {p["question"] for p in exclude}
    pool = [p for p in problems if p["question"] not in taken]
    if n > len(pool):
        raise ValueError(f"asked for {n} problems, only {len(pool)} are left")
    return rng.sample(pool, n)
