"""The SGLang engine's stream: each request goes out when it is submitted (so the overlapped
RePO schedule's rephrases run while other groups decode), with the same results as a batch."""

from repo_megatron.config.algorithm import AlgorithmConfig, RePOConfig
from repo_megatron.config.rollout import RolloutConfig, SGLangConfig
from repo_megatron.engines.base import SamplingParams
from repo_megatron.engines.sglang import SGLangEngine
from repo_megatron.rollout import RolloutStage
from tests.rollout.fakes import FORMATTER, InProcessScorer, prompt

from .inprocess import serve_model

PARAMS = [SamplingParams(temperature=0.8, max_new_tokens=6, seed=s) for s in (1, 2, 3)]
PROMPTS = [[101, 102, 103], [104, 105], [106, 107, 108, 109]]


def test_a_stream_returns_what_a_batch_returns_and_takes_requests_while_others_run(model_dir):
    with serve_model(model_dir) as (url, _), SGLangEngine(SGLangConfig(urls=[url])) as engine:
        expected = engine.generate(PROMPTS, PARAMS)
        with engine.stream() as stream:
            a, b = stream.submit(PROMPTS[0], PARAMS[0]), stream.submit(PROMPTS[1], PARAMS[1])
            got = dict(stream.wait())
            assert got and set(got) <= {a, b}
            c = stream.submit(PROMPTS[2], PARAMS[2])
            while len(got) < 3:
                got.update(stream.wait())
            assert stream.wait() == []
    assert [got[t].token_ids for t in (a, b, c)] == [r.token_ids for r in expected]


def test_rephrase_schedules_give_the_same_groups_through_sglang(model_dir):
    hard = [prompt(f"p{i}", f"Compute {i} + 40.", str(40 + i), solution=f"\\boxed{{{40 + i}}}")
            for i in range(3)]
    with serve_model(model_dir) as (url, _), SGLangEngine(SGLangConfig(urls=[url])) as engine:
        groups = {}
        for schedule in ("lazy", "overlap", "eager"):
            stage = RolloutStage(engine, FORMATTER, InProcessScorer(),
                                 RolloutConfig(group_size=2, max_new_tokens=8),
                                 AlgorithmConfig(repo=RePOConfig(schedule=schedule,
                                                                 require_verified=False)))
            batch = stage.run(hard, step=0)
            groups[schedule] = [[s.response_ids for s in g.samples] for g in batch.groups]
            assert all(g.injected_index is not None for g in batch.groups), schedule
    assert groups["lazy"] == groups["overlap"] == groups["eager"]
