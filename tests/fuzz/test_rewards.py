"""Seeded fuzz of reward returns through the real worker pool: NaN, inf, 1e308, 10**400,
numpy types, strings, exceptions, hangs, dying workers. Every valid value must arrive
unchanged, every other one as a failed reward (value 0, a reason); then the step's metrics and
advantages over those rewards must be finite. A wrong or non-finite value that gets through
counts as data lost; an exception or a hang fails the campaign."""

import json
import math
import random

import torch

from repo_megatron.algorithm.advantages import compute_advantages
from repo_megatron.rewards import RewardRequest, RewardRunner
from repo_megatron.rollout.metrics import rollout_metrics
from repo_megatron.rollout.types import Group, Prompt, Sample
from tests.fuzz.rewards import expected
from tests.fuzz.tally import CLEAN_ERROR, DATA_LOST, HANG, OK, TRACEBACK, Tally
from tests.fuzz.cases import run_case

SEED = 20260113
CASES = 400
MAX_ABS = 1e6
GROUP = 4


def random_spec(rng: random.Random) -> dict:
    numbers = [0, 1, -1, 0.5, 1e6, -1e6, 1e6 + 1, 5e-324, 1e-300, 1e308, -1e308, 3.4e38,
               "nan", "inf", "-inf", True, False, 2 ** 53 + 1, rng.uniform(-10, 10),
               rng.uniform(-1e7, 1e7)]
    roll = rng.random()
    if roll < 0.45:
        return {"kind": rng.choice(["number", "pair", "real_subclass"]), "value": rng.choice(numbers),
                "reason": rng.choice(["ok", "", "x" * 100000, "line\nbreak"])}
    if roll < 0.55:
        return {"kind": "result", "value": rng.choice(numbers), "failed": rng.random() < 0.3}
    if roll < 0.65:
        return {"kind": "numpy", "value": rng.choice([0.5, 1e6, "nan", "inf", 1e30, 7]),
                "dtype": rng.choice(["float32", "float64", "int64", "float16"])}
    if roll < 0.72:
        return {"kind": "huge_int", "value": rng.choice([2, 6, 7, 30, 400])}
    if roll < 0.85:
        return {"kind": "other", "what": rng.choice(["str", "none", "list", "dict", "bytes",
                                                    "tuple3", "complex"])}
    if roll < 0.93:
        return {"kind": rng.choice(["bad_float", "pair_bad_reason"]), "value": 1.0}
    if roll < 0.985:
        return {"kind": "raise", "what": rng.choice(["ValueError", "KeyError",
                                                    "ZeroDivisionError", "RecursionError"])}
    # rare and slow: the worker is killed or dies and is replaced
    return rng.choice([{"kind": "sleep", "value": 10}, {"kind": "exit", "value": 9},
                       {"kind": "raise", "what": "SystemExit"},
                       {"kind": "raise", "what": "KeyboardInterrupt"}])


def _sample(i: int, value: float, failed: bool) -> Sample:
    return Sample(prompt_uid=f"p{i // GROUP}", prompt_ids=(1, 2), response_ids=[3, 4],
                  response_text="", reward=value, reward_reason="", finish_reason="stop",
                  behaviour_logprobs=[-1.0, -1.0], reward_failed=failed)


def test_fuzz_reward_returns():
    rng = random.Random(SEED)
    specs = [random_spec(rng) for _ in range(CASES)]
    tally = Tally("rewards")
    with RewardRunner("tests.fuzz.rewards:fuzzed", timeout_s=3.0, num_workers=2,
                      max_abs=MAX_ABS) as runner:
        outcome, results = run_case(
            lambda: runner.score([RewardRequest(json.dumps(s), "") for s in specs]), seconds=600)
    if outcome != OK:
        for i in range(CASES):
            tally.record(f"case{i}", outcome if outcome in (HANG, TRACEBACK) else TRACEBACK,
                         repr(results)[:400])
        tally.check(min_cases=CASES)
    for i, (spec, result) in enumerate(zip(specs, results)):
        want, value = expected(spec, MAX_ABS)
        if want == "ok":
            good = not result.failed and result.value == value and type(result.value) is float
            tally.record(f"case{i} {spec}", OK if good else DATA_LOST, repr(result)[:300])
        else:
            good = result.failed and result.value == 0.0 and bool(result.reason)
            tally.record(f"case{i} {spec}", CLEAN_ERROR if good else DATA_LOST,
                         repr(result)[:300])

    # The step downstream of these rewards: metrics and advantages stay finite.
    samples = [_sample(i, r.value, r.failed) for i, r in enumerate(results)]
    groups = [Group(prompt=Prompt(f"p{j}", "q", "a", (1, 2)), samples=samples[j:j + GROUP])
              for j in range(0, CASES, GROUP)]
    outcome, metrics = run_case(lambda: rollout_metrics(groups, samples, len(groups), 0.5),
                                seconds=60)
    finite = outcome == OK and all(math.isfinite(v) for v in metrics.values())
    tally.record("rollout metrics", OK if finite else TRACEBACK, repr(metrics)[:400])
    rewards = torch.tensor([s.reward for s in samples], dtype=torch.float64).reshape(-1, GROUP)
    for estimator in ("grpo", "drgrpo"):
        outcome, adv = run_case(lambda: compute_advantages(rewards, estimator=estimator),
                                seconds=60)
        finite = outcome == OK and bool(torch.isfinite(adv).all())
        tally.record(f"advantages {estimator}", OK if finite else TRACEBACK, repr(adv)[:400])
    tally.check(min_cases=CASES)
