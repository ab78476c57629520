"""The LLM judge against scripted servers: verdicts, the prompt it sends, the cache, and every
way a judge can fail (timeouts, 5xx, refused requests, dead servers, malformed answers) ending
as a failed reward with its reason, never an exception."""

import time

import pytest

from repo_megatron.config.data import JudgeConfig
from repo_megatron.rewards.base import RewardRequest
from repo_megatron.rewards.judge import JudgeReward

from .fake_judges import FakeJudge, refused_url, running


def judge_for(urls, backend="openai", **settings) -> JudgeReward:
    roots = [f"{u}/v1" if backend == "openai" and not u.endswith("/v1") else u for u in urls]
    return JudgeReward(JudgeConfig(backend=backend, urls=roots, retry_backoff_s=0.05,
                                   **settings))


def ask(judge, *responses, question="Compute 6 * 7.", answer="42"):
    return judge.score([RewardRequest(r, answer, question, solution="6 * 7 = \\boxed{42}")
                        for r in responses])


@pytest.mark.parametrize("backend", ["openai", "sglang"])
def test_verdicts_become_rewards_with_their_reasons(backend):
    fake = FakeJudge()
    with running(fake) as urls:
        right, wrong, mumble = ask(judge_for(urls, backend), "right", "wrong", "mumble")
    assert (right.value, right.failed, right.reason) == (1.0, False, "judge: verdict yes (strict)")
    assert (wrong.value, wrong.failed, wrong.reason) == (0.0, False, "judge: verdict no (strict)")
    assert mumble.failed and mumble.value == 0.0
    assert mumble.reason == ("judge: no verdict in the judge's answer: "
                             "'I am not sure what to say.'")


def test_the_request_carries_the_problem_the_references_and_the_response():
    fake = FakeJudge()
    with running(fake) as urls:
        ask(judge_for(urls, model="judge-7b", system_prompt="Be strict.", max_tokens=64), "right")
    (body,) = fake.bodies
    system, user = body["messages"]
    assert system == {"role": "system", "content": "Be strict."}
    assert user["role"] == "user"
    for text in ("Compute 6 * 7.", "Reference answer:\n42", "6 * 7 = \\boxed{42}",
                 "Response to grade:\nright", "`Verdict: yes`"):
        assert text in user["content"]
    assert (body["model"], body["temperature"], body["max_completion_tokens"]) == \
        ("judge-7b", 0.0, 64)


def test_the_score_verdict_scales_by_max_score():
    fake = FakeJudge(lambda prompt, call: "text:Close.\nScore: 3")
    with running(fake) as urls:
        (result,) = ask(judge_for(urls, verdict="score", max_score=4), "anything")
    assert result.value == 0.75 and result.reason == "judge: score 3 (strict)"
    assert "from 0 (wrong) to 4 (fully correct)" in fake.bodies[0]["messages"][-1]["content"]


def test_the_sglang_backend_applies_the_judge_tokenizer_chat_template(smollm2_tokenizer,
                                                                      tmp_path):
    smollm2_tokenizer.save_pretrained(tmp_path)
    fake = FakeJudge()
    with running(fake) as urls:
        (result,) = ask(judge_for(urls, "sglang", tokenizer=str(tmp_path)), "right")
    (body,) = fake.bodies
    text = smollm2_tokenizer.decode(body["input_ids"])
    assert text.startswith("<|im_start|>system\n") and text.endswith("<|im_start|>assistant\n")
    assert "Response to grade:\nright" in text
    assert body["sampling_params"] == {"temperature": 0.0, "max_new_tokens": 1024,
                                       "skip_special_tokens": True}
    assert (result.value, result.failed) == (0.0, False)  # the fake says no to unread prompts


def test_identical_requests_are_sent_once_then_answered_from_the_cache():
    fake = FakeJudge()
    with running(fake) as urls:
        judge = judge_for(urls)
        first = ask(judge, "right", "right", "wrong", "right")
        assert fake.calls == 2
        assert judge.metrics() == {"judge/requests": 2.0, "judge/shared_requests": 2.0,
                                   "judge/latency_s_mean": pytest.approx(0.0, abs=5.0)}
        again = ask(judge, "right", "wrong")
        assert fake.calls == 2
        assert judge.metrics() == {"judge/cache_hits": 2.0}
        uncached = judge_for(urls, cache_size=0)
        ask(uncached, "right")
        ask(uncached, "right")
        assert fake.calls == 4
    assert [r.value for r in first] == [1.0, 1.0, 0.0, 1.0]
    assert [r.value for r in again] == [1.0, 0.0]


