"""Group-relative advantages: GRPO, Dr.GRPO, and the on/off-policy split of Replay-Enhanced PO.

Every response ``o_i`` of a prompt gets one scalar advantage from the rewards of its group
(the ``G`` responses to the same prompt); the trainer broadcasts it to all of its tokens.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .registry import get_advantage_estimator


def _group_reduce(values: Tensor, group_index: Tensor, num_groups: int, reduce: str) -> Tensor:
    """``values`` [N] reduced per group (``sum``, ``amax``, ``amin``) -> [num_groups]."""
    return values.new_zeros(num_groups).scatter_reduce(0, group_index, values, reduce,
                                                       include_self=False)


def centred_rewards(rewards: Tensor, group_index: Tensor, num_groups: int) -> tuple[Tensor, Tensor]:
    """``R_i - mean(R_group)`` and the group's unbiased std, both per sample.

    Inputs: ``rewards`` [N] float64, ``group_index`` [N] int64 in ``0..num_groups-1`` (every
    group has >= 2 samples). Outputs: centred rewards [N], std [N] (Bessel-corrected, as
    ``torch.std`` in DeepSeekMath's GRPO). Groups whose rewards are all equal get exactly 0,
    not rounding noise, so "no signal" stays recognisable downstream.
    """
    count = torch.bincount(group_index, minlength=num_groups).to(rewards.dtype)  # [num_groups]
    mean = _group_reduce(rewards, group_index, num_groups, "sum") / count
    centred = rewards - mean[group_index]
    var = _group_reduce(centred ** 2, group_index, num_groups, "sum") / (count - 1)
    all_equal = (_group_reduce(rewards, group_index, num_groups, "amax")
                 == _group_reduce(rewards, group_index, num_groups, "amin"))
    centred = torch.where(all_equal[group_index], torch.zeros_like(centred), centred)
    return centred, torch.sqrt(var)[group_index]


def grpo_advantages(rewards: Tensor, group_index: Tensor, num_groups: int, eps: float) -> Tensor:
    """GRPO: ``A_i = (R_i - mean(R)) / (std(R) + eps)`` within the group."""
    centred, std = centred_rewards(rewards, group_index, num_groups)
    return centred / (std + eps)


def drgrpo_advantages(rewards: Tensor, group_index: Tensor, num_groups: int, eps: float) -> Tensor:
    """Dr.GRPO: ``A_i = R_i - mean(R)``; no std division, which biases towards easy/hard groups."""
    centred, _ = centred_rewards(rewards, group_index, num_groups)
    return centred


def _flatten_groups(rewards: Tensor, group_ids: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    """Flat rewards [N] and group ids [N] from either ``[num_groups, G]`` or flat + ids."""
    if group_ids is None:
        if rewards.dim() != 2:
            raise ValueError(f"rewards of shape {tuple(rewards.shape)}: pass [num_groups, G] "
                             "rewards, or flat rewards [N] together with group_ids [N]")
        num_groups, group_size = rewards.shape
        ids = torch.arange(num_groups, device=rewards.device).repeat_interleave(group_size)
        return rewards.reshape(-1), ids
    if rewards.dim() != 1 or group_ids.shape != rewards.shape:
        raise ValueError(f"flat rewards {tuple(rewards.shape)} and group_ids "
                         f"{tuple(group_ids.shape)} must both be [N]")
    return rewards, group_ids.to(torch.int64)


def compute_advantages(rewards: Tensor, group_ids: Optional[Tensor] = None, *,
                       estimator: str = "grpo", eps: float = 1e-6,
                       is_offpolicy: Optional[Tensor] = None) -> Tensor:
    """Per-response advantages from group rewards, by the registered ``estimator``.

    Inputs:
      rewards       ``[num_groups, G]``, or flat ``[N]`` together with ``group_ids`` ``[N]``
                    (any integers; groups may then differ in size).
      estimator     registered name (``grpo``, ``drgrpo``, ...).
      eps           added to the group std by ``grpo``.
      is_offpolicy  optional bool, shaped like ``rewards``: split normalisation (Replay-Enhanced
                    PO): on-policy and off-policy (replayed) samples of a group are normalised
                    separately, each against its own mean/std, so stale samples do not shift
                    the baseline of fresh ones.
    Output: advantages shaped and typed like ``rewards``, computed in float64.

    Raises ValueError naming the group when a group (or one part of a split group) has a
    single sample: its std is undefined and its advantage would carry no relative signal.
    """
    flat, ids = _flatten_groups(rewards, group_ids)
    if is_offpolicy is None:
        keys = ids[:, None]                                                   # [N, 1]
    else:
        keys = torch.stack([ids, is_offpolicy.reshape(-1).to(torch.int64)], dim=1)  # [N, 2]
    unique_keys, group_index = torch.unique(keys, dim=0, return_inverse=True)
    counts = torch.bincount(group_index, minlength=len(unique_keys))
    if bool((counts < 2).any()):
        key = unique_keys[int(torch.nonzero(counts < 2)[0])].tolist()
        part = "" if len(key) == 1 else (" (off-policy part)" if key[1] else " (on-policy part)")
        raise ValueError(f"group {key[0]}{part} has 1 sample: group-relative advantages "
                         "need at least 2 samples per group")
    fn = get_advantage_estimator(estimator)
    advantages = fn(flat.to(torch.float64), group_index, len(unique_keys), eps)
    return advantages.to(rewards.dtype).reshape(rewards.shape)
