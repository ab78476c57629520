"""``repo-megatron serve``'s /v1/chat/completions: read by the official ``openai`` client (and
SGLang's own protocol classes when the sglang wheel is installed), the same generation as
/generate under the chat template, and SGLang's error shape for what it does not serve."""

import httpx
import openai
import pytest

from repo_megatron.engines.sglang_server.openai import native_sampling_params

from .inprocess import serve_model

MESSAGES = [{"role": "system", "content": "You are terse."},
            {"role": "user", "content": "Say something."}]


def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key="EMPTY", max_retries=0, timeout=120)


def test_the_openai_client_reads_a_chat_completion(model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    with serve_model(model_dir) as (url, server):
        completion = client(url).chat.completions.create(
            model="tiny", messages=MESSAGES, max_tokens=6, temperature=1.0, seed=3)
        prompt = tokenizer.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
        ids = tokenizer.encode(prompt, add_special_tokens=False)
        native = httpx.post(url + "/generate", json={
            "input_ids": ids, "sampling_params": {"max_new_tokens": 6, "temperature": 1.0,
                                                  "sampling_seed": 3}}, timeout=120).json()
    choice = completion.choices[0]
    assert completion.object == "chat.completion" and completion.model == "tiny"
    assert completion.id.startswith("chatcmpl-")
    assert choice.index == 0 and choice.message.role == "assistant"
    assert choice.message.content == native["text"]       # the chat template, then /generate
    assert choice.finish_reason == native["meta_info"]["finish_reason"]["type"]
    assert completion.usage.prompt_tokens == len(ids)
    assert completion.usage.completion_tokens == native["meta_info"]["completion_tokens"]
    assert completion.usage.total_tokens == len(ids) + completion.usage.completion_tokens
    assert completion.metadata == {"weight_version": "default"}
    assert choice.model_extra["matched_stop"] == native["meta_info"]["finish_reason"].get("matched")


def test_max_completion_tokens_wins_over_max_tokens_and_text_parts_are_joined(model_dir):
    with serve_model(model_dir) as (url, _):
        completion = client(url).chat.completions.create(
            model="tiny", max_tokens=9, max_completion_tokens=2, temperature=0.0,
            messages=[{"role": "user", "content": [{"type": "text", "text": "Hello"},
                                                   {"type": "text", "text": "there"}]}])
    assert completion.usage.completion_tokens <= 2
    assert completion.choices[0].finish_reason in ("length", "stop")


@pytest.mark.parametrize("extra", [{}, {"temperature": 0.5, "top_p": 0.9, "top_k": 5,
                                    "max_completion_tokens": 3, "stop": ["\n"]}])
def test_requests_and_responses_match_sglangs_own_protocol_classes(model_dir, extra):
    protocol = pytest.importorskip("sglang.srt.entrypoints.openai.protocol",
                                   reason="needs the sglang wheel (pip install --no-deps sglang)")
    body = {"model": "tiny", "messages": MESSAGES, "max_tokens": 4, "seed": 1, **extra}
    theirs = protocol.ChatCompletionRequest.model_validate(body).to_sampling_params(
        stop=body.get("stop") or [], model_generation_config={})
    ours = native_sampling_params(body)
    assert {k: theirs[k] for k in ours} == {**ours, "stop": body.get("stop") or []}
    with serve_model(model_dir) as (url, _):
        answer = httpx.post(url + "/v1/chat/completions", json=body, timeout=120).json()
    assert protocol.ChatCompletionResponse.model_validate(answer).model_dump() == answer


@pytest.mark.parametrize("body, message", [
    ({"messages": []}, "Messages cannot be empty."),
    ({"messages": MESSAGES, "stream": True}, "stream=True is not supported by repo-megatron serve"),
    ({"messages": MESSAGES, "n": 2}, "n=2 is not supported by repo-megatron serve"),
    ({"messages": [{"role": "robot", "content": "x"}]},
     "messages[0] must be an object with a role in system, developer, user, assistant"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
     "messages[0].content: only text parts are supported by repo-megatron serve"),
    ({"messages": MESSAGES, "top_p": 0}, "sampling_params: top_p must be in (0, 1]"),
])
def test_requests_it_cannot_serve_get_sglangs_400_error_shape(model_dir, body, message):
    with serve_model(model_dir) as (url, _):
        answer = httpx.post(url + "/v1/chat/completions", json=body, timeout=60)
        with pytest.raises(openai.BadRequestError) as error:
            client(url).chat.completions.create(model="tiny", **body)
    assert answer.status_code == 400
    assert answer.json()["object"] == "error" and answer.json()["code"] == 400
    assert answer.json()["message"].startswith(message)
    assert error.value.status_code == 400


def test_invalid_json_is_a_400(model_dir):
    with serve_model(model_dir) as (url, _):
        answer = httpx.post(url + "/v1/chat/completions", content=b"{not json",
                            headers={"content-type": "application/json"}, timeout=60)
    assert answer.status_code == 400 and answer.json()["message"].startswith("the body is not valid JSON")
