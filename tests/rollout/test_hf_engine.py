"""The embedded engine on a tiny random Llama with the SmolLM2 tokenizer."""

import pytest
import torch

from repo_megatron.engines.base import SamplingParams
from repo_megatron.engines.embedded import HFEngine

from .conftest import tiny_llama

PARAMS = SamplingParams(temperature=0.8, top_k=50, top_p=0.95, max_new_tokens=12, seed=1)


@pytest.fixture(scope="module")
def prompts(smollm2_tokenizer):
    texts = ["Compute (23 + 45) * 7.", "Hi", "A much longer prompt, so that the batch is padded."]
    return [smollm2_tokenizer.encode(t) for t in texts]


def test_logprobs_are_those_of_the_sampled_tokens_under_the_tempered_distribution(
        tiny_engine, prompts):
    results = tiny_engine.generate(prompts, [PARAMS.with_seed(s) for s in range(len(prompts))])
    for prompt, result in zip(prompts, results):
        ids = torch.tensor([prompt + result.token_ids])
        with torch.no_grad():
            logits = tiny_engine.model(input_ids=ids).logits[0]        # [seq, vocab]
        positions = range(len(prompt) - 1, len(prompt) - 1 + len(result.token_ids))
        expected = [torch.log_softmax(logits[p] / PARAMS.temperature, -1)[t].item()
                    for p, t in zip(positions, result.token_ids)]
        assert result.logprobs == pytest.approx(expected, abs=1e-4)
        assert result.finish_reason in ("stop", "length") and result.weight_version == 0


def test_a_seeded_request_gives_the_same_response_alone_or_in_a_batch(tiny_engine, prompts):
    batch = tiny_engine.generate(prompts, [PARAMS.with_seed(s) for s in (5, 6, 7)])
    alone = tiny_engine.generate(prompts[1:2], [PARAMS.with_seed(6)])
    assert alone[0].token_ids == batch[1].token_ids
    again = tiny_engine.generate(prompts[1:2], [PARAMS.with_seed(6)])
    assert again[0].token_ids == alone[0].token_ids
    other = tiny_engine.generate(prompts[1:2], [PARAMS.with_seed(8)])
    assert other[0].token_ids != alone[0].token_ids


def test_top_k_one_is_greedy(tiny_engine, prompts):
    greedy = tiny_engine.generate(prompts, [SamplingParams(temperature=0, max_new_tokens=6)] * 3)
    top1 = tiny_engine.generate(prompts, [SamplingParams(temperature=1.0, top_k=1,
                                                         max_new_tokens=6, seed=3)] * 3)
    assert [r.token_ids for r in greedy] == [r.token_ids for r in top1]
    assert all(r.finish_reason == "length" and len(r.token_ids) == 6 for r in greedy)


def test_stop_token_ids_and_stop_strings_end_the_response(tiny_engine, prompts):
    greedy = SamplingParams(temperature=0, max_new_tokens=10)
    (full,) = tiny_engine.generate(prompts[:1], [greedy])
    stop_id = full.token_ids[3]
    (by_id,) = tiny_engine.generate(prompts[:1], [SamplingParams(
        temperature=0, max_new_tokens=10, stop_token_ids=(stop_id,))])
    assert by_id.token_ids == full.token_ids[:full.token_ids.index(stop_id) + 1]
    assert (by_id.finish_reason, by_id.matched_stop) == ("stop", stop_id)

    tokenizer = tiny_engine.tokenizer
    stop = next(tokenizer.decode(full.token_ids[:n])[-2:] for n in range(2, 10)
                if tokenizer.decode(full.token_ids[:n]).strip())
    (by_text,) = tiny_engine.generate(prompts[:1], [SamplingParams(
        temperature=0, max_new_tokens=10, stop=(stop,))])
    assert by_text.finish_reason == "stop" and by_text.matched_stop == stop
    assert stop in by_text.text and stop not in tokenizer.decode(by_text.token_ids[:-1])
    assert by_text.token_ids == full.token_ids[:len(by_text.token_ids)]


