"""``reward: judge``: an LLM scores each response against the reference answer and solution.

    judge = JudgeReward(cfg.data.judge)       # backend openai (/v1/chat/completions) or sglang
    results = judge.score(requests)           # all requests in flight, max_concurrency at once
    judge.metrics()                           # {"judge/requests": ..., "judge/cache_hits": ...}

Every request is the judge prompt (``judge.template``, filled with the question, the reference
answer and solution, and the response) as one user message, after an optional system message.
A request fails over to the next judge URL on a connection error, timeout, 429 or 5xx, up to
``max_retries`` times with exponential backoff; what still fails is a failed reward (0, with the
last error as its reason, ``failed=True``), never an exception, so a dead judge costs a step its
judged rewards, not the run. Identical requests (same messages and sampling settings) are sent
once: concurrently they share one call, later ones are answered from an LRU cache.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import re
import socket
import time
from collections import Counter, OrderedDict
from typing import Optional, Sequence

from ..config.data import JudgeConfig
from .base import RewardRequest, RewardResult
from .judge_backend import JudgeBackend, JudgeCallError
from .judge_verdict import parse_verdict

log = logging.getLogger(__name__)

_PLACEHOLDER = re.compile(r"\{(question|answer|solution|response|max_score)\}")


def judge_prompt(template: str, request: RewardRequest, max_score: float) -> str:
    """The template with the request filled in. One pass, so braces inside the texts
    (``\\boxed{...}``, a literal ``{response}`` in a response) stay as written."""
    values = {"question": request.question, "answer": request.answer,
              "solution": request.solution if request.solution is not None else "(none given)",
              "response": request.response, "max_score": f"{max_score:g}"}
    return _PLACEHOLDER.sub(lambda m: values[m.group(1)], template)


class JudgeReward:
    """The LLM judge as a reward scorer (``score`` / ``close``, like the reward runner)."""

    def __init__(self, cfg: JudgeConfig, log_dir: Optional[str] = None):
        """``log_dir``: where servers of ``cfg.launch`` write their logs."""
        if not cfg.configured:
            raise ValueError("the judge needs data.judge.urls or data.judge.launch.num_servers")
        self.cfg = cfg
        self.servers = None                 # the ServerLauncher of cfg.launch, if any
        self.urls = self.launch(log_dir) if cfg.launch.num_servers else list(cfg.urls)
        self.template = cfg.prompt_template()
        self.api_key = os.environ.get(cfg.api_key_env) if cfg.api_key_env else None
        self.tokenizer = None
        if cfg.backend == "sglang" and cfg.tokenizer is not None:
            from transformers import AutoTokenizer
            self.tokenizer = AutoTokenizer.from_pretrained(cfg.tokenizer)
        self.cache: OrderedDict[str, str] = OrderedDict()   # request key -> answer text
        self.counters: Counter = Counter()
        self._next_url = 0

    def launch(self, log_dir: Optional[str]) -> list[str]:
        """Start the judge servers of ``cfg.launch``; their URLs as this backend wants them."""
        from ..engines.sglang.launcher import ServerLauncher
        from ..errors import ConfigError

        launch = self.cfg.launch
        ports = [launch.base_port + i for i in range(launch.num_servers)]
        ports += [launch.router_port] if launch.router else []
        busy = [p for p in ports if launch.mode == "local" and port_in_use(launch.host, p)]
        if busy:    # a server that cannot bind would leave its URL to whoever holds the port
            raise ConfigError(f"data.judge.launch: port {busy[0]} on {launch.host} is in use "
                              f"(by the rollout servers?): set data.judge.launch.base_port / "
                              f"router_port to free ports")
        self.servers = ServerLauncher(launch, log_dir)
        try:
            urls, router_url = self.servers.start()
        except FileNotFoundError as e:      # a command that is not on PATH
            self.servers = None
            raise ConfigError(f"data.judge.launch.command: cannot run {e.filename!r} (not "
                              f"found; is the virtual environment active?)") from None
        roots = [router_url] if router_url else urls
        return [f"{url}/v1" for url in roots] if self.cfg.backend == "openai" else roots

    # -- requests -----------------------------------------------------------------------------
    def messages(self, request: RewardRequest) -> list[dict]:
        user = {"role": "user", "content": judge_prompt(self.template, request,
                                                        self.cfg.max_score)}
        if self.cfg.system_prompt is None:
            return [user]
        return [{"role": "system", "content": self.cfg.system_prompt}, user]

    def key(self, messages: list[dict]) -> str:
        """What makes two requests identical: the messages and the sampling settings."""
        cfg = self.cfg
        raw = json.dumps([cfg.backend, cfg.model, cfg.temperature, cfg.max_tokens, messages])
        return hashlib.sha256(raw.encode()).hexdigest()

    def backend(self) -> JudgeBackend:
        if self.cfg.backend == "openai":
            from .judge_openai import OpenAIJudge
            return OpenAIJudge(self.cfg, self.api_key)
        from .judge_sglang import SGLangJudge
        return SGLangJudge(self.cfg, self.tokenizer, self.api_key)

    # -- scoring ------------------------------------------------------------------------------
    def score(self, requests: Sequence[RewardRequest]) -> list[RewardResult]:
        """One result per request, in order; never raises for a judge failure."""
        if not requests:
            return []
        return asyncio.run(self.score_async(requests))

    async def score_async(self, requests: Sequence[RewardRequest]) -> list[RewardResult]:
        backend = self.backend()
        limit = asyncio.Semaphore(self.cfg.max_concurrency)
        calls: dict[str, asyncio.Task] = {}     # identical requests in this batch share a call
        try:
            tasks = []
            for request in requests:
                messages = self.messages(request)
                key = self.key(messages)
                if key not in calls:
                    calls[key] = asyncio.ensure_future(self.answer(key, messages, backend, limit))
                else:
                    self.counters["judge/shared_requests"] += 1
                tasks.append(calls[key])
            outcomes = await asyncio.gather(*tasks)
        finally:
            await backend.aclose()
        return [self.result(outcome) for outcome in outcomes]

    async def answer(self, key: str, messages: list[dict], backend: JudgeBackend,
                     limit: asyncio.Semaphore):
        """The judge's answer text (cached), or the :class:`JudgeCallError` of the last attempt."""
        if key in self.cache:
            self.cache.move_to_end(key)
            self.counters["judge/cache_hits"] += 1
            return self.cache[key]
        urls = self.urls
        start = self._next_url
        self._next_url += 1
        error: Optional[JudgeCallError] = None
        for attempt in range(self.cfg.max_retries + 1):
            if attempt:
                self.counters["judge/retries"] += 1
                await asyncio.sleep(self.cfg.retry_backoff_s * 2 ** (attempt - 1))
            url = urls[(start + attempt) % len(urls)]
            async with limit:
                began = time.perf_counter()
                self.counters["judge/requests"] += 1
                try:
                    text = await backend.complete(url, messages)
                except JudgeCallError as e:
                    error = e
                except Exception as e:  # a malformed answer: this request fails, not the step
                    error = JudgeCallError(f"{url}: {type(e).__name__}: {e}", retryable=False)
                else:
                    self.remember(key, text)
                    return text
                finally:
                    self.counters["judge/latency_s_sum"] += time.perf_counter() - began
            log.warning("judge attempt %d/%d failed: %s", attempt + 1, self.cfg.max_retries + 1,
                        error)
            if not error.retryable:
                break
        return error

    def remember(self, key: str, text: str) -> None:
        if self.cfg.cache_size == 0:
            return
        self.cache[key] = text
        if len(self.cache) > self.cfg.cache_size:
            self.cache.popitem(last=False)

    def result(self, outcome) -> RewardResult:
        """A judge answer (or a failed call) as a reward."""
        if isinstance(outcome, JudgeCallError):
            self.counters["judge/failures"] += 1
            return RewardResult(0.0, f"judge failed: {outcome}", failed=True)
        verdict = parse_verdict(outcome, self.cfg.verdict, self.cfg.max_score)
        if not verdict.ok:
            self.counters["judge/unreadable"] += 1
            return RewardResult(0.0, f"judge: {verdict.reason}", failed=True)
        return RewardResult(verdict.value, f"judge: {verdict.reason}")

    def metrics(self) -> dict[str, float]:
        """The counters since the last call (requests, retries, failures, unreadable verdicts,
        cache hits, shared requests, mean attempt latency), then reset."""
        counters, self.counters = self.counters, Counter()
        out = {k: float(v) for k, v in counters.items() if k != "judge/latency_s_sum"}
        if counters["judge/requests"]:
            out["judge/latency_s_mean"] = counters["judge/latency_s_sum"] / counters["judge/requests"]
        return out

    def close(self) -> None:
        """Stop the judge servers this reward started (connections never outlive a call)."""
        if self.servers is not None:
            self.servers.stop()
            self.servers = None


def port_in_use(host: str, port: int) -> bool:
    """Whether something already listens on ``host:port``."""
    with socket.socket() as sock:
        sock.settimeout(1.0)
        return sock.connect_ex((host, port)) == 0
