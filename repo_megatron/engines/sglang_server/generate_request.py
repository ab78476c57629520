"""A ``/generate`` body (SGLang's ``GenerateReqInput``) checked field by field, as pure functions.

The rules are SGLang 0.5.23's, so a body means here what it means to a real server:
the JSON types of ``sglang/api/v1/api_types.py`` (``GenerateRequest``, ``SamplingParams``:
unknown sampling keys refused), ``GenerateReqInput.normalize_batch_and_arguments`` (batch
shape, rid list, duplicate rids), ``SamplingParams.__post_init__`` / ``verify`` /
``normalize`` (temperature below 1e-6 means greedy; finite non-negative temperature, top_p in
(0, 1], top_k -1 or >= 1, penalties' ranges, seed in int64, at most 32 stop strings) and the
tokenizer manager's length checks against the context length. Stricter than SGLang, because a
CPU engine must not crash or answer wrongly: token ids outside the vocabulary, empty prompts,
the server's limits, and features this engine does not implement (each named in the error)
are refused too. Every refusal is a :class:`~.gate.BadRequest` (400).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Callable, Optional

from ..base import SamplingParams
from .gate import BadRequest, brief

SGLANG_DEFAULT_MAX_NEW_TOKENS = 128
GREEDY_BELOW = 1e-6          # SGLang's _SAMPLING_EPS
MAX_STOP_COUNT = 32
INT64 = (-(2 ** 63), 2 ** 63 - 1)

# SGLang's sampling_params keys (the JSON contract refuses any other); the values this engine
# cannot honour are refused unless they are the defaults listed here.
SAMPLING_KEYS = (
    "max_new_tokens", "stop", "stop_token_ids", "stop_regex", "temperature", "top_p", "top_k",
    "min_p", "frequency_penalty", "presence_penalty", "repetition_penalty", "min_new_tokens",
    "n", "json_schema", "regex", "ebnf", "structural_tag", "ignore_eos", "skip_special_tokens",
    "spaces_between_special_tokens", "no_stop_trim", "stream_interval", "logit_bias",
    "sampling_seed", "custom_params", "beam_width", "watermark", "choice")
UNSUPPORTED_SAMPLING = {"min_p": 0.0, "frequency_penalty": 0.0, "presence_penalty": 0.0,
                        "repetition_penalty": 1.0, "min_new_tokens": 0, "n": 1,
                        "ignore_eos": False, "beam_width": 1}
UNSUPPORTED_SAMPLING_WHEN_SET = ("stop_regex", "json_schema", "regex", "ebnf",
                                 "structural_tag", "logit_bias", "watermark", "choice")
# Top-level GenerateReqInput fields that change what a server computes; anything else that is
# not read below is metadata (routing, priority, labels) or unknown, and ignored as by SGLang.
UNSUPPORTED_FIELDS = ("input_embeds", "image_data", "video_data", "audio_data", "lora_path",
                      "lora_id", "session_params", "session_id", "custom_logit_processor",
                      "return_hidden_states", "token_ids_logprob", "bootstrap_host",
                      "bootstrap_port", "bootstrap_room", "bootstrap_pair_key", "kv_hints",
                      "max_thinking_tokens", "require_reasoning")
UNSUPPORTED_FLAGS = ("return_hidden_states", "require_reasoning")   # sglang-router sends false


@dataclass(frozen=True)
class GenerateLimits:
    """What one server accepts: its model's vocabulary and context, and the configured caps
    (``--max-prompt-tokens``, ``--max-new-tokens``)."""
    vocab_size: int
    context_length: int
    max_prompt_tokens: int
    max_new_tokens: int


@dataclass(frozen=True)
class GenerateItem:
    """One request of a ``/generate`` body, ready for the engine."""
    rid: str
    input_ids: list[int]
    params: SamplingParams


# -- JSON types (the contract's texts) ---------------------------------------------------------
def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def expect(ok: bool, where: str, value: Any, expected: str) -> None:
    if not ok:
        raise BadRequest(f"{where}: invalid type: {type(value).__name__} {brief(value)}, "
                         f"expected {expected}")


def string_or_list(value: Any, where: str) -> list[str]:
    """A string or a list of strings, as a list."""
    if isinstance(value, str):
        return [value]
    expect(isinstance(value, list) and all(isinstance(v, str) for v in value), where, value,
           "a string or a list of strings")
    return value


def token_ids(value: Any, where: str) -> list[int]:
    expect(isinstance(value, list) and all(is_int(v) for v in value), where, value,
           "a list of integer token ids")
    return value


# -- sampling_params ---------------------------------------------------------------------------
def sampling_params(raw: Any, where: str,
                    vocab_size: int) -> tuple[SamplingParams, Optional[int]]:
    """(engine sampling parameters, ``max_new_tokens``: None = up to the context) of one
    ``sampling_params`` object; the first's own ``max_new_tokens`` is set by :func:`bounded`."""
    if raw is None:
        raw = {}
    expect(isinstance(raw, dict), where, raw, "an object")
    for key in raw:
        if key not in SAMPLING_KEYS:
            raise BadRequest(f"{where}: unknown field `{key}`")
    get = lambda key, default: default if raw.get(key) is None else raw[key]  # noqa: E731
    numbers = {key: get(key, default) for key, default in (
        ("temperature", 1.0), ("top_p", 1.0), ("min_p", 0.0), ("frequency_penalty", 0.0),
        ("presence_penalty", 0.0), ("repetition_penalty", 1.0))}
    for key, value in numbers.items():
        expect(is_number(value), f"{where}.{key}", value, "a number")
    integers = {key: get(key, default) for key, default in (
        ("top_k", -1), ("min_new_tokens", 0), ("n", 1), ("stream_interval", 1),
        ("beam_width", 1))}
    integers["max_new_tokens"] = raw.get("max_new_tokens", SGLANG_DEFAULT_MAX_NEW_TOKENS)
    integers["sampling_seed"] = raw.get("sampling_seed")
    for key, value in integers.items():
        if value is not None:
            expect(is_int(value), f"{where}.{key}", value, "an integer")
    for key in ("ignore_eos", "skip_special_tokens", "spaces_between_special_tokens",
                "no_stop_trim"):
        if raw.get(key) is not None:
            expect(isinstance(raw[key], bool), f"{where}.{key}", raw[key], "a boolean")
    stop = string_or_list(raw["stop"], f"{where}.stop") if raw.get("stop") is not None else []
    stop_ids = token_ids(get("stop_token_ids", []), f"{where}.stop_token_ids")

    temperature, top_k = float(numbers["temperature"]), integers["top_k"]
    if 0 <= temperature < GREEDY_BELOW:           # SGLang: greedy (top_k=1), whatever top_k was
        temperature, top_k = 0.0, 1
    check_ranges(where, temperature, top_k, numbers, integers, len(stop))
    for key, default in UNSUPPORTED_SAMPLING.items():
        if get(key, default) != default:
            raise BadRequest(f"{where}.{key}={brief(raw[key])} is not supported by "
                             f"repo-megatron serve (only {default!r})")
    for key in UNSUPPORTED_SAMPLING_WHEN_SET:
        if raw.get(key):
            raise BadRequest(f"{where}.{key} is not supported by repo-megatron serve")
    params = SamplingParams(temperature=temperature, top_p=float(numbers["top_p"]),
                            top_k=-1 if top_k >= vocab_size else top_k, stop=tuple(stop),
                            stop_token_ids=tuple(stop_ids), seed=integers["sampling_seed"])
    return params, integers["max_new_tokens"]


