"""API keys as SGLang checks them (``python/sglang/srt/utils/auth.py``, sglang 0.5.23).

``--api-key`` protects every endpoint; ``--admin-api-key`` protects the management endpoints
(weights, pause/continue, abort, flush), which then accept only the admin key. Keys travel as
``Authorization: Bearer <key>`` and are compared in constant time. ``/health*``, ``/ready*``,
``/metrics*`` and ``OPTIONS`` stay open (probes need no secret). Levels per endpoint:

- ``NORMAL``: the api key if one is set, else open (also when only an admin key is set);
- ``ADMIN_OPTIONAL``: the admin key if one is set, else the api key if set, else open;
- ``ADMIN_FORCE``: the admin key, and refused (403) when the server has none.

Refusals are 401 ``{"error": "Unauthorized"}`` or 403 ``{"error": "Forbidden"}``.
"""

from __future__ import annotations

import enum
import secrets
from typing import Callable, Optional


class AuthLevel(str, enum.Enum):
    """Who may call an endpoint (SGLang's names and values)."""
    NORMAL = "normal"
    ADMIN_OPTIONAL = "admin_optional"
    ADMIN_FORCE = "admin_force"


def auth_level(level: AuthLevel) -> Callable:
    """Mark a route's endpoint with its level (unmarked endpoints are ``NORMAL``)."""
    def mark(endpoint):
        endpoint._auth_level = level
        return endpoint
    return mark


def bearer_matches(authorization: Optional[str], key: str) -> bool:
    """Whether ``Authorization: Bearer <token>`` carries ``key`` (constant-time compare)."""
    if not authorization:
        return False
    scheme, space, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not space:
        return False
    return secrets.compare_digest(token.encode(), key.encode())


def decide(method: str, path: str, authorization: Optional[str], api_key: Optional[str],
           admin_api_key: Optional[str], level: AuthLevel) -> Optional[int]:
    """None if the request may pass, else its status (401 or 403)."""
    if method == "OPTIONS" or path.startswith(("/health", "/ready", "/metrics")):
        return None
    if level == AuthLevel.ADMIN_FORCE:
        if not admin_api_key:
            return 403
        return None if bearer_matches(authorization, admin_api_key) else 401
    key = (admin_api_key or api_key) if level == AuthLevel.ADMIN_OPTIONAL else api_key
    if key and not bearer_matches(authorization, key):
        return 401
    return None
