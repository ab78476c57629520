"""``rollout:`` how responses are sampled, and by which engine."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from .base import ConfigError, knob, section


@dataclass
class SGLangConfig:
    urls: list[str] = knob(default_factory=list, help="SGLang worker URLs (http://host:port); "
                                                      "empty with no router = embedded engine")
    router_url: Optional[str] = knob(None, "sglang-router URL; workers are listed from its "
                                           "GET /workers for the endpoints it does not proxy")
    request_timeout_s: float = knob(600.0, "Per-request timeout", gt=0)
    max_concurrency_per_server: int = knob(64, "In-flight /generate requests per server", ge=1)
    max_retries: int = knob(3, "Retries of a request on connection errors and 503", ge=0)
    weight_sync: str = knob("disk", "How new weights reach the servers",
                            choices=["disk", "tensor", "distributed"])
    weight_bucket_mb: int = knob(512, "Bucket size of tensor/distributed weight updates", ge=1)


@dataclass
class RolloutConfig:
    engine: str = knob("auto", "`embedded` (Hugging Face model in the trainer process, CPU ok), "
                               "`sglang`, or `auto` = sglang when sglang.urls or "
                               "sglang.router_url is set", choices=["auto", "embedded", "sglang"])
    prompts_per_step: int = knob(8, "Prompts sampled per training step (global)", ge=1)
    group_size: int = knob(8, "Responses per prompt (G)", ge=2)
    temperature: float = knob(1.0, "Sampling temperature", ge=0)
    top_p: float = knob(1.0, "Nucleus sampling threshold", gt=0, le=1)
    top_k: int = knob(-1, "Top-k sampling (-1 = off)", ge=-1)
    max_new_tokens: int = knob(512, "Longest response", ge=1)
    stop: list[str] = knob(default_factory=list, help="Stop strings")
    stop_token_ids: list[int] = knob(default_factory=list, help="Extra stop token ids (the "
                                                               "tokenizer's EOS always stops)")
    batch_size: int = knob(64, "Embedded engine: sequences generated together", ge=1)
    sglang: SGLangConfig = section(SGLangConfig, "SGLang servers and weight sync")

    def validate(self, path: str) -> None:
        if self.engine == "sglang" and not (self.sglang.urls or self.sglang.router_url):
            raise ConfigError(f"{path}.engine=sglang needs {path}.sglang.urls or "
                              f"{path}.sglang.router_url")