def check_ranges(where: str, temperature: float, top_k: int, numbers: dict, integers: dict,
                 stop_count: int) -> None:
    """SGLang's ``SamplingParams.verify`` (after its greedy rewrite) and its stop count."""
    checks = [
        (integers["beam_width"] >= 1, "beam_width must be at least 1"),
        (math.isfinite(temperature) and temperature >= 0,
         "temperature must be a non-negative finite number"),
        (0 < numbers["top_p"] <= 1, "top_p must be in (0, 1]"),
        (0 <= numbers["min_p"] <= 1, "min_p must be in [0, 1]"),
        (top_k == -1 or top_k >= 1, "top_k must be -1 (disable) or at least 1"),
        (-2 <= numbers["frequency_penalty"] <= 2, "frequency_penalty must be in [-2, 2]"),
        (-2 <= numbers["presence_penalty"] <= 2, "presence_penalty must be in [-2, 2]"),
        (0 < numbers["repetition_penalty"] <= 2, "repetition_penalty must be in (0, 2]"),
        (integers["min_new_tokens"] >= 0, "min_new_tokens must be in [0, max_new_tokens]"),
        (integers["max_new_tokens"] is None or integers["max_new_tokens"] >= 0,
         "max_new_tokens must be at least 0"),
        (integers["max_new_tokens"] is None
         or integers["min_new_tokens"] <= integers["max_new_tokens"],
         "min_new_tokens must be in [0, max_new_tokens]"),
        (integers["sampling_seed"] is None
         or INT64[0] <= integers["sampling_seed"] <= INT64[1],
         "sampling_seed must be in [-2**63, 2**63 - 1]"),
        (stop_count <= MAX_STOP_COUNT, f"at most {MAX_STOP_COUNT} stop strings are allowed"),
    ]
    for ok, message in checks:
        if not ok:
            raise BadRequest(f"{where}: {message}")


