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


def test_few_shot_examples_are_earlier_turns_between_system_and_question(smollm2_tokenizer):
    formatter = ChatFormatter(smollm2_tokenizer, system_prompt="Be brief.",
                              few_shot=(("Compute 1 + 1.", "1 + 1 = 2, \\boxed{2}"),
                                        ("Compute 2 * 3.", "2 * 3 = 6, \\boxed{6}")))
    text = formatter.prompt_text("Compute 2 + 2.")
    expected = smollm2_tokenizer.apply_chat_template(
        [{"role": "system", "content": "Be brief."},
         {"role": "user", "content": "Compute 1 + 1."},
         {"role": "assistant", "content": "1 + 1 = 2, \\boxed{2}"},
         {"role": "user", "content": "Compute 2 * 3."},
         {"role": "assistant", "content": "2 * 3 = 6, \\boxed{6}"},
         {"role": "user", "content": "Compute 2 + 2."}], tokenize=False, add_generation_prompt=True)
    assert text == expected
    order = [text.index(s) for s in ("Be brief.", "Compute 1 + 1.", "\\boxed{2}",
                                     "Compute 2 * 3.", "\\boxed{6}", "Compute 2 + 2.")]
    assert order == sorted(order)
    assert text.endswith("<|im_start|>user\nCompute 2 + 2.<|im_end|>\n<|im_start|>assistant\n")


def test_few_shot_without_a_template_is_plain_text_before_the_question(smollm2_tokenizer):
    formatter = ChatFormatter(smollm2_tokenizer, apply_chat_template=False,
                              few_shot=(("1 + 1 =", "2"),))
    assert formatter.prompt_text("2 + 2 =") == "1 + 1 =\n2\n\n2 + 2 ="


def test_the_formatter_follows_the_data_config(smollm2_tokenizer):
    from repo_megatron.config.base import build
    from repo_megatron.config.data import DataConfig

    data = build(DataConfig, {"system_prompt": "S", "few_shot": [
        {"user": "Compute 1 + 1.", "assistant": "\\boxed{2}"}]}, "data")
    formatter = ChatFormatter.from_config(smollm2_tokenizer, data)
    assert formatter.few_shot == (("Compute 1 + 1.", "\\boxed{2}"),)
    assert formatter.system_prompt == "S" and formatter.apply_chat_template
