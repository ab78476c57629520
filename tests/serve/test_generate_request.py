"""``/generate`` bodies are checked field by field with SGLang's semantics: every client mistake
of issue 13 is a BadRequest, SGLang's own rewrites hold (temperature below 1e-6 is greedy,
top_k -1 or past the vocabulary is off, null max_new_tokens runs to the context), and
whatever SGLang's own code refuses, we refuse too."""

import random
import uuid

import pytest

from repo_megatron.engines.sglang_server.gate import BadRequest
from repo_megatron.engines.sglang_server.generate_request import GenerateLimits, parse_generate

from .bodies import (CONTEXT, MISTAKES, SERVED, SERVER_MAX_NEW_TOKENS, VOCAB, random_body,
                     sglang_refusal)
from .conftest import needs_sglang_wheel

LIMITS = GenerateLimits(vocab_size=VOCAB, context_length=CONTEXT, max_prompt_tokens=CONTEXT,
                        max_new_tokens=CONTEXT)
SERVING_LIMITS = GenerateLimits(VOCAB, CONTEXT, CONTEXT, SERVER_MAX_NEW_TOKENS)
# where we are stricter than SGLang, on purpose (each is named in the error); and SGLang's
# own GenerateReqInput.normalize_batch_and_arguments rules, which the oracle cannot run here
# (sglang.srt.managers.io_struct imports torchvision, whose PyPI build needs CUDA)
STRICTER = ("not supported by repo-megatron serve", "outside the vocabulary",
            "input_ids cannot be empty", "not both", "the batch is empty",
            "sampling_params is a list", "rid is a list", "rid: invalid type",
            "this server's --max")
IO_STRUCT_RULES = ("Either text, input_ids or input_embeds should be provided.",
                   "Duplicate request IDs detected within the request")


def parse(body, limits=LIMITS):
    return parse_generate(body, limits, lambda text: list(text.encode()),
                          lambda: uuid.uuid4().hex)


def refusal(body, limits=LIMITS):
    try:
        parse(body, limits)
    except BadRequest as e:
        return str(e)
    return None


# (bodies that are not a JSON object are json_object's: tests/serve/test_gate.py)
OBJECT_MISTAKES = [(case, body) for case, body in MISTAKES if isinstance(body, dict)]


@pytest.mark.parametrize("case,body", OBJECT_MISTAKES, ids=[c for c, _ in OBJECT_MISTAKES])
def test_every_client_mistake_is_a_bad_request(case, body):
    assert refusal(body) is not None, case


def test_temperature_below_1e_6_is_greedy_as_in_sglang():
    _, [item] = parse({"input_ids": [1], "sampling_params": {"temperature": 1e-45,
                                                              "top_k": 0}})
    assert item.params.temperature == 0.0
    _, [item] = parse({"input_ids": [1], "sampling_params": {"temperature": 1e-6}})
    assert item.params.temperature == 1e-6


def test_top_k_minus_one_null_or_past_the_vocabulary_filters_nothing():
    for top_k in (-1, None, VOCAB, 2 ** 62):
        _, [item] = parse({"input_ids": [1], "sampling_params": {"top_k": top_k}})
        assert item.params.top_k == -1
    _, [item] = parse({"input_ids": [1], "sampling_params": {"top_k": 40}})
    assert item.params.top_k == 40


def test_max_new_tokens_defaults_to_sglangs_128_and_null_runs_to_the_context_or_cap():
    _, [item] = parse({"input_ids": [1, 2]})
    assert item.params.max_new_tokens == 128
    _, [item] = parse({"input_ids": [1, 2], "sampling_params": {"max_new_tokens": None}})
    assert item.params.max_new_tokens == CONTEXT - 2
    capped = GenerateLimits(VOCAB, CONTEXT, max_prompt_tokens=8, max_new_tokens=16)
    _, [item] = parse({"input_ids": [1, 2], "sampling_params": {"max_new_tokens": None}},
                      capped)
    assert item.params.max_new_tokens == 16


def test_the_servers_limits_are_named_in_the_error():
    capped = GenerateLimits(VOCAB, CONTEXT, max_prompt_tokens=8, max_new_tokens=16)
    assert "--max-prompt-tokens (8)" in refusal({"input_ids": [1] * 9}, capped)
    assert "--max-new-tokens (16)" in refusal(
        {"input_ids": [1], "sampling_params": {"max_new_tokens": 17}}, capped)


def test_a_batch_gets_one_rid_and_one_parameter_set_per_prompt():
    batch, items = parse({"input_ids": [[1], [2, 3]], "rid": ["a", "b"],
                          "sampling_params": [{"temperature": 0}, {"top_p": 0.5}]})
    assert batch and [i.rid for i in items] == ["a", "b"]
    assert [i.input_ids for i in items] == [[1], [2, 3]]
    assert items[0].params.temperature == 0 and items[1].params.top_p == 0.5
    batch, items = parse({"text": ["ab", "c"], "sampling_params": {"stop": "x"}})
    assert batch and [i.input_ids for i in items] == [[97, 98], [99]]
    assert all(i.params.stop == ("x",) for i in items)


@pytest.mark.parametrize("case,body,_", SERVED, ids=[c for c, _, _ in SERVED])
def test_bodies_sglang_serves_are_served(case, body, _):
    assert refusal(body, SERVING_LIMITS) is None, case


def test_whatever_sglang_refuses_we_refuse_and_we_are_stricter_only_on_purpose():
    needs_sglang_wheel()
    rng = random.Random(1313)
    bodies = [b for _, b in OBJECT_MISTAKES] + \
        [b for _, b, _ in SERVED] + [random_body(rng) for _ in range(600)]
    counts = {"both refuse": 0, "both accept": 0, "only we refuse": 0}
    for body in bodies:
        if not isinstance(body, dict):
            continue
        theirs, ours = sglang_refusal(body), refusal(body)
        if theirs is not None:
            assert ours is not None, (body, theirs)
            counts["both refuse"] += 1
        elif ours is not None:
            assert any(reason in ours for reason in STRICTER + IO_STRUCT_RULES), (body, ours)
            counts["only we refuse"] += 1
        else:
            counts["both accept"] += 1
    print("generate bodies vs SGLang:", counts)
    assert counts["both refuse"] > 100 and counts["both accept"] > 100
