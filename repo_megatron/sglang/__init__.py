"""SGLang rollouts: an async HTTP client, sglang-router support, weight sync strategies, and
a launcher for server pools. :class:`SGLangEngine` is the rollout engine the stage uses."""

from .client import SGLangClient, SGLangError, SGLangTimeout
from .engine import SGLangEngine

__all__ = ["SGLangClient", "SGLangEngine", "SGLangError", "SGLangTimeout"]