def test_update_weights_loads_hf_named_tensors_and_bumps_the_version(smollm2_tokenizer, prompts):
    engine = HFEngine(tiny_llama(len(smollm2_tokenizer), seed=0), smollm2_tokenizer)
    other = tiny_llama(len(smollm2_tokenizer), seed=1)
    greedy = [SamplingParams(temperature=0, max_new_tokens=8)] * 3
    want = HFEngine(other, smollm2_tokenizer).generate(prompts, greedy)
    engine.update_weights(other.state_dict().items())
    assert engine.weight_version == 1
    got = engine.generate(prompts, greedy)
    assert [r.token_ids for r in got] == [r.token_ids for r in want]
    assert all(r.weight_version == 1 for r in got)
    engine.update_weights([], version=7)
    assert engine.weight_version == 7
    with pytest.raises(KeyError, match="model.nope"):
        engine.update_weights([("model.nope", torch.zeros(1))])
    with pytest.raises(ValueError, match="shape"):
        engine.update_weights([("model.norm.weight", torch.zeros(3))])


def forward_batch_sizes(model):
    """Record the batch size of every forward of ``model``; returns (sizes, hook handle)."""
    sizes = []
    handle = model.register_forward_pre_hook(
        lambda module, args, kwargs: sizes.append(tuple(kwargs["input_ids"].shape)),
        with_kwargs=True)
    return sizes, handle


def alone(engine, prompt, params):
    return engine.generate([prompt], [params])[0].token_ids


def test_a_request_joining_a_running_batch_gives_the_same_response(tiny_engine, prompts):
    short = SamplingParams(temperature=0.8, max_new_tokens=3, seed=11)
    long_b, long_c = PARAMS.with_seed(12), PARAMS.with_seed(13)
    sizes, handle = forward_batch_sizes(tiny_engine.model)
    try:
        with tiny_engine.stream() as stream:
            a = stream.submit(prompts[2], short)       # the widest prompt leaves first
            b = stream.submit(prompts[1], long_b)
            first = stream.wait()
            assert [t for t, _ in first] == [a]
            c = stream.submit(prompts[0], long_c)      # joins while b is decoding
            results = dict(first)
            while len(results) < 3:
                results.update(stream.wait())
            assert stream.wait() == []
    finally:
        handle.remove()
    # c was prefilled alone, then decoded in one batch with b
    prefill_c = sizes.index((1, len(prompts[0])))
    assert (2, 1) in sizes[prefill_c:]
    assert results[a].token_ids == alone(tiny_engine, prompts[2], short)
    assert results[b].token_ids == alone(tiny_engine, prompts[1], long_b)
    assert results[c].token_ids == alone(tiny_engine, prompts[0], long_c)
    assert len(results[b].token_ids) > 3


def test_a_retracted_batch_is_prefilled_again_and_goes_on_as_if_uninterrupted(tiny_engine,
                                                                               prompts):
    """HFStream.retract (a server's ``retract`` pause) frees the rows and their cache; the
    next step prefills each prompt with the tokens it had, and sampling goes on from each
    request's own generator."""
    params = [SamplingParams(temperature=0.8, top_k=20, max_new_tokens=10, seed=s)
              for s in (41, 42)]
    sizes, handle = forward_batch_sizes(tiny_engine.model)
    try:
        with tiny_engine.stream() as stream:
            tickets = [stream.submit(p, q) for p, q in zip(prompts[:2], params)]
            for _ in range(4):                         # a prefill and 3 decodes: 4 tokens each
                assert stream.step() == []
            assert stream.generated() == {t: 4 for t in tickets}
            stream.retract()
            assert not stream.rows and stream.cache is None
            results: dict = {}
            while len(results) < 2:
                results.update(stream.wait())
    finally:
        handle.remove()
    assert sizes[4] == (2, max(len(p) for p in prompts[:2]) + 4)
    assert [results[t].token_ids for t in tickets] == [
        alone(tiny_engine, p, q) for p, q in zip(prompts[:2], params)]


