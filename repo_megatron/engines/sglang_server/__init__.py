"""``repo-megatron serve``: an SGLang-compatible HTTP server (SGLang's native protocol and its
OpenAI chat endpoint) over the embedded CPU engine, so the SGLang rollout path -- client,
sglang-router, weight sync -- runs on a laptop or in CI. :mod:`.command` is the CLI,
:mod:`.app` the routes, :mod:`.worker` the engine thread."""