# -- the body ----------------------------------------------------------------------------------
def parse_generate(body: dict, limits: GenerateLimits, encode: Callable[[str], list[int]],
                   new_rid: Callable[[], str]) -> tuple[bool, list[GenerateItem]]:
    """(is a batch, its requests) of a ``GenerateReqInput`` body. ``encode`` tokenises
    ``text``; ``new_rid`` names requests without a ``rid``."""
    for key in UNSUPPORTED_FIELDS:        # null (or false for the flags) asks for nothing
        if body.get(key) is not None and not (key in UNSUPPORTED_FLAGS and body[key] is False):
            raise BadRequest(f"{key} is not supported by repo-megatron serve")
    if body.get("stream") is not None:
        expect(isinstance(body["stream"], bool), "stream", body["stream"], "a boolean")
        if body["stream"]:
            raise BadRequest("stream=true is not supported by repo-megatron serve")
    check_logprob_options(body)
    batch, prompts = prompt_ids(body, encode)
    check_vocabulary(prompts, limits.vocab_size)
    raw_params = body.get("sampling_params")
    if isinstance(raw_params, list):
        if not batch or len(raw_params) != len(prompts):
            raise BadRequest(f"sampling_params is a list of {len(raw_params)} but there "
                             f"{'are' if batch else 'is'} {len(prompts)} prompt(s)")
    else:
        raw_params = [raw_params] * len(prompts)
    rids = request_ids(body.get("rid"), batch, len(prompts), new_rid)
    items = []
    for i, (ids, raw, rid) in enumerate(zip(prompts, raw_params, rids)):
        where = f"sampling_params[{i}]" if batch else "sampling_params"
        params, max_new = sampling_params(raw, where, limits.vocab_size)
        items.append(GenerateItem(rid, ids, bounded(params, max_new, len(ids), limits)))
    return batch, items


def check_logprob_options(body: dict) -> None:
    """``return_logprob`` (log-probs are always answered), ``logprob_start_len`` (only -1,
    SGLang's default: no prompt log-probs) and ``top_logprobs_num`` (only 0) are served."""
    if body.get("return_text_in_logprobs") is not None:
        expect(isinstance(body["return_text_in_logprobs"], bool), "return_text_in_logprobs",
               body["return_text_in_logprobs"], "a boolean")
    for key, ok, expected, served in (
            ("return_logprob", lambda v: isinstance(v, bool), "a boolean", None),
            ("logprob_start_len", is_int, "an integer", -1),
            ("top_logprobs_num", is_int, "an integer", 0)):
        value = body.get(key)
        for v in value if isinstance(value, list) else [value]:
            if v is not None:
                expect(ok(v), key, v, f"{expected} or a list of them")
                if served is not None and v != served:
                    raise BadRequest(f"{key}={brief(v)} is not supported by repo-megatron "
                                     f"serve (only {served})")


