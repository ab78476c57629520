"""``/generate`` bodies for the serve tests: the client mistakes of issue 13 (each must be a
400), bodies that must be served, a seeded generator of random bodies for the fuzz campaign,
and SGLang's own verdict on a body (its JSON contract and ``SamplingParams``), the oracle."""

from __future__ import annotations

import math
import random
import types
from typing import Any, Optional

VOCAB, CONTEXT = 49152, 512     # the tiny test model (SmolLM2's vocabulary, context 512)
SERVER_MAX_NEW_TOKENS = 16      # the test servers' --max-new-tokens

def nested(depth: int) -> list:
    """``[[[...[1]...]]]``, ``depth`` lists deep (valid JSON that breaks naive reprs)."""
    value: Any = [1]
    for _ in range(depth - 1):
        value = [value]
    return value


# (case, body): every one is a client mistake that a server must answer 400
MISTAKES: list[tuple[str, Any]] = [
    ("body is a list", [{"input_ids": [1, 2]}]),
    ("body is a string", "generate please"),
    ("no prompt", {"sampling_params": {"max_new_tokens": 1}}),
    ("empty input_ids", {"input_ids": []}),
    ("empty row in a batch", {"input_ids": [[1, 2], []]}),
    ("token id is a string", {"input_ids": [1, "2"]}),
    ("token id is a float", {"input_ids": [1, 2.5]}),
    ("token id is a bool", {"input_ids": [True, 2]}),
    ("negative token id", {"input_ids": [1, -5]}),
    ("token id past the vocabulary", {"input_ids": [1, VOCAB]}),
    ("token id overflows int64", {"input_ids": [1, 2 ** 70]}),
    ("ragged batch", {"input_ids": [[1, 2], 3]}),
    ("token ids nested 500 deep", {"input_ids": nested(500)}),
    ("stop nested 500 deep", {"input_ids": [1], "sampling_params": {"stop": nested(500)}}),
    ("text is a number", {"text": 5}),
    ("both text and input_ids", {"text": "hi", "input_ids": [1]}),
    ("sampling_params is a string", {"input_ids": [1], "sampling_params": "greedy"}),
    ("unknown sampling key", {"input_ids": [1], "sampling_params": {"temprature": 0.5}}),
    ("temperature NaN", {"input_ids": [1], "sampling_params": {"temperature": math.nan}}),
    ("temperature inf", {"input_ids": [1], "sampling_params": {"temperature": math.inf}}),
    ("temperature negative", {"input_ids": [1], "sampling_params": {"temperature": -1}}),
    ("temperature is a string", {"input_ids": [1], "sampling_params": {"temperature": "0.7"}}),
    ("top_p 0", {"input_ids": [1], "sampling_params": {"top_p": 0}}),
    ("top_p NaN", {"input_ids": [1], "sampling_params": {"top_p": math.nan}}),
    ("top_p above 1", {"input_ids": [1], "sampling_params": {"top_p": 1.5}}),
    ("top_k 0", {"input_ids": [1], "sampling_params": {"top_k": 0}}),
    ("top_k -2", {"input_ids": [1], "sampling_params": {"top_k": -2}}),
    ("top_k is a float", {"input_ids": [1], "sampling_params": {"top_k": 5.0}}),
    ("max_new_tokens negative", {"input_ids": [1], "sampling_params": {"max_new_tokens": -1}}),
    ("max_new_tokens 1e9", {"input_ids": [1], "sampling_params": {"max_new_tokens": 10 ** 9}}),
    ("max_new_tokens is a float", {"input_ids": [1],
                                   "sampling_params": {"max_new_tokens": 1e9}}),
    ("max_new_tokens past the context", {"input_ids": [1] * 500,
                                         "sampling_params": {"max_new_tokens": 20}}),
    ("prompt as long as the context", {"input_ids": [1] * CONTEXT}),
    ("seed past int64", {"input_ids": [1], "sampling_params": {"sampling_seed": 2 ** 63}}),
    ("33 stop strings", {"input_ids": [1], "sampling_params": {"stop": ["x"] * 33}}),
    ("stop is a number", {"input_ids": [1], "sampling_params": {"stop": 3}}),
    ("rid list for one prompt", {"input_ids": [1], "rid": ["a"]}),
    ("rid list of the wrong length", {"input_ids": [[1], [2]], "rid": ["a"]}),
    ("duplicate rids", {"input_ids": [[1], [2]], "rid": ["a", "a"]}),
    ("sampling_params list of the wrong length", {"input_ids": [[1], [2]],
                                                   "sampling_params": [{}]}),
    ("stream", {"input_ids": [1], "stream": True}),
    ("stream is a string", {"input_ids": [1], "stream": "yes"}),
    ("n > 1 (unsupported)", {"input_ids": [1], "sampling_params": {"n": 2}}),
    ("regex (unsupported)", {"input_ids": [1], "sampling_params": {"regex": "a+"}}),
    ("image_data (unsupported)", {"input_ids": [1], "image_data": "http://x/y.png"}),
    ("logprob_start_len 0 (unsupported)", {"input_ids": [1, 2], "logprob_start_len": 0}),
]

