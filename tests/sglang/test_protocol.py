"""SGLang's protocol as pure functions, bucketing, and the flattened-bucket payload."""

import torch

from repo_megatron.config.rollout import SGLangConfig
from repo_megatron.engines.base import SamplingParams
from repo_megatron.engines.sglang.client import SGLangClient
from repo_megatron.engines.sglang.protocol import (error_message, generate_body,
                                                   generation_result, parse_version)
from repo_megatron.engines.sglang_server.tensor_payload import deserialize, named_tensors
from repo_megatron.weight_sync.buckets import iter_buckets
from repo_megatron.weight_sync.flattened_bucket import bucket_payloads, dtype_groups
from repo_megatron.weight_sync.registry import STRATEGIES

# what sglang-router 0.3 forwards of a /generate body (it re-serialises and drops the rest)
ROUTER_KEPT = {"input_ids", "text", "sampling_params", "return_logprob", "rid", "stream",
               "logprob_start_len", "top_logprobs_num", "return_text_in_logprobs"}
ROUTER_KEPT_SAMPLING = {"temperature", "top_p", "top_k", "max_new_tokens", "stop",
                        "stop_token_ids", "skip_special_tokens", "no_stop_trim",
                        "sampling_seed"}


def test_versions_parse():
    assert parse_version("0.5.23") == (0, 5, 23)
    assert parse_version("0.5.9.post1") == (0, 5, 9)
    assert parse_version("v0.5.22rc0") == (0, 5, 22)


def test_generate_body_sends_only_fields_the_router_keeps():
    params = SamplingParams(temperature=0.7, top_p=0.9, top_k=20, max_new_tokens=8,
                            stop=("</s>",), stop_token_ids=(5,), seed=123)
    body = generate_body([1, 2, 3], params)
    assert set(body) <= ROUTER_KEPT
    assert set(body["sampling_params"]) <= ROUTER_KEPT_SAMPLING
    assert body["sampling_params"]["sampling_seed"] == 123
    assert body["return_logprob"] is True


def test_generation_result_reads_ids_logprobs_and_finish_reason():
    result = generation_result({"text": "hi", "output_ids": [4, 2], "meta_info": {
        "finish_reason": {"type": "stop", "matched": 2}, "weight_version": "3",
        "output_token_logprobs": [[-1.5, 4, None], [-0.5, 2, None]]}})
    assert result.token_ids == [4, 2] and result.logprobs == [-1.5, -0.5]
    assert result.finish_reason == "stop" and result.matched_stop == 2
    assert result.weight_version == 3


def test_error_message_reads_sglang_error_shapes():
    assert error_message(400, '{"error": {"message": "bad"}}') == "bad"
    assert error_message(400, '{"success": false, "message": "refused"}') == "refused"
    assert error_message(500, "Internal Server Error") == "Internal Server Error"


def test_backoff_doubles_up_to_the_cap():
    client = SGLangClient(backoff_s=0.5, max_backoff_s=3.0)
    assert [client.backoff(a) for a in range(4)] == [0.5, 1.0, 2.0, 3.0]


def test_buckets_respect_the_size_and_keep_order():
    named = [(f"w{i}", torch.zeros(256)) for i in range(5)]     # 1 KiB each
    buckets = list(iter_buckets(iter(named), max_bytes=2048))
    assert [[n for n, _ in b] for b in buckets] == [["w0", "w1"], ["w2", "w3"], ["w4"]]
    big = list(iter_buckets([("big", torch.zeros(4096))], max_bytes=1024))
    assert len(big) == 1                                        # too large: travels alone


def test_dtype_groups_keep_one_dtype_per_flattened_tensor_unless_mixed_is_supported():
    bucket = [("a", torch.zeros(2)), ("b", torch.zeros(2, dtype=torch.bfloat16)),
              ("c", torch.ones(3))]
    assert [[n for n, _ in g] for g in dtype_groups(bucket)] == [["a", "c"], ["b"]]
    assert [[n for n, _ in g] for g in dtype_groups(bucket, multi_dtype=True)] == \
        [["a", "b", "c"]]


def test_flattened_bucket_round_trips_through_the_payload():
    bucket = [("q.weight", torch.randn(3, 4)), ("norm.weight", torch.randn(4))]
    (text,) = bucket_payloads(bucket)
    rebuilt = named_tensors(deserialize(text), "flattened_bucket")
    assert [n for n, _ in rebuilt] == ["q.weight", "norm.weight"]
    for (_, want), (_, got) in zip(bucket, rebuilt):
        assert torch.equal(want, got)


def test_every_configured_strategy_is_registered():
    assert set(STRATEGIES) == {"disk", "tensor", "distributed"}
    for name in STRATEGIES:
        assert STRATEGIES.get(name)(SGLangConfig(weight_sync=name)).name == name
