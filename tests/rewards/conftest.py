from tests.rollout.conftest import smollm2_tokenizer  # noqa: F401  (shared session fixture)
