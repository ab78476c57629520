"""The supervised warm-up of the testbed's tiny Llama (plain PyTorch on a transformers model).

:func:`build_tiny_llama` makes a random 4-layer Llama over the character tokenizer;
:func:`warm_up` trains it on a mixture of example kinds (:data:`EXAMPLE_KINDS`) with AdamW,
loss on the response tokens only; :func:`save_model_dir` writes a Hugging Face model directory
that ``model.hf_path`` can point at (the trainer converts it to Megatron on first use).

Example kinds (prompt -> response, both through the chat template like the trainer's):

- ``sum``: ``3+5`` -> ``8`` only ``correct_share`` of the time, ``80`` otherwise;
- ``easy_product``: ``a*b`` (one digit each) -> the policy's style, always right;
- ``rephrase``: RePO's rephrase prompt P(q, k) with the expert solution ``k`` of a product ->
  the policy's style with the answer of ``k``: following a reference, learned on easy and hard
  products that the RL and held-out sets do not contain. The hard products themselves are never
  answered without a reference.
"""

from __future__ import annotations

import json
import os
import random
import time
from dataclasses import asdict, dataclass, field
from statistics import fmean
from typing import Callable, Optional

from . import tasks

TINY_LLAMA = {"hidden_size": 128, "intermediate_size": 384, "num_hidden_layers": 4,
              "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32,
              "max_position_embeddings": 256, "tie_word_embeddings": True,
              "rms_norm_eps": 1e-5, "rope_theta": 10000.0}

EXAMPLE_KINDS = ("sum", "easy_product", "rephrase")


@dataclass
class WarmupRecipe:
    """What the warm-up trains on and for how long. ``mixture``: weight of each example kind;
    ``exclude``: questions never used (the RL and held-out sets)."""
    mixture: dict = field(default_factory=lambda: {"sum": 1.0})
    steps: int = 300
    batch_size: int = 32
    lr: float = 3e-3
    correct_share: float = 0.35
    rephrase_template: str = tasks.REPHRASE_TEMPLATE
    exclude: list = field(default_factory=list)
    seed: int = 0
    shape: dict = field(default_factory=dict)   # overrides of TINY_LLAMA (a larger testbed)


def build_tiny_llama(tokenizer, seed: int, shape: Optional[dict] = None):
    """A random :data:`TINY_LLAMA` (with ``shape``'s overrides) over ``tokenizer``'s
    vocabulary."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), bos_token_id=None,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         **{**TINY_LLAMA, **(shape or {})})
    return LlamaForCausalLM(config)


def example_sampler(recipe: WarmupRecipe, formatter) -> Callable[[random.Random], tuple]:
    """A function drawing one (prompt ids, response ids) example of the recipe's mixture."""
    from ..rollout.gate import rephrase_prompt

    excluded = set(recipe.exclude)
    sums = tasks.all_sums()
    easy = tasks.easy_products()
    references = [p for p in easy + tasks.hard_products() if p["question"] not in excluded]
    kinds = [k for k in EXAMPLE_KINDS if recipe.mixture.get(k, 0) > 0]
    weights = [recipe.mixture[k] for k in kinds]

    def draw(rng: random.Random) -> tuple[list[int], list[int]]:
        kind = rng.choices(kinds, weights)[0]
        if kind == "sum":
            p = rng.choice(sums)
            prompt, response = p["question"], tasks.slipped_sum(p, rng, recipe.correct_share)
        elif kind == "easy_product":
            p = rng.choice(easy)
            prompt, response = p["question"], tasks.own_style(p)
        else:
            p = rng.choice(references)
            prompt = rephrase_prompt(recipe.rephrase_template, p["question"], p["solution"])
            response = tasks.own_style(p)
        return formatter.prompt_ids(prompt), formatter.response_ids(response)
    return draw


def sft_loss(model, batch: list[tuple[list[int], list[int]]]):
    """Mean cross-entropy of the response tokens of ``batch`` (right-padded)."""
    import torch

    length = max(len(p) + len(r) for p, r in batch)
    ids = torch.zeros(len(batch), length, dtype=torch.long)
    mask = torch.zeros(len(batch), length, dtype=torch.long)
    target = torch.zeros(len(batch), length, dtype=torch.bool)  # positions predicting a response token
    for row, (p, r) in enumerate(batch):
        ids[row, :len(p) + len(r)] = torch.tensor(p + r)
        mask[row, :len(p) + len(r)] = 1
        target[row, len(p) - 1:len(p) + len(r) - 1] = True
    logits = model(input_ids=ids, attention_mask=mask).logits                   # [B, T, V]
    labels = ids[:, 1:][target[:, :-1]]
    return torch.nn.functional.cross_entropy(logits[target], labels)


def warm_up(model, tokenizer, recipe: WarmupRecipe,
            log: Optional[Callable[[str], None]] = None) -> dict:
    """Train ``model`` on ``recipe`` (AdamW, linear warm-up then linear decay to 10%, gradient
    clip 1); returns statistics (first/last losses, seconds)."""
    import torch

    from ..data import ChatFormatter

    draw = example_sampler(recipe, ChatFormatter(tokenizer))
    rng = random.Random(recipe.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=0.0)
    warm = max(1, recipe.steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warm) * max(0.1, 1 - s / recipe.steps))
    start, losses = time.perf_counter(), []
    model.train()
    for step in range(recipe.steps):
        loss = sft_loss(model, [draw(rng) for _ in range(recipe.batch_size)])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        losses.append(loss.item())
        if log is not None and (step % 100 == 0 or step == recipe.steps - 1):
            log(f"warm-up step {step + 1}/{recipe.steps}: loss {loss.item():.3f} "
                f"({time.perf_counter() - start:.0f} s)")
    model.eval()
    head = max(1, min(10, recipe.steps // 10))
    return {"loss_first": fmean(losses[:head]), "loss_last": fmean(losses[-head:]),
            "seconds": time.perf_counter() - start}


def save_model_dir(model, tokenizer, directory: str, stats: Optional[dict] = None) -> str:
    """``directory`` as a Hugging Face model directory (written aside, renamed into place)."""
    import shutil

    tmp = directory + f".tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if stats is not None:
        with open(os.path.join(tmp, "warm_up.json"), "w") as f:
            json.dump(stats, f, indent=1)
    shutil.rmtree(directory, ignore_errors=True)
    os.rename(tmp, directory)
    return directory


def warm_policy(directory: str, recipe: WarmupRecipe,
                log: Optional[Callable[[str], None]] = None) -> str:
    """The character tokenizer, a :func:`build_tiny_llama` warmed up on ``recipe``, saved as a
    Hugging Face model directory (``warm_up.json`` holds the recipe and the statistics)."""
    import torch

    from .chars import build_char_tokenizer

    tokenizer = build_char_tokenizer()
    model = build_tiny_llama(tokenizer, recipe.seed, recipe.shape)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # matrices this small: a second thread costs more than it brings
    try:
        stats = warm_up(model, tokenizer, recipe, log)
    finally:
        torch.set_num_threads(threads)
    return save_model_dir(model, tokenizer, directory, {"recipe": asdict(recipe), **stats})
