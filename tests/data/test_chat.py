"""Prompt encoding through the chat template (SmolLM2's, from its GGUF)."""

from repo_megatron.data.chat import ChatFormatter


def test_chat_template_wraps_the_question_with_a_system_message(smollm2_tokenizer):
    formatter = ChatFormatter(smollm2_tokenizer, system_prompt="Be brief.")
    text = formatter.prompt_text("Compute 2 + 2.")
    assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>")
    assert text.endswith("<|im_start|>user\nCompute 2 + 2.<|im_end|>\n<|im_start|>assistant\n")
    ids = formatter.prompt_ids("Compute 2 + 2.")
    assert smollm2_tokenizer.decode(ids) == text


def test_response_ids_end_in_eos_only_when_asked(smollm2_tokenizer):
    formatter = ChatFormatter(smollm2_tokenizer)
    ids = formatter.response_ids("The answer is 4.")
    assert ids[-1] == smollm2_tokenizer.eos_token_id
    assert formatter.response_ids("The answer is 4.", eos=False) == ids[:-1]


def test_without_template_the_question_is_the_prompt(smollm2_tokenizer):
    formatter = ChatFormatter(smollm2_tokenizer, apply_chat_template=False)
    assert formatter.prompt_text("2 + 2 =") == "2 + 2 ="