# (case, body, what the answer must show): bodies a server must serve
SERVED: list[tuple[str, dict, dict]] = [
    ("temperature 1e-45 is greedy", {"input_ids": [1, 2], "sampling_params": {
        "temperature": 1e-45, "max_new_tokens": 3}}, {"completion_tokens": 3}),
    ("top_k 0 with temperature 0 is greedy", {"input_ids": [1, 2], "sampling_params": {
        "temperature": 0, "top_k": 0, "max_new_tokens": 2}}, {"completion_tokens": 2}),
    ("max_new_tokens 0 is prefill only", {"input_ids": [1, 2], "sampling_params": {
        "max_new_tokens": 0}}, {"completion_tokens": 0}),
    ("max_new_tokens null runs to the server's cap", {
        "input_ids": [1], "sampling_params": {"max_new_tokens": None, "temperature": 0}},
     {"completion_tokens": SERVER_MAX_NEW_TOKENS}),
    ("huge top_k means the whole vocabulary", {"input_ids": [1], "sampling_params": {
        "top_k": 2 ** 62, "max_new_tokens": 2, "sampling_seed": -(2 ** 63)}},
     {"completion_tokens": 2}),
    ("what sglang-router forwards", {
        "model": None, "input_ids": [1, 2], "sampling_params": {"max_new_tokens": 1},
        "return_text_in_logprobs": False, "stream": False, "log_metrics": True,
        "return_hidden_states": False, "background": False, "no_logs": False,
        "return_bytes": False, "return_entropy": False}, {"completion_tokens": 1}),
]


def random_body(rng: random.Random) -> Any:
    """One seeded random ``/generate`` body: mostly plausible, with one or two fields bent
    (wrong type, out of range, huge, NaN, unknown, missing)."""
    odd_values = [None, True, -1, 0, 1, 2 ** 31, 2 ** 63, 2 ** 70, -(2 ** 70), 1.5, -0.0,
                  1e-45, 1e308, math.nan, math.inf, -math.inf, "", "x" * 50, [], {}, [1],
                  {"a": 1}, nested(400)]
    body: dict[str, Any] = {}
    batch = rng.random() < 0.3
    n = rng.randint(1, 3) if batch else 1
    rows = [[rng.randrange(VOCAB) for _ in range(rng.randint(1, 12))] for _ in range(n)]
    if rng.random() < 0.15:
        body["text"] = ["hello"] * n if batch else "hello world"
    else:
        body["input_ids"] = rows if batch else rows[0]
    params = {"max_new_tokens": rng.randint(0, 4)}
    for key in rng.sample(["temperature", "top_p", "top_k", "sampling_seed", "stop",
                           "stop_token_ids", "skip_special_tokens", "no_stop_trim"],
                          rng.randint(0, 3)):
        params[key] = {"temperature": rng.choice([0, 0.5, 1.0, 2.0]),
                       "top_p": rng.choice([0.5, 0.9, 1.0]),
                       "top_k": rng.choice([-1, 1, 5, 100]),
                       "sampling_seed": rng.randint(0, 2 ** 31),
                       "stop": rng.choice(["\n", ["a", "b"]]),
                       "stop_token_ids": [rng.randrange(VOCAB)],
                       "skip_special_tokens": True, "no_stop_trim": True}[key]
    body["sampling_params"] = [dict(params) for _ in range(n)] if batch and \
        rng.random() < 0.5 else params
    if rng.random() < 0.3:
        body["rid"] = [f"r{rng.randrange(10 ** 9)}-{i}" for i in range(n)] if batch \
            else f"r{rng.randrange(10 ** 9)}"
    for _ in range(rng.choice([0, 1, 1, 2])):       # bend one or two fields
        where = rng.random()
        if where < 0.5:
            key = rng.choice(["temperature", "top_p", "top_k", "max_new_tokens",
                              "sampling_seed", "stop", "stop_token_ids", "min_p", "n",
                              "frequency_penalty", "ignore_eos", "bogus_key"])
            target = body.get("sampling_params")
            target = target[0] if isinstance(target, list) and target else target
            if isinstance(target, dict):
                target[key] = rng.choice(odd_values)
        elif where < 0.8:
            key = rng.choice(["input_ids", "text", "rid", "stream", "return_logprob",
                              "logprob_start_len", "top_logprobs_num", "sampling_params",
                              "lora_path", "unknown_field"])
            body[key] = rng.choice(odd_values)
        elif where < 0.9 and body.get("input_ids") == (rows if batch else rows[0]):
            ids = rows[0]
            ids[rng.randrange(len(ids))] = rng.choice(odd_values)
        else:
            return rng.choice(odd_values + [[body], "null"])
    return body


def sglang_refusal(body: Any) -> Optional[str]:
    """What SGLang 0.5.23 refuses in ``body`` before running the model (None: accepted):
    its JSON contract, ``SamplingParams`` (``__post_init__``, ``normalize``, ``verify``) and
    the tokenizer manager's context-length checks. Needs the sglang wheel."""
    from sglang.srt.entrypoints.api_contract import generate_contract_error
    from sglang.srt.sampling.sampling_params import SamplingParams

    error = generate_contract_error(body)
    if error is not None:
        return error
    params = body.get("sampling_params") or {}
    tokenizer = types.SimpleNamespace(encode=lambda text, **_: list(text.encode()))
    rows = body.get("input_ids")
    rows = rows if rows and isinstance(rows[0], list) else [rows]
    for i, raw in enumerate(params if isinstance(params, list) else [params] * len(rows)):
        try:
            sampling = SamplingParams(**raw)
            sampling.normalize(tokenizer)
            sampling.verify(VOCAB)
        except (ValueError, TypeError) as e:
            return str(e)
        ids = rows[i] if i < len(rows) else None
        if ids is not None:
            if len(ids) >= CONTEXT:
                return "The input is longer than the model's context length"
            if sampling.max_new_tokens is not None and \
                    len(ids) + sampling.max_new_tokens > CONTEXT:
                return "Requested token count exceeds the model's maximum context length"
    return None
