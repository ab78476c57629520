"""``judge.backend: openai``: /v1/chat/completions of any OpenAI-compatible server (SGLang,
vLLM, a hosted API, ``repo-megatron serve``) through the official ``openai`` client.

The client's own retries are off: :class:`~.judge.JudgeReward` retries, moving to the next
judge URL, so one policy covers both backends.
"""

from __future__ import annotations

from typing import Optional

import openai

from ..config.data import JudgeConfig
from .judge_backend import JudgeBackend, JudgeCallError


def retryable_status(status: int) -> bool:
    """408 (timeout), 429 (rate limit) and 5xx are worth another attempt."""
    return status in (408, 429) or status >= 500


class OpenAIJudge(JudgeBackend):
    def __init__(self, cfg: JudgeConfig, api_key: Optional[str]):
        self.cfg = cfg
        # the client insists on a key; OpenAI-compatible servers without auth ignore it
        self.api_key = api_key or "EMPTY"
        self.clients: dict[str, openai.AsyncOpenAI] = {}

    def client(self, url: str) -> openai.AsyncOpenAI:
        if url not in self.clients:
            self.clients[url] = openai.AsyncOpenAI(base_url=url, api_key=self.api_key,
                                                   timeout=self.cfg.timeout_s, max_retries=0)
        return self.clients[url]

    async def complete(self, url: str, messages: list[dict]) -> str:
        cfg = self.cfg
        try:
            completion = await self.client(url).chat.completions.create(
                model=cfg.model, messages=messages, temperature=cfg.temperature,
                max_completion_tokens=cfg.max_tokens)
        except openai.APITimeoutError:
            raise JudgeCallError(f"{url}: no answer within {cfg.timeout_s:g} s", True) from None
        except openai.APIConnectionError as e:
            raise JudgeCallError(f"{url}: {type(e).__name__}: {e}", True) from None
        except openai.APIStatusError as e:
            raise JudgeCallError(f"{url}: HTTP {e.status_code}: {e.message}",
                                 retryable_status(e.status_code)) from None
        if not completion.choices or completion.choices[0].message.content is None:
            raise JudgeCallError(f"{url}: the answer has no message content", False)
        choice = completion.choices[0]
        if choice.finish_reason == "abort":
            raise JudgeCallError(f"{url}: the request was aborted", True)
        return choice.message.content

    async def aclose(self) -> None:
        for client in self.clients.values():
            await client.close()
        self.clients = {}