def test_copies_of_a_prompt_share_one_prefill_and_keep_their_own_samples(tiny_engine, prompts):
    params = [PARAMS.with_seed(s) for s in (21, 22, 23, 24)]
    sizes, handle = forward_batch_sizes(tiny_engine.model)
    try:
        together = tiny_engine.generate([prompts[0]] * 4 + [prompts[1]],
                                        params + [PARAMS.with_seed(25)])
    finally:
        handle.remove()
    assert sizes[0] == (2, len(prompts[0]))           # two distinct prompts, one prefill each
    assert sizes[1][0] == 5
    assert [r.token_ids for r in together[:4]] == [alone(tiny_engine, prompts[0], p)
                                                   for p in params]
    assert len({tuple(r.token_ids) for r in together[:4]}) == 4


def test_requests_beyond_the_batch_size_wait_and_join_as_rows_finish(smollm2_tokenizer, prompts):
    engine = HFEngine(tiny_llama(len(smollm2_tokenizer), seed=0), smollm2_tokenizer,
                      batch_size=2)
    params = [SamplingParams(temperature=0.8, max_new_tokens=n, seed=30 + n) for n in (2, 7, 4, 5, 3)]
    batch_prompts = [prompts[i % 3] for i in range(5)]
    sizes, handle = forward_batch_sizes(engine.model)
    try:
        results = engine.generate(batch_prompts, params)
    finally:
        handle.remove()
    assert max(rows for rows, _ in sizes) == 2
    assert any(width > 1 for _, width in sizes[1:])   # later requests were prefilled mid-run
    assert [r.token_ids for r in results] == [alone(engine, p, q)
                                              for p, q in zip(batch_prompts, params)]
    assert all(len(r.token_ids) == p.max_new_tokens if r.finish_reason == "length" else
               len(r.token_ids) < p.max_new_tokens for r, p in zip(results, params))


def test_a_reserved_cache_layer_appends_in_place_and_sees_replaced_keys():
    """ReservedLayer returns what DynamicLayer's torch.cat would, writes a decoded token into
    its room (the storage stays put), and copies keys that others replaced (rows joining or
    leaving the batch) into new buffers at the next append."""
    from transformers.cache_utils import DynamicLayer

    from repo_megatron.engines.embedded import ReservedLayer

    torch.manual_seed(0)
    ours, plain = ReservedLayer(), DynamicLayer()
    kept = []                            # alive, so that no buffer's address is reused
    for i in range(100):                 # a 5-token prefill, then one token per step
        new = torch.randn(3, 2, 5 if i == 0 else 1, 4)
        if i == 10:                      # a row leaves the batch, as in HFStream._retire
            for layer in (ours, plain):
                layer.batch_select_indices(torch.tensor([0, 2]))
        if i >= 10:
            new = new[[0, 2]]
        keys, values = ours.update(new, -new)
        want_keys, want_values = plain.update(new, -new)
        assert torch.equal(keys, want_keys) and torch.equal(values, want_values)
        kept.append(keys)
    storage = [k.untyped_storage().data_ptr() for k in kept]
    # new buffers: at the first decoded token, after the row left (step 10: its 15 columns
    # + 64 of room = 79, the width after step 74) and when that room ran out (step 75);
    # every other step wrote into the room
    assert [i for i in range(1, 100) if storage[i] != storage[i - 1]] == [1, 10, 75]
    assert ReservedLayer.ROOM == 64


def test_the_engine_runs_outside_the_cpu_compat_function_mode(tiny_engine, prompts,
                                                               monkeypatch):
    """The engine's model runs with no torch-function hook (cpu_compat.suspended); a model
    that asked for CUDA there would fail loudly instead of being sent to the CPU."""
    from repo_megatron.runtime import cpu_compat

    if cpu_compat.has_gpu():
        pytest.skip("the CPU compatibility layer is only installed without a GPU")
    cpu_compat.enable()
    seen = []
    hook = tiny_engine.model.register_forward_pre_hook(
        lambda *_: seen.append(torch._C._is_torch_function_enabled()))
    try:
        tiny_engine.generate(prompts[:1], [PARAMS])
    finally:
        hook.remove()
    assert torch.zeros(1, device="cuda").device.type == "cpu"   # the mode is on outside
    assert seen and not any(seen)
