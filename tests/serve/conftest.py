"""The serve tests share the SGLang tests' tiny model (a random 2-layer Llama with SmolLM2's
tokenizer, context 512) and their in-process server helpers; tests that must stop a generation
in the middle take its 16k-context copy."""

import importlib.util
import json
import shutil

import pytest

from tests.sglang.conftest import model_dir  # noqa: F401  (the fixture, shared)


def needs_sglang_wheel():
    """Skip (with the reason) unless SGLang's own code imports: it is the oracle."""
    if importlib.util.find_spec("sglang") is None:
        pytest.skip("needs the sglang wheel (pip install --no-deps sglang==0.5.23 plus the "
                    "pure-Python packages its imports ask for)")


@pytest.fixture(scope="session")
def long_context_model_dir(model_dir, tmp_path_factory):
    """The tiny Llama with a 16k context, so one request can decode for far longer than the
    test waits (500 tokens of the 512-context model finish in under a second on a fast CPU).
    Greedy from [1, 2] repeats one token that is not EOS, so the request cannot end early."""
    directory = tmp_path_factory.mktemp("tiny_llama_16k")
    shutil.copytree(model_dir, directory, dirs_exist_ok=True)
    config = json.loads((directory / "config.json").read_text())
    config["max_position_embeddings"] = 16384
    (directory / "config.json").write_text(json.dumps(config))
    return str(directory)
