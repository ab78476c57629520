"""Continuous batching in ``repo-megatron serve`` (issue 28), over HTTP on the tiny model: a
request joins the running batch at the engine's next step and leaves it as soon as it is done,
so a short request does not wait for a long one; joining changes nothing in its tokens or
log-probs; an aborted row leaves its batch-mates untouched; the three pause modes hold the
running requests as SGLang does, and a request across a weight update reports which version
sampled which tokens."""

import asyncio
import threading
import time

import httpx
import pytest

from ..sglang.inprocess import serve_model

LONG_TOKENS = 200
LONG = {"input_ids": [1, 2, 3], "rid": "long",
        "sampling_params": {"temperature": 0, "max_new_tokens": LONG_TOKENS}}
# The random tiny model's distribution is nearly flat over 49k tokens, where float rounding
# of a differently shaped batch moves an inverse-CDF sample to the next id; top-k keeps the
# sampled tokens a rounding error cannot reach.
SEEDED = {"temperature": 0.8, "top_k": 20}


@pytest.fixture(scope="module")
def served(model_dir):
    with serve_model(model_dir) as (url, server):
        yield url, server


class Forwards:
    """The ``[rows, width]`` shape of every forward of the served model."""

    def __init__(self, model):
        self.shapes: list[tuple[int, int]] = []
        self.handle = model.register_forward_pre_hook(
            lambda module, args, kwargs: self.shapes.append(tuple(kwargs["input_ids"].shape)),
            with_kwargs=True)

    def wait_for(self, count: int, timeout_s: float = 300.0) -> None:
        deadline = time.monotonic() + timeout_s
        while len(self.shapes) < count:
            assert time.monotonic() < deadline, f"only {len(self.shapes)} forwards"
            time.sleep(0.001)

    def __enter__(self) -> "Forwards":
        return self

    def __exit__(self, *exc) -> None:
        self.handle.remove()


class Sent(threading.Thread):
    """One /generate in a thread: its answer and when it was sent and answered."""

    def __init__(self, url: str, body: dict):
        super().__init__()
        self.url, self.body = url, body
        self.answer: dict = {}
        self.sent = self.answered = 0.0

    def run(self) -> None:
        self.sent = time.perf_counter()
        self.answer = httpx.post(self.url + "/generate", json=self.body, timeout=300).json()
        self.answered = time.perf_counter()

    @property
    def seconds(self) -> float:
        return self.answered - self.sent


def send(url: str, body: dict) -> Sent:
    sent = Sent(url, body)
    sent.start()
    return sent


def generate(url: str, body: dict) -> dict:
    return httpx.post(url + "/generate", json=body, timeout=300).json()


def post(url: str, path: str, body: object = None) -> httpx.Response:
    return httpx.post(url + path, json=body, timeout=60)


def same_outputs(answer: dict, reference: dict) -> bool:
    """The same tokens, and log-probs equal up to float rounding: CPU matmuls round a row
    differently in batches of other sizes (as SGLang's kernels do, unless deterministic
    inference makes them batch-invariant)."""
    def logprobs(a):
        return [lp for lp, _, _ in a["meta_info"]["output_token_logprobs"]]

    return answer["output_ids"] == reference["output_ids"] and \
        logprobs(answer) == pytest.approx(logprobs(reference), abs=1e-4)


def test_continuous_a_short_request_sent_while_a_long_one_decodes_finishes_long_before_it(
        served):
    url, server = served
    with Forwards(server.worker.engine.model) as forwards:
        long = send(url, LONG)
        forwards.wait_for(20)                           # the long one is decoding
        short = send(url, {"input_ids": [4, 5], "sampling_params": {
            "temperature": 0, "max_new_tokens": 2}})
        short.join()
        long.join()
    assert long.answer["meta_info"]["completion_tokens"] == LONG_TOKENS
    assert short.answer["meta_info"]["completion_tokens"] == 2
    assert short.answered < long.answered and short.seconds < 0.2 * long.seconds
    assert (2, 1) in forwards.shapes                    # both decoded in one batch


@pytest.mark.parametrize("sampling", [{"temperature": 0}, {**SEEDED, "sampling_seed": 7}],
                         ids=["greedy", "seeded"])
def test_continuous_a_request_that_joins_a_running_batch_gets_what_it_gets_alone(served,
                                                                                 sampling):
    url, server = served
    # a prompt shorter than the running rows' cache and one longer: both are left-padded
    probes = [{"input_ids": [5, 6, 7, 8, 9],
               "sampling_params": {**sampling, "max_new_tokens": 16}, "return_logprob": True},
              {"input_ids": list(range(100, 160)),
               "sampling_params": {**sampling, "max_new_tokens": 16}, "return_logprob": True}]
    alone = [generate(url, p) for p in probes]
    with Forwards(server.worker.engine.model) as forwards:
        long = send(url, LONG)
        forwards.wait_for(30)
        joined = [send(url, p) for p in probes]
        for sent in joined:
            sent.join()
        long.join()
    assert any(rows == 3 and width == 1 for rows, width in forwards.shapes)
    assert all(same_outputs(s.answer, a) for s, a in zip(joined, alone))


