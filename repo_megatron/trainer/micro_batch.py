"""The trainer's micro-batch: the one definition of what the loss consumes, and of what a
forward pass hands back (plain torch, no Megatron).

A :class:`MicroBatch` holds ``b`` sequences right-padded to ``s`` positions; position ``t``
scores ``tokens[:, t + 1]``, so a response token ``j`` of a prompt of length ``P`` is scored at
position ``P - 1 + j``. Every micro-batch has its own ``s`` (:attr:`MicroBatch.seq_length`):
the batch builder (:mod:`repo_megatron.run.batch`) trims each to its longest sequence and pads
it to the multiple that sequence parallelism and FP8 need; the forward passes and the loss read
the shape of each micro-batch, never a step-wide length.

Optional fields are None when absent, and what a micro-batch carries decides what the loss
computes (:func:`repo_megatron.algorithm.compute_policy_loss`): ``ref_logprobs`` adds the KL
term, ``is_offpolicy`` LUFFY's shaped term, ``is_replay`` (with ``behaviour_logprobs``) the
replay term, ``provenance`` the per-provenance metrics. Without ``old_logprobs`` the training
forward's own log-probs, detached, serve as the old ones (exact for the one optimizer step of a
batch) and come back in :class:`ForwardOutput`.

The micro-batches are built on the host; the forward step moves each to the rank's device
(:meth:`MicroBatch.to`) as it runs it. The schedules and the trainer ask a micro-batch for its
shape (:attr:`~MicroBatch.shape`, :attr:`~MicroBatch.forward_shape`,
:attr:`~MicroBatch.num_sequences`) and the builder for its real ``lengths``, never a step-wide
layout. A *packed* micro-batch (``pack_length`` set) keeps this layout for everything the loss
reads, one sequence per row, and runs its sequences through the model as one row of
``pack_length`` positions (:mod:`.packing`: boundaries, positions restarting at each
sequence); the log-probs come back unpacked, in this layout.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, Optional, Union

import torch
from torch import Tensor


@dataclass
class MicroBatch:
    """``b`` sequences of ``s`` positions: the loss's inputs, and the rows the run side uses to
    compare the trainer with the rollout engine (shapes in the comments)."""
    tokens: Tensor                                 # [b, s] long: prompt + response + padding
    loss_mask: Optional[Tensor] = None             # [b, s] float: 1 where tokens[:, t+1] is a
    #                                                trained response token (the loss needs it;
    #                                                a forward-only pass scores every position
    #                                                without it)
    advantages: Optional[Tensor] = None            # [b] per sequence or [b, s] per token (loss)
    old_logprobs: Optional[Tensor] = None          # [b, s] log pi_old; None: this forward's own
    ref_logprobs: Optional[Tensor] = None          # [b, s] log pi_ref: the KL term
    is_offpolicy: Optional[Tensor] = None          # [b] or [b, s] bool: LUFFY expert tokens
    is_replay: Optional[Tensor] = None             # [b] or [b, s] bool: replayed tokens
    behaviour_logprobs: Optional[Tensor] = None    # [b, s] log pi_behaviour of the policy that
    #                                                sampled the tokens, where one did (0 else)
    provenance: Optional[Tensor] = None            # [b] long: index in PROVENANCES
    position_ids: Optional[Tensor] = None          # [b, s] long; None: 0..s-1 in every row
    lengths: Optional[Tensor] = None               # [b] long: real tokens per sequence (0 on
    #                                                padding rows)
    sampled_onpolicy: Optional[Tensor] = None      # [b] bool: sampled from pi(. | q) with the
    #                                                engine's log-probs in behaviour_logprobs
    #                                                (the rows train/rollout mismatch and TIS
    #                                                compare)
    staleness: Optional[Tensor] = None             # [b] long: weight versions between the
    #                                                policy that sampled the row and the one
    #                                                trained (0 without a version)
    pack_length: Optional[int] = None              # packed: the model sees one row of this
    #                                                many positions (needs lengths); None: the
    #                                                b rows of s

    @property
    def shape(self) -> torch.Size:
        """``[b, s]``: the shape of every per-token tensor (log-probs included)."""
        return self.tokens.shape

    @property
    def forward_shape(self) -> torch.Size:
        """``[rows, positions]`` the model runs: ``[1, pack_length]`` packed, else
        :attr:`shape`."""
        return self.shape if self.pack_length is None else torch.Size([1, self.pack_length])

    @property
    def num_sequences(self) -> int:
        return self.tokens.shape[0]

    @property
    def seq_length(self) -> int:
        return self.tokens.shape[1]

    def _map(self, fn: Callable[[Tensor], Tensor]) -> "MicroBatch":
        """A copy with ``fn`` applied to every tensor it carries."""
        return dataclasses.replace(self, **{
            f.name: fn(value) for f in dataclasses.fields(self)
            if isinstance(value := getattr(self, f.name), Tensor)})

    def to(self, device: torch.device) -> "MicroBatch":
        """Every tensor moved to ``device``."""
        return self._map(lambda v: v.to(device))

    def select(self, index: Union[Tensor, slice]) -> "MicroBatch":
        """Rows ``index`` of every tensor."""
        return self._map(lambda v: v[index])

    def pad_rows(self, rows: int) -> "MicroBatch":
        """``rows`` all-zero rows appended: no tokens, ``loss_mask`` 0, so they count nowhere
        in the loss."""
        if rows <= 0:
            return self
        return self._map(lambda v: torch.cat([v, v.new_zeros((rows, *v.shape[1:]))]))

    def fit_length(self, length: int) -> "MicroBatch":
        """Every per-token tensor cut, or right-padded with zeros, to ``length`` positions. The
        padding is token 0 with ``loss_mask`` 0: it counts nowhere in the loss, and causal
        attention leaves the real positions unchanged."""
        return self._map(lambda v: _fit_length(v, length) if v.dim() == 2 else v)

    def fit_forward_shape(self, rows: int, length: int) -> "MicroBatch":
        """This micro-batch run as ``[rows, length]``: padding rows and positions added
        (unpacked), or a longer packed row (``rows`` is then 1)."""
        if self.pack_length is not None:
            return dataclasses.replace(self, pack_length=length)
        return self.pad_rows(rows - self.num_sequences).fit_length(length)


def _fit_length(values: Tensor, length: int) -> Tensor:
    """``values`` [b, s] cut or right-padded with zeros to [b, length]."""
    if values.shape[1] >= length:
        return values[:, :length]
    return torch.cat([values, values.new_zeros(values.shape[0], length - values.shape[1])], 1)


@dataclass
class ForwardOutput:
    """What a forward pass of one micro-batch hands back from the last pipeline stage
    (detached): the loss's additive metrics (its unscaled ``loss`` among them; empty for a
    forward-only pass) and the log-probs ``[b, s]`` when the pass computes them as old (or
    reference) log-probs."""
    metrics: dict[str, Tensor] = dataclasses.field(default_factory=dict)
    logprobs: Optional[Tensor] = None
