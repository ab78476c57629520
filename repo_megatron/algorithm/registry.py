"""Registries of policy losses and advantage estimators, filled by decorators, read by name.

A variant is one function with one decorator::

    @register_policy_loss("my_loss")
    def my_loss(logprobs, old_logprobs, advantages, mask, params): ...

and the YAML then says ``algorithm.policy_loss: my_loss``. The module that defines it must be
imported before the name is looked up: built-in variants are imported by
``repo_megatron/algorithm/__init__.py``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Callable, Iterator, TypeVar

F = TypeVar("F", bound=Callable)


class Registry(Mapping):
    """Functions of one kind by name; ``get`` fails with the config key and the known names."""

    def __init__(self, kind: str, config_key: str):
        self.kind = kind              # "policy loss", for messages
        self.config_key = config_key  # "algorithm.policy_loss", for messages
        self._entries: dict[str, Callable] = {}

    def register(self, name: str) -> Callable[[F], F]:
        """Decorator: register the function under ``name`` (a name can be taken only once)."""
        def decorator(fn: F) -> F:
            if name in self._entries and self._entries[name] is not fn:
                taken_by = self._entries[name]
                raise ValueError(f"{self.kind} {name!r} is already registered by "
                                 f"{taken_by.__module__}.{taken_by.__qualname__}")
            self._entries[name] = fn
            return fn
        return decorator

    def get(self, name: str) -> Callable:  # type: ignore[override]
        """The function registered as ``name``; ValueError listing the registered names if none."""
        if name not in self._entries:
            raise ValueError(f"{self.config_key}={name!r} is not a registered {self.kind} "
                             f"(registered: {', '.join(sorted(self._entries))})")
        return self._entries[name]

    def __getitem__(self, name: str) -> Callable:
        return self._entries[name]

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._entries))

    def __len__(self) -> int:
        return len(self._entries)


POLICY_LOSSES = Registry("policy loss", "algorithm.policy_loss")
ADVANTAGE_ESTIMATORS = Registry("advantage estimator", "algorithm.advantage_estimator")


def register_policy_loss(name: str) -> Callable[[F], F]:
    """Register a per-token policy loss under ``name``.

    Signature of the decorated function (all tensors ``[batch, seq]``)::

        fn(logprobs, old_logprobs, advantages, mask, params: LossParams)
            -> (token_loss, token_metrics: dict[str, Tensor])

    ``mask`` (bool) selects the tokens the loss applies to. ``token_loss`` must be 0 outside
    ``mask``, and so must each per-token metric (e.g. a 0/1 "was clipped" indicator);
    :func:`~repo_megatron.algorithm.loss.compute_policy_loss` aggregates them.
    """
    return POLICY_LOSSES.register(name)


def register_advantage_estimator(name: str) -> Callable[[F], F]:
    """Register a group advantage estimator under ``name``.

    Signature of the decorated function::

        fn(rewards [N], group_index [N] (int64 in 0..num_groups-1), num_groups, eps) -> [N]

    Groups are already validated (every group has >= 2 samples);
    :func:`~repo_megatron.algorithm.advantages.compute_advantages` does the reshaping and the
    on/off-policy split.
    """
    return ADVANTAGE_ESTIMATORS.register(name)


def get_policy_loss(name: str) -> Callable:
    """The policy loss registered as ``name`` (ValueError naming the config key)."""
    return POLICY_LOSSES.get(name)


def get_advantage_estimator(name: str) -> Callable:
    """The advantage estimator registered as ``name`` (ValueError naming the config key)."""
    return ADVANTAGE_ESTIMATORS.get(name)
