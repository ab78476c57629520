"""``rollout:`` how responses are sampled, and by which engine."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from ..errors import ConfigError
from ..weight_sync.registry import STRATEGIES
from .base import knob, section


MEMORY_SAVER_FLAG = "--enable-memory-saver"


@dataclass
class SGLangLaunchConfig:
    """Servers that repo-megatron starts itself (``repo_megatron.engines.sglang.launcher``)."""
    num_servers: int = knob(0, "SGLang servers to start (0 = use sglang.urls / router_url "
                               "as they are)", ge=0)
    mode: str = knob("local", "`local` processes on this node, or `srun` steps of the "
                              "current SLURM allocation", choices=["local", "srun"])
    command: list[str] = knob(default_factory=lambda: ["python", "-m", "sglang.launch_server"],
                              help="Server command; --host/--port are appended")
    args: list[str] = knob(default_factory=list, help="Extra server arguments (e.g. "
                                                      "--model-path, --tp-size); "
                                                      "--enable-memory-saver is added where "
                                                      "sglang.release_memory is on")
    host: str = knob("127.0.0.1", "Address the servers bind (127.0.0.1 = this node only)")
    base_port: int = knob(30000, "Port of server i is base_port + i", ge=1, le=65535)
    srun_args: list[str] = knob(default_factory=list, help="Extra srun arguments per server "
                                                           "(e.g. --nodes=1 --gpus=8)")
    router: bool = knob(False, "Start sglang-router in front of the servers")
    router_port: int = knob(29000, "sglang-router port", ge=1, le=65535)
    router_command: list[str] = knob(
        default_factory=lambda: ["python", "-m", "sglang_router.launch_router"],
        help="sglang-router command; --host/--port are appended")
    router_args: list[str] = knob(default_factory=lambda: ["--policy", "round_robin"],
                                  help="Extra sglang-router arguments")
    startup_timeout_s: float = knob(1800.0, "How long a server may take to become healthy",
                                    gt=0)
    deterministic_inference: bool = knob(
        False, "Pass --enable-deterministic-inference to the servers: SGLang honours a "
               "request's sampling_seed only then (see docs/sglang.md for what stays "
               "reproducible)")
    router_health_check_interval_s: int = knob(
        60, "sglang-router: seconds between health checks of a worker", ge=1)
    router_health_check_timeout_s: int = knob(
        60, "sglang-router: a health check slower than this fails (a worker loading "
            "weights answers late)", ge=1)
    router_health_failure_threshold: int = knob(
        10, "sglang-router: consecutive failed checks before a worker is marked dead "
            "(interval x threshold must outlast the longest weight update)", ge=1)


@dataclass
class SGLangConfig:
    urls: list[str] = knob(default_factory=list, help="SGLang worker URLs (http://host:port); "
                                                      "empty with no router = embedded engine")
    router_url: Optional[str] = knob(None, "sglang-router URL; workers are listed from its "
                                           "GET /workers for the endpoints it does not proxy")
    request_timeout_s: float = knob(600.0, "Per-request timeout", gt=0)
    max_concurrency_per_server: int = knob(64, "In-flight /generate requests per server; "
                                               "through a router, this x the engines it lists",
                                           ge=1)
    max_retries: int = knob(3, "Retries of a request on connection errors and 503", ge=0)
    retry_backoff_s: float = knob(0.5, "First retry delay; doubles per retry (at most 8 s)",
                                  gt=0)
    health_timeout_s: float = knob(600.0, "How long to wait for /health_generate at start",
                                   gt=0)
    weight_sync: str = knob("disk", "How new weights reach the servers", choices=STRATEGIES)
    weight_bucket_mb: int = knob(512, "Bucket size of weight updates: every pipeline stage "
                                      "streams its weights in buckets of at most this size",
                                 ge=1)
    pause_mode: str = knob("retract", "How /pause_generation stops running requests during a "
                                      "weight update: `retract` (back to the queue, resumed "
                                      "after), `in_place` (kept with their KV cache; the cache "
                                      "is not flushed), `abort` (aborted; the client retries "
                                      "them)", choices=["abort", "retract", "in_place"])
    flush_cache_timeout_s: float = knob(60.0, "How long to retry /flush_cache (refused while "
                                              "requests run) after an update", gt=0)
    release_memory: Optional[bool] = knob(
        None, "Release the servers' GPU memory (weights, KV cache) while the trainer trains "
              "and resume it for the weight update (null = on for weight_sync=tensor, the "
              "colocated layout)")
    offload_trainer: str = knob(
        "auto", "Colocated runs (weight_sync=tensor): take the trainer's weights, gradient "
                "buffers, fp32 main weights and Adam state off the GPU while SGLang generates, "
                "back bit for bit before the next forward: `memory_saver` (torch_memory_saver; "
                "needs the package and a GPU), `host` (pinned host copies, portable), `auto` = "
                "memory_saver where it can work, host otherwise, or `off`. Disaggregated runs "
                "never offload (docs/sglang.md)",
        choices=["auto", "off", "host", "memory_saver"])
    disk_dir: str = knob("", "disk sync: directory every server can read (empty = a "
                             "temporary directory, single node only)")
    distributed_backend: str = knob("nccl", "distributed sync: process-group backend (gloo "
                                            "for CPU servers)", choices=["nccl", "gloo"])
    distributed_master_address: str = knob("", "distributed sync: address the servers reach "
                                               "the trainer at (empty = this host's name)")
    distributed_master_port: int = knob(0, "distributed sync: rendezvous port (0 = a free "
                                           "port)", ge=0, le=65535)
    launch: SGLangLaunchConfig = section(SGLangLaunchConfig, "Servers started by repo-megatron")

    @property
    def releases_memory(self) -> bool:
        """Whether the engines' memory is released during training (``release_memory``)."""
        return self.weight_sync == "tensor" if self.release_memory is None else self.release_memory

    @property
    def server_args(self) -> list[str]:
        """``launch.args`` as the servers get them (the launcher and the SLURM scripts): with
        ``--enable-memory-saver`` where their memory is released (``releases_memory``), since
        without it SGLang's release frees nothing."""
        args = list(self.launch.args)
        if self.releases_memory and MEMORY_SAVER_FLAG not in args:
            args.append(MEMORY_SAVER_FLAG)
        return args

    @property
    def trainer_offload(self) -> str:
        """``offload_trainer`` in this layout: ``off`` unless colocated (weight_sync=tensor);
        ``auto`` is resolved where the trainer runs (``training.offload``)."""
        return self.offload_trainer if self.weight_sync == "tensor" else "off"


@dataclass
class RolloutConfig:
    engine: str = knob("auto", "`embedded` (Hugging Face model in the trainer process, CPU ok), "
                               "`sglang`, or `auto` = sglang when sglang.urls or "
                               "sglang.router_url is set", choices=["auto", "embedded", "sglang"])
    prompts_per_step: int = knob(8, "Prompts sampled per training step (global)", ge=1)
    group_size: int = knob(8, "Responses per prompt (G)", ge=2)
    temperature: float = knob(1.0, "Sampling temperature", ge=0)
    top_p: float = knob(1.0, "Nucleus sampling threshold", gt=0, le=1)
    top_k: int = knob(-1, "Top-k sampling (-1 = off)", ge=-1)
    max_new_tokens: int = knob(512, "Longest response", ge=1)
    stop: list[str] = knob(default_factory=list, help="Stop strings")
    stop_token_ids: list[int] = knob(default_factory=list, help="Extra stop token ids (the "
                                                               "tokenizer's EOS always stops)")
    batch_size: int = knob(64, "Embedded engine: sequences generated together", ge=1)
    max_staleness: int = knob(
        0, "k: the rollouts of the next k steps run while Megatron trains (rank 0 samples "
           "them in the background); a sample is trained at most k weight versions after the "
           "one that generated it. 0 = the synchronous loop. With SGLang servers the rollout "
           "side runs in a process of its own; the embedded engine's on a thread, on the "
           "trainer's own cores. Not with colocated SGLang servers (docs/rollout.md)",
        ge=0)
    sglang: SGLangConfig = section(SGLangConfig, "SGLang servers and weight sync")

    def validate(self, path: str) -> None:
        sg = self.sglang
        if sg.offload_trainer in ("host", "memory_saver") and sg.weight_sync != "tensor":
            raise ConfigError(f"{path}.sglang.offload_trainer={sg.offload_trainer} needs the "
                              f"colocated layout ({path}.sglang.weight_sync=tensor): a "
                              f"disaggregated trainer has its GPUs to itself")
        if self.max_staleness > 0 and sg.releases_memory:
            key = ("sglang.weight_sync=tensor" if sg.weight_sync == "tensor"
                   else "sglang.release_memory=true")
            raise ConfigError(f"{path}.max_staleness={self.max_staleness} needs the servers "
                              f"generating while the trainer trains, but {path}.{key} "
                              f"colocates them (they take turns on the GPUs): set "
                              f"{path}.max_staleness=0 or disaggregate")
        if self.engine == "sglang" and not (sg.urls or sg.router_url or sg.launch.num_servers):
            raise ConfigError(f"{path}.engine=sglang needs {path}.sglang.urls, "
                              f"{path}.sglang.router_url or {path}.sglang.launch.num_servers")
