"""Per-provenance metrics (on-policy, rephrased, expert, replayed) against a float64 reference
computed token by token on a hand-built batch, additivity across micro-batches, finalisation."""

import math

import pytest
import torch

from repo_megatron.algorithm import LossParams, compute_policy_loss
from repo_megatron.algorithm.provenance import (PROVENANCES, finalize_provenance_metrics,
                                                provenance_codes)

from . import reference
from .inputs import random_batch

# rows: 0 on-policy, 1 on-policy (fully masked), 2 expert (LUFFY), 3 rephrased, 4-5 replayed
IS_REPHRASED = torch.tensor([0, 0, 0, 1, 0, 0], dtype=torch.bool)
IS_OFFPOLICY = torch.tensor([0, 0, 1, 0, 0, 0], dtype=torch.bool)
IS_REPLAY = torch.tensor([0, 0, 0, 0, 1, 1], dtype=torch.bool)
PARAMS = LossParams(clip_low=0.2, clip_high=0.28, dual_clip=3.0, kl_coef=0.05, entropy_coef=0.01,
                    replay_clip=0.2)


def loss_metrics(batch, rows=slice(None)):
    b = {k: v[rows] for k, v in batch.items()}
    _, metrics = compute_policy_loss(
        b["logprobs"], b["old_logprobs"], b["advantages"], b["response_mask"], params=PARAMS,
        ref_logprobs=b["ref_logprobs"], entropy=b["entropy"], is_offpolicy=IS_OFFPOLICY[rows],
        behaviour_logprobs=b["behaviour_logprobs"], is_replay=IS_REPLAY[rows],
        provenance=provenance_codes(IS_REPHRASED, IS_OFFPOLICY, IS_REPLAY)[rows])
    return {k: float(v) for k, v in metrics.items()}


def clipped(logp, base, adv, low, high, dual=None):
    """The case-split clip of one token: is the bound the active branch of the loss?"""
    ratio = math.exp(logp - base)
    if adv > 0:
        return ratio > 1 + high
    return ratio < 1 - low or (dual is not None and ratio > dual)


def reference_metrics(batch) -> dict:
    """Each kind's counts and means, token by token in float64, from the papers' forms."""
    mask, logp = batch["response_mask"], batch["logprobs"].detach()
    out = {}
    for kind in PROVENANCES:
        rows = [i for i in range(len(mask)) if kind == (
            "rephrased" if IS_REPHRASED[i] else "expert" if IS_OFFPOLICY[i]
            else "replay" if IS_REPLAY[i] else "onpolicy") and mask[i].any()]
        tokens = [(i, t) for i in rows for t in range(mask.shape[1]) if mask[i, t]]
        if not tokens:
            continue
        values = {name: [] for name in ("nll", "ratio", "ppo_kl", "clipfrac", "entropy", "kl")}
        for i, t in tokens:
            lp, old, adv = float(logp[i, t]), float(batch["old_logprobs"][i, t]), \
                float(batch["advantages"][i])
            values["nll"].append(-lp)
            values["ratio"].append(math.exp(lp - old))
            values["ppo_kl"].append(old - lp)
            if kind == "expert":
                values["clipfrac"].append(0.0)           # LUFFY's shaped term is not clipped
            elif kind == "replay":
                values["clipfrac"].append(float(clipped(
                    lp, float(batch["behaviour_logprobs"][i, t]), adv, 0.2, 0.2)))
            else:
                values["clipfrac"].append(float(clipped(lp, old, adv, 0.2, 0.28, dual=3.0)))
            values["entropy"].append(float(batch["entropy"][i, t]))
            values["kl"].append(float(reference.kl_token(
                logp[i, t], batch["ref_logprobs"][i, t], "k3")))
        out[f"{kind}/sequences"] = float(len(rows))
        out[f"{kind}/tokens"] = float(len(tokens))
        out[f"{kind}/advantage"] = sum(float(batch["advantages"][i]) for i in rows) / len(rows)
        out.update({f"{kind}/{name}": sum(v) / len(v) for name, v in values.items()})
    return out


def sums_of(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if k.split("/")[0] in PROVENANCES}


def test_per_provenance_metrics_match_a_float64_reference():
    batch = random_batch(3)
    got = finalize_provenance_metrics(sums_of(loss_metrics(batch)))
    expected = reference_metrics(batch)
    assert set(got) == set(expected)
    assert {k.split("/")[0] for k in got} == set(PROVENANCES)
    for name, value in expected.items():
        assert got[name] == pytest.approx(value, rel=1e-12, abs=1e-12), name
    # the hand-built batch exercises the clip of every clipped kind
    assert got["onpolicy/clipfrac"] + got["rephrased/clipfrac"] > 0
    assert got["replay/clipfrac"] > 0


def test_sums_add_up_across_micro_batches():
    batch = random_batch(4)
    whole = sums_of(loss_metrics(batch))
    parts = [sums_of(loss_metrics(batch, slice(a, b))) for a, b in ((0, 2), (2, 3), (3, 6))]
    assert all(p.keys() == whole.keys() for p in parts), "every piece reports every kind"
    for name, value in whole.items():
        assert sum(p[name] for p in parts) == pytest.approx(value, rel=1e-12, abs=1e-12), name


def test_finalisation_counts_samples_once_per_pass_and_leaves_out_absent_kinds():
    sums = {"onpolicy/sequences_sum": 6.0, "onpolicy/tokens_sum": 30.0,
            "onpolicy/advantage_sum": 3.0, "onpolicy/nll_sum": 15.0,
            "expert/sequences_sum": 0.0, "expert/tokens_sum": 0.0, "expert/nll_sum": 0.0,
            "expert/advantage_sum": 0.0}
    out = finalize_provenance_metrics(sums, passes=2)
    assert out == {"onpolicy/sequences": 3.0, "onpolicy/tokens": 15.0, "onpolicy/advantage": 0.5,
                   "onpolicy/nll": 0.5}


def test_replay_wins_over_offpolicy_in_the_codes():
    codes = provenance_codes(torch.tensor([0, 1, 0, 0]), torch.tensor([0, 0, 1, 1]),
                             torch.tensor([0, 0, 0, 1]))
    assert [PROVENANCES[c] for c in codes] == ["onpolicy", "rephrased", "expert", "replay"]
