"""The serve tests share the SGLang tests' tiny model (a random 2-layer Llama with SmolLM2's
tokenizer, context 512) and their in-process server helpers."""

import importlib.util

import pytest

from tests.sglang.conftest import model_dir  # noqa: F401  (the fixture, shared)


def needs_sglang_wheel():
    """Skip (with the reason) unless SGLang's own code imports: it is the oracle."""
    if importlib.util.find_spec("sglang") is None:
        pytest.skip("needs the sglang wheel (pip install --no-deps sglang==0.5.23 plus the "
                    "pure-Python packages its imports ask for)")
