"""A training run over a weighted mixture of two sources (each with its own reward): prompts in
the order the seed fixes, rollout metrics per source, and a hard-sample ledger that a kill -9
in the middle of writing it does not tear and that --resume continues exactly."""

import os
import signal
import sys

import yaml

from repo_megatron.config.base import build
from repo_megatron.config.data import DataConfig
from repo_megatron.data import ChatFormatter, load_sources
from repo_megatron.metrics.ledger import read_ledger
from repo_megatron.metrics.writer import read_rows
from repo_megatron.rewards.judge import port_in_use
from repo_megatron.run.prompts import MixtureSampler
from tests.helpers import write_scripted_chat_model
from tests.rollout.fakes import ByteTokenizer
from tests.sglang.servers import free_ports
from tests.run.conftest import ROOT, tiny_run_config
from tests.run.test_resume import _run

STEPS, PROMPTS_PER_STEP = 3, 3
SOURCES = [
    {"path": os.path.join(ROOT, "examples", "data", "arith_train.jsonl"), "name": "arith",
     "weight": 2.0, "reward": "math"},
    {"path": os.path.join(ROOT, "examples", "data", "finance_train.jsonl"), "name": "finance",
     "weight": 1.0, "reward": "exact",
     "fields": {"question": "problem", "answer": "final_answer", "solution": "rationale"}},
]


def write_config(tmp_path, name, model, steps=STEPS, sources=SOURCES,
                 prompts_per_step=PROMPTS_PER_STEP, **data):
    cfg = tiny_run_config(model, str(tmp_path / name), train_steps=steps,
                          checkpoint={"save_interval": 1, "keep_last": 3,
                                      "hf_export_at_end": False})
    cfg["rollout"]["prompts_per_step"] = prompts_per_step
    cfg["data"] = {"sources": sources, "eval_path": cfg["data"]["eval_path"],
                   "eval_max_prompts": 2, "reward": "math", **data}
    path = str(tmp_path / f"{name}.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(cfg, f)
    return path, str(tmp_path / name)


def steps_of(ledger):
    """{step: sorted prompt uids sampled at that step} from the ledger's histories."""
    out = {}
    for record in ledger:
        for entry in record["history"]:
            out.setdefault(entry["step"], []).append(record["uid"])
    return {step: sorted(uids) for step, uids in sorted(out.items())}


def test_mixture_run_is_seeded_per_source_and_its_ledger_survives_kill_and_resume(
        tiny_chat_model, tmp_path):
    full_cfg, full_dir = write_config(tmp_path, "full", tiny_chat_model)
    code, out = _run(full_cfg)
    assert code == 0, out

    # The prompts of every step are the mixture sampler's, for this seed.
    data = build(DataConfig, {"sources": SOURCES}, "data")
    sampler = MixtureSampler({s.name: (p, s.weight) for s, p in load_sources(
        data, ChatFormatter(ByteTokenizer(), apply_chat_template=False))}, seed=3)
    ledger = read_ledger(os.path.join(full_dir, "ledger.jsonl"))
    expected = {step: sorted(p.uid for p in sampler.take(PROMPTS_PER_STEP))
                for step in range(1, STEPS + 1)}
    assert steps_of(ledger) == expected
    assert {r["source"] for r in ledger} == {"arith", "finance"}

    # Every rollout metric is also reported per source, and the counts add up.
    rows = [r for r in read_rows(full_dir) if r["step"] > 0]
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    for row in rows:
        sampled = sum(row.get(f"rollout/{s}/groups", 0) for s in ("arith", "finance"))
        assert sampled == row["rollout/groups"] == PROMPTS_PER_STEP
        for source in ("arith", "finance"):
            if row[f"rollout/{source}/groups"]:
                for metric in ("reward_onpolicy_mean", "gate_rate", "response_length_mean"):
                    assert f"rollout/{source}/{metric}" in row
        assert row["ledger/prompts_seen"] == len({u for s in range(1, row["step"] + 1)
                                                  for u in expected[s]})

    # Killed while replacing the step-3 ledger: the step-2 ledger is still whole.
    cut_cfg, cut_dir = write_config(tmp_path, "cut", tiny_chat_model)
    code, out = _run(cut_cfg, failpoint="ledger_before_replace:3")
    assert code == -signal.SIGKILL, out
    assert max(steps_of(read_ledger(os.path.join(cut_dir, "ledger.jsonl")))) == 2
    code, out = _run(cut_cfg, "--resume")
    assert code == 0, out
    assert read_ledger(os.path.join(cut_dir, "ledger.jsonl")) == ledger
    resumed = {r["step"]: r for r in read_rows(cut_dir)}
    for row in rows:
        assert resumed[row["step"]]["rollout/finance/groups"] == row["rollout/finance/groups"]
        assert resumed[row["step"]]["rollout/reward_onpolicy_mean"] == \
            row["rollout/reward_onpolicy_mean"]


def test_a_judged_source_trains_with_the_judge_the_run_starts_and_stops(tiny_chat_model,
                                                                        tmp_path):
    judge_model = write_scripted_chat_model(str(tmp_path / "judge"), "Verdict: yes")
    port = free_ports(1)
    sources = [{**SOURCES[0], "weight": 1.0}, {**SOURCES[1], "reward": "judge"}]
    launch = {"num_servers": 1, "base_port": port, "startup_timeout_s": 300,
              "command": [sys.executable, "-m", "repo_megatron.cli", "serve"],
              "args": ["--model", judge_model, "--threads", "1"]}
    cfg, run_dir = write_config(tmp_path, "judged", tiny_chat_model, steps=1, sources=sources,
                                prompts_per_step=5, judge={"launch": launch, "max_tokens": 8})
    code, out = _run(cfg)
    assert code == 0, out
    (row,) = [r for r in read_rows(run_dir) if r["step"] == 1]
    assert row["rollout/finance/groups"] > 0 and row["rollout/arith/groups"] > 0
    assert row["rollout/finance/reward_onpolicy_mean"] == 1.0     # the judge says yes to all
    assert row["judge/requests"] > 0 and "judge/failures" not in row
    assert not port_in_use("127.0.0.1", port)                       # stopped with the run