def test_continuous_aborting_one_row_leaves_the_others_untouched(served):
    url, server = served
    bodies = [{"input_ids": [10 + i, 11, 12], "rid": f"row{i}", "return_logprob": True,
               "sampling_params": {**SEEDED, "sampling_seed": i, "max_new_tokens": 120}}
              for i in range(3)]
    together = [send(url, b) for b in bodies]
    for sent in together:
        sent.join()
    with Forwards(server.worker.engine.model) as forwards:
        rows = [send(url, b) for b in bodies]
        while (3, 1) not in forwards.shapes:            # all three decode together
            forwards.wait_for(len(forwards.shapes) + 1)
        assert post(url, "/abort_request", {"rid": "row1"}).status_code == 200
        at_abort = len(forwards.shapes)
        for sent in rows:
            sent.join()
    assert rows[1].answer["meta_info"]["finish_reason"]["type"] == "abort"
    assert same_outputs(rows[0].answer, together[0].answer)
    assert same_outputs(rows[2].answer, together[2].answer)
    # the aborted row left at the next step; the others decoded on without it
    after = forwards.shapes[at_abort + 1:]
    assert after[0] == (2, 1) and all(rows < 3 for rows, _ in after)


def decoding(forwards: Forwards, count: int = 10) -> None:
    forwards.wait_for(len(forwards.shapes) + count)


@pytest.mark.parametrize("mode", ["retract", "in_place"])
def test_continuous_a_paused_request_goes_on_where_it_stopped(served, mode):
    url, server = served
    body = {**LONG, "return_logprob": True,
            "sampling_params": {**SEEDED, "sampling_seed": 3, "max_new_tokens": 150}}
    reference = generate(url, body)
    with Forwards(server.worker.engine.model) as forwards:
        request = send(url, body)
        decoding(forwards)
        assert post(url, "/pause_generation", {"mode": mode}).status_code == 200
        paused_at = len(forwards.shapes)
        held = dict(server.worker.stream.generated())
        time.sleep(0.3)
        assert len(forwards.shapes) == paused_at and request.is_alive()    # nothing runs
        # retract frees the rows and their cache (a flush is allowed), in_place keeps them
        assert post(url, "/flush_cache").status_code == (200 if mode == "retract" else 400)
        assert post(url, "/continue_generation").status_code == 200
        request.join()
    (tokens,) = held.values()
    assert 0 < tokens < 150
    if mode == "retract":              # its prompt and tokens are prefilled again
        assert forwards.shapes[paused_at] == (1, len(LONG["input_ids"]) + tokens)
    else:
        assert forwards.shapes[paused_at] == (1, 1)
    assert same_outputs(request.answer, reference)


def test_continuous_an_unknown_pause_mode_is_a_400_and_pauses_nothing(served):
    url, server = served
    answer = post(url, "/pause_generation", {"mode": "later"})
    assert answer.status_code == 400 and "retract" in answer.json()["error"]["message"]
    assert not server.worker.paused


def test_continuous_an_abort_pause_answers_the_running_requests_and_holds_new_ones(served):
    url, server = served
    with Forwards(server.worker.engine.model) as forwards:
        running = send(url, LONG)
        decoding(forwards)
        assert post(url, "/pause_generation", {"mode": "abort"}).status_code == 200
        running.join(30)
        assert running.answer["meta_info"]["finish_reason"]["type"] == "abort"
        assert not server.worker.running
        waiting = send(url, {"input_ids": [4, 5], "sampling_params": {"max_new_tokens": 2}})
        time.sleep(0.3)
        assert waiting.is_alive()                      # held until generation continues
        post(url, "/continue_generation")
        waiting.join()
    assert waiting.answer["meta_info"]["completion_tokens"] == 2


def test_async_a_request_across_a_weight_update_reports_which_version_sampled_what(served):
    url, server = served
    body = {**LONG, "sampling_params": {"temperature": 0, "max_new_tokens": 100}}
    with Forwards(server.worker.engine.model) as forwards:
        request = send(url, body)
        decoding(forwards)
        post(url, "/pause_generation", {"mode": "in_place"})
        (before,) = server.worker.stream.generated().values()
        try:
            answer = post(url, "/update_weight_version",
                          {"new_version": "v1", "abort_all_requests": False})
            assert answer.json()["success"]
            post(url, "/continue_generation")
            request.join()
        finally:
            post(url, "/update_weight_version", {"new_version": "default"})
    meta = request.answer["meta_info"]
    assert meta["weight_version"] == "v1"
    assert meta["weight_versions"] == [{"version": "default", "start": 0, "end": before},
                                       {"version": "v1", "start": before, "end": 100}]


def test_continuous_an_engine_call_without_a_pause_waits_for_the_running_requests(served):
    """SGLang's model-update lock: a weight update (any engine call) sent while requests
    decode runs once they have finished, and a request sent meanwhile waits for it."""
    url, server = served
    worker = server.worker
    ran_after: list[int] = []
    with Forwards(worker.engine.model) as forwards:
        running = send(url, LONG)
        decoding(forwards)
        call = asyncio.run_coroutine_threadsafe(
            worker.on_engine_thread(lambda: ran_after.append(len(forwards.shapes))),
            worker._loop)
        waiting = send(url, {"input_ids": [4, 5], "sampling_params": {"max_new_tokens": 2}})
        call.result(60)
        running.join()
        waiting.join()
    assert running.answer["meta_info"]["completion_tokens"] == LONG_TOKENS
    assert waiting.answer["meta_info"]["completion_tokens"] == 2
    (at,) = ran_after
    assert at == LONG_TOKENS                 # the long one's prefill and decodes, all done
    assert forwards.shapes[at] == (1, 2)     # then the waiting one's prefill
