"""A character-level Hugging Face tokenizer with a chat template, built with ``tokenizers``.

One token per printable ASCII character (plus newline) and five special tokens: ``<pad>``,
``</s>`` (EOS) and the role markers of the chat template
``<|user|>{content}\\n<|assistant|>``. A vocabulary of ~100 keeps a tiny model's embedding and
LM head cheap, and character tokens make copying and arithmetic visible one digit at a time.
"""

from __future__ import annotations

import string

CHARACTERS = string.digits + string.ascii_letters + string.punctuation + " \n"
SPECIAL_TOKENS = ("<pad>", "</s>", "<|user|>", "<|assistant|>", "<|system|>")
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def build_char_tokenizer():
    """A ``PreTrainedTokenizerFast`` (save it with ``save_pretrained``); characters outside
    :data:`CHARACTERS` are an error when encoded."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate([*SPECIAL_TOKENS, *CHARACTERS])}
    # BPE without merges = one token per character; Fuse joins them back without spaces
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=None, fuse_unk=False))
    core.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    core.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", eos_token="</s>",
        additional_special_tokens=list(SPECIAL_TOKENS[2:]), clean_up_tokenization_spaces=False)
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer
