"""``repo-megatron serve`` from the command line: loopback unless told, never an open address
without a key (one-line error), keys from the environment, and SIGTERM ends it within seconds
even in the middle of a long generation."""

import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest

from repo_megatron.cli import build_parser
from repo_megatron.engines.sglang_server.command import is_loopback, options_from
from repo_megatron.errors import ConfigError

from ..sglang.servers import free_ports, wait_healthy


def options(*argv, env=None, monkeypatch=None):
    for name, value in (env or {}).items():
        monkeypatch.setenv(name, value)
    return options_from(build_parser().parse_args(["serve", "--model", "m", *argv]))


def test_loopback_is_the_default_and_needs_no_key():
    args = build_parser().parse_args(["serve", "--model", "m"])
    assert args.host == "127.0.0.1" and is_loopback(args.host)
    assert options().api_key is None
    assert all(is_loopback(h) for h in ("127.0.0.1", "127.8.0.1", "::1", "localhost"))
    assert not any(is_loopback(h) for h in ("0.0.0.0", "::", "10.1.2.3", "node7"))


def test_any_other_address_needs_a_key(monkeypatch):
    monkeypatch.delenv("REPO_SGLANG_API_KEY", raising=False)
    monkeypatch.delenv("REPO_SGLANG_ADMIN_API_KEY", raising=False)
    with pytest.raises(ConfigError, match=r"serve --host 0.0.0.0 .* give --api-key"):
        options("--host", "0.0.0.0")
    assert options("--host", "0.0.0.0", "--api-key", "k").api_key == "k"
    assert options("--host", "node7", "--admin-api-key", "a").admin_api_key == "a"
    got = options("--host", "0.0.0.0", env={"REPO_SGLANG_API_KEY": "from-env"},
                  monkeypatch=monkeypatch)
    assert got.api_key == "from-env"


def test_bad_limits_and_roots_are_one_line_errors(tmp_path):
    with pytest.raises(ConfigError, match="--max-new-tokens=0 must be > 0"):
        options("--max-new-tokens", "0")
    with pytest.raises(ConfigError, match="--weights-root .*: not a directory"):
        options("--weights-root", str(tmp_path / "missing"))
    got = options("--weights-root", str(tmp_path), "--max-body-mb", "1",
                  "--weight-sync-hosts", "trainer0", "trainer1")
    assert got.max_body_bytes == 1 << 20 and got.weight_sync_hosts == ("trainer0", "trainer1")


def test_an_open_address_without_a_key_exits_2_with_one_line(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("REPO_SGLANG_")}
    proc = subprocess.run([sys.executable, "-m", "repo_megatron.cli", "serve", "--model",
                           str(tmp_path), "--host", "0.0.0.0"], capture_output=True, text=True,
                          env=env, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("ConfigError: serve --host 0.0.0.0")
    assert "Traceback" not in proc.stderr


def test_sigterm_ends_the_server_within_seconds_mid_generation(long_context_model_dir, tmp_path):
    model_dir = long_context_model_dir
    port = free_ports(1)
    url = f"http://127.0.0.1:{port}"
    log = open(tmp_path / "serve.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "repo_megatron.cli", "serve", "--model",
                             model_dir, "--port", str(port), "--threads", "1"],
                            stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_healthy(url, timeout_s=600)
        answer = {}

        def long_request():
            try:
                answer["response"] = httpx.post(url + "/generate", json={
                    "input_ids": [1, 2],
                    "sampling_params": {"max_new_tokens": 16000, "temperature": 0}},
                    timeout=120)
            except httpx.HTTPError as e:
                answer["error"] = e
        request = threading.Thread(target=long_request)
        request.start()
        time.sleep(1.0)                                 # decoding is under way
        start = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
        took = time.monotonic() - start
        request.join(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
    print(f"SIGTERM to exit: {took:.2f} s")
    assert took < 5, f"shutdown took {took:.1f} s"
    # uvicorn re-raises the signal once it has shut down gracefully
    assert proc.returncode in (0, -signal.SIGTERM), (tmp_path / "serve.log").read_text()[-2000:]
    assert "Traceback" not in (tmp_path / "serve.log").read_text()
    # the request in flight was answered at once, as aborted
    assert answer["response"].status_code == 200, answer["response"].text
    assert answer["response"].json()["meta_info"]["finish_reason"]["type"] == "abort"
