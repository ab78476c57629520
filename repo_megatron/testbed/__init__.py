"""A CPU-sized testbed where learning is visible in minutes: a character-level tokenizer with a
chat template (:mod:`.chars`), arithmetic tasks written in two styles (:mod:`.tasks`) and the
supervised warm-up of a tiny Llama on them (:mod:`.warmup`).

The learning tests (``tests/learning/``) and ``benchmarks/hard_samples.py`` build their starting
policy here and then train it with the real stack (Megatron-Core on gloo, the embedded engine,
the RePO stage, the loss, weight sync). Nothing in the trainer imports this package.
"""
