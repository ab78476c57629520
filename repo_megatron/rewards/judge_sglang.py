"""``judge.backend: sglang``: SGLang's native /generate through our client
(:class:`~repo_megatron.engines.sglang.client.SGLangClient`), one server or an sglang-router.

With ``judge.tokenizer`` the messages go through that tokenizer's chat template here and are
sent as ``input_ids`` (what SGLang's own chat endpoint would do); without it, the prompt text
is sent as ``text`` and the server tokenises it as it is.
"""

from __future__ import annotations

from typing import Optional

from ..config.data import JudgeConfig
from ..data.chat import ChatFormatter
from ..engines.sglang.client import SGLangClient, SGLangError, SGLangTimeout
from .judge_backend import JudgeBackend, JudgeCallError
from .judge_openai import retryable_status


class SGLangJudge(JudgeBackend):
    def __init__(self, cfg: JudgeConfig, tokenizer=None, api_key: Optional[str] = None):
        """``tokenizer``: the judge model's tokenizer (None: send text)."""
        self.cfg, self.tokenizer, self.api_key = cfg, tokenizer, api_key
        # api_key: SGLang's --api-key, a Bearer token on every request
        self.client = SGLangClient(timeout_s=cfg.timeout_s, api_key=api_key,
                                   max_concurrency_per_server=cfg.max_concurrency, max_retries=0)

    def body(self, messages: list[dict]) -> dict:
        """The /generate request of the chat ``messages`` (an optional system message, then
        one user turn)."""
        params = {"temperature": self.cfg.temperature, "max_new_tokens": self.cfg.max_tokens,
                  "skip_special_tokens": True}
        user = messages[-1]["content"]
        system = messages[0]["content"] if len(messages) > 1 else None
        if self.tokenizer is not None:
            formatter = ChatFormatter(self.tokenizer, True, system)
            return {"input_ids": formatter.prompt_ids(user), "sampling_params": params}
        return {"text": user if system is None else f"{system}\n\n{user}",
                "sampling_params": params}

    async def complete(self, url: str, messages: list[dict]) -> str:
        try:
            answer = await self.client.request_once(url, "/generate", self.body(messages))
        except SGLangTimeout as e:
            raise JudgeCallError(str(e), True) from None
        except SGLangError as e:
            retryable = e.status is None or retryable_status(e.status)
            raise JudgeCallError(str(e), retryable) from None
        if isinstance(answer, list):
            answer = answer[0] if answer else {}
        if not isinstance(answer, dict) or not isinstance(answer.get("text"), str):
            raise JudgeCallError(f"{url}/generate: the answer has no text", False)
        finish = (answer.get("meta_info") or {}).get("finish_reason") or {}
        if finish.get("type") == "abort":
            raise JudgeCallError(f"{url}/generate: the request was aborted", True)
        return answer["text"]

    async def aclose(self) -> None:
        await self.client.aclose()