def prompt_ids(body: dict, encode: Callable[[str], list[int]]) -> tuple[bool, list[list[int]]]:
    """(is a batch, token ids per prompt) from ``input_ids`` or ``text`` (exactly one)."""
    ids, text = body.get("input_ids"), body.get("text")
    if (ids is None) == (text is None):
        raise BadRequest("either text or input_ids should be provided, not both"
                         if ids is not None else
                         "Either text, input_ids or input_embeds should be provided.")
    if text is not None:
        batch = isinstance(text, list)
        prompts = [encode(t) for t in string_or_list(text, "text")]
    else:
        expect(isinstance(ids, list), "input_ids", ids, "a list of token ids or a list of "
                                                          "such lists")
        batch = bool(ids) and isinstance(ids[0], list)
        prompts = [token_ids(row, f"input_ids[{i}]") for i, row in enumerate(ids)] if batch \
            else [token_ids(ids, "input_ids")]
    if not prompts:
        raise BadRequest("the batch is empty")
    if any(not p for p in prompts):
        raise BadRequest("input_ids cannot be empty.")
    return batch, prompts


def check_vocabulary(prompts: list[list[int]], vocab_size: int) -> None:
    """Every token id is a row of the embedding table."""
    for i, ids in enumerate(prompts):
        bad = next((t for t in ids if not 0 <= t < vocab_size), None)
        if bad is not None:
            raise BadRequest(f"prompt {i} has token id {brief(bad)}, outside the vocabulary "
                             f"[0, {vocab_size})")


def request_ids(rid: Any, batch: bool, n: int, new_rid: Callable[[], str]) -> list[str]:
    """One rid per request: given (a string, or a list for a batch), or new ones."""
    if rid is None:
        return [new_rid() for _ in range(n)]
    if not batch:
        expect(isinstance(rid, str), "rid", rid, "a string")
        return [rid]
    rids = string_or_list(rid, "rid")
    if len(rids) != n:
        raise BadRequest(f"rid is a list of {len(rids)} but the batch has {n} requests")
    if len(set(rids)) != n:
        raise BadRequest(f"Duplicate request IDs detected within the request: "
                         f"{sorted({r for r in rids if rids.count(r) > 1})}")
    return rids


def bounded(params: SamplingParams, max_new_tokens: Optional[int], prompt_len: int,
            limits: GenerateLimits) -> SamplingParams:
    """``params`` with ``max_new_tokens`` checked against the vocabulary, the context and the
    server's caps (None = up to the context or the cap, as SGLang)."""
    if prompt_len >= limits.context_length:
        raise BadRequest(f"The input ({prompt_len} tokens) is longer than the model's context "
                         f"length ({limits.context_length} tokens).")
    if prompt_len > limits.max_prompt_tokens:
        raise BadRequest(f"The input ({prompt_len} tokens) is longer than this server's "
                         f"--max-prompt-tokens ({limits.max_prompt_tokens}).")
    if max_new_tokens is None:
        max_new_tokens = min(limits.context_length - prompt_len, limits.max_new_tokens)
    if max_new_tokens > limits.max_new_tokens:
        raise BadRequest(f"max_new_tokens={max_new_tokens} is more than this server's "
                         f"--max-new-tokens ({limits.max_new_tokens}).")
    if prompt_len + max_new_tokens > limits.context_length:
        raise BadRequest(
            f"Requested token count exceeds the model's maximum context length of "
            f"{limits.context_length} tokens. You requested a total of "
            f"{prompt_len + max_new_tokens} tokens: {prompt_len} tokens from the input "
            f"messages and {max_new_tokens} tokens for the completion.")
    return replace(params, max_new_tokens=max_new_tokens)