def test_the_cache_keeps_the_most_recent_answers():
    fake = FakeJudge()
    with running(fake) as urls:
        judge = judge_for(urls, cache_size=1)
        ask(judge, "right")
        ask(judge, "wrong")          # evicts "right"
        ask(judge, "right")
        assert fake.calls == 3


@pytest.mark.parametrize("backend", ["openai", "sglang"])
def test_a_hung_judge_times_out_and_the_request_moves_to_the_next_server(backend):
    hung, healthy = FakeJudge(lambda p, c: "hang"), FakeJudge()
    with running(hung, healthy) as urls:
        judge = judge_for(urls, backend, timeout_s=0.5, max_retries=1)
        start = time.monotonic()
        results = ask(judge, "right", "wrong")
        elapsed = time.monotonic() - start
    assert [r.value for r in results] == [1.0, 0.0] and not any(r.failed for r in results)
    assert elapsed < 10
    assert judge.metrics()["judge/retries"] == 1.0     # request 0 started on the hung server


@pytest.mark.parametrize("backend", ["openai", "sglang"])
def test_a_judge_that_never_answers_is_a_failed_reward_after_its_retries(backend):
    hung = FakeJudge(lambda p, c: "hang")
    with running(hung) as urls:
        judge = judge_for(urls, backend, timeout_s=0.3, max_retries=2)
        start = time.monotonic()
        (result,) = ask(judge, "right")
        elapsed = time.monotonic() - start
    assert result.failed and result.value == 0.0
    assert result.reason.startswith("judge failed: ") and "0.3 s" in result.reason
    assert hung.calls == 3 and elapsed < 6
    assert judge.metrics()["judge/failures"] == 1.0


@pytest.mark.parametrize("backend", ["openai", "sglang"])
def test_server_errors_are_retried_and_refusals_are_not(backend):
    flaky = FakeJudge(lambda p, c: 503 if c == 1 else by_cue_right(p, c))
    with running(flaky) as urls:
        (result,) = ask(judge_for(urls, backend, max_retries=2), "right")
    assert result.value == 1.0 and flaky.calls == 2
    refusing = FakeJudge(lambda p, c: 400)
    with running(refusing) as urls:
        (result,) = ask(judge_for(urls, backend, max_retries=2), "right")
    assert result.failed and refusing.calls == 1
    assert "400" in result.reason and "scripted 400" in result.reason


def by_cue_right(prompt, call):
    return "text:Verdict: yes"


@pytest.mark.parametrize("backend", ["openai", "sglang"])
def test_a_dead_judge_fails_its_rewards_and_the_step_goes_on(backend):
    judge = judge_for([refused_url(), refused_url()], backend, max_retries=1)
    results = ask(judge, "right", "wrong")
    assert all(r.failed and r.value == 0.0 for r in results)
    assert all(r.reason.startswith("judge failed: ") for r in results)
    assert judge.metrics()["judge/requests"] == 4.0


@pytest.mark.parametrize("backend", ["openai", "sglang"])
def test_a_malformed_answer_is_a_failed_reward(backend):
    fake = FakeJudge(lambda p, c: "malformed")
    with running(fake) as urls:
        (result,) = ask(judge_for(urls, backend, max_retries=0), "right")
    assert result.failed and result.reason.startswith("judge failed: ")


@pytest.mark.parametrize("backend", ["openai", "sglang"])
def test_the_api_key_is_sent_as_a_bearer_token(backend, monkeypatch):
    monkeypatch.setenv("MY_JUDGE_KEY", "s3cret")
    fake = FakeJudge()
    with running(fake) as urls:
        ask(judge_for(urls, backend, api_key_env="MY_JUDGE_KEY"), "right")
    assert fake.headers[0]["authorization"] == "Bearer s3cret"


def test_a_judge_command_that_is_not_installed_is_a_one_line_config_error(tmp_path):
    from repo_megatron.errors import ConfigError
    from repo_megatron.config.rollout import SGLangLaunchConfig
    from tests.sglang.servers import free_ports

    launch = SGLangLaunchConfig(num_servers=1, command=["no-such-judge-server"],
                                base_port=free_ports(1))
    with pytest.raises(ConfigError) as error:
        JudgeReward(JudgeConfig(launch=launch), log_dir=str(tmp_path))
    assert str(error.value) == ("data.judge.launch.command: cannot run 'no-such-judge-server' "
                                "(not found; is the virtual environment active?)")
