# shellcheck shell=bash
# shellcheck disable=SC2034  # CONTAINER_ARGS, ON_NODE_ADDRESS are for the scripts that source this file
# Shared by the job scripts in examples/slurm/ (sourced, not run).
#
# Every training setting comes from the YAML config: `read_settings CONFIG [key=value ...]`
# sets REPO_TP, REPO_PP, REPO_VPP, REPO_MODEL_PARALLEL, REPO_HF_PATH, REPO_LOAD,
# REPO_VOCAB_DIVISIBLE_BY, REPO_RUN_DIR, REPO_WEIGHT_SYNC, REPO_ROUTER_PORT and the array
# REPO_SERVER_ARGS (rollout.sglang.launch.args) from
# `python -m repo_megatron.plan.slurm`. What stays here is how the job is laid out on
# the cluster, each overridable from the environment at submission:
#   REPO_DIR         the repository (default: the directory sbatch was called from)
#   PYTHON           the Python with repo_megatron installed, on the batch host and every node
#                    (default python); every step runs it, never a repo-megatron from PATH
#   GPUS_PER_NODE    default: SLURM_GPUS_ON_NODE, else 8
#   SGLANG_PORT      port of every SGLang server (default 30000)
#   MASTER_PORT      torch.distributed rendezvous port (default 29500)
#   CONTAINER_IMAGE  run every step in this enroot/pyxis image (squashfs or registry#image);
#   CONTAINER_MOUNTS with these mounts (default: the repository at the same path)
#   REPO_SGLANG_API_KEY  the key of the SGLang servers and router (default: random per job)

REPO_DIR=${REPO_DIR:-${SLURM_SUBMIT_DIR:-$PWD}}
PYTHON=${PYTHON:-python}
GPUS_PER_NODE=${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-8}}
SGLANG_PORT=${SGLANG_PORT:-30000}
cd "$REPO_DIR" || exit 1

# pyxis flags for srun; empty without a container (the steps then use the host's Python).
CONTAINER_ARGS=()
if [[ -n ${CONTAINER_IMAGE:-} ]]; then
    CONTAINER_ARGS=(--container-image="$CONTAINER_IMAGE"
                    --container-mounts="${CONTAINER_MOUNTS:-$REPO_DIR:$REPO_DIR}"
                    --container-workdir="$REPO_DIR")
fi

# Settings from the config (and the overrides the trainer gets), as REPO_* variables.
read_settings() {
    local settings
    settings=$("$PYTHON" -m repo_megatron.plan.slurm "$@")
    eval "$settings"
}

# The job's hosts, one per line, in allocation order.
job_hosts() {
    scontrol show hostnames "$SLURM_JOB_NODELIST"
}

# A random API key (64 hex digits).
new_api_key() {
    "$PYTHON" -c 'import secrets; print(secrets.token_hex(32))'
}

# sglang_key_file PATH writes $REPO_SGLANG_API_KEY as an SGLang --config file readable by the
# owner only, and prints PATH (the key then appears on no command line).
sglang_key_file() {
    if [[ ! $REPO_SGLANG_API_KEY =~ ^[A-Za-z0-9._~+/=-]+$ ]]; then
        echo "error: REPO_SGLANG_API_KEY may hold only letters, digits and ._~+/=-" >&2
        return 1
    fi
    (umask 077 && printf 'api-key: "%s"\n' "$REPO_SGLANG_API_KEY" > "$1")
    echo "$1"
}

# Prefix of an srun step whose command gets "--host <this node>" appended on each node.
# shellcheck disable=SC2016  # expanded by the step's shell, on its node
ON_NODE_ADDRESS=(bash -c 'exec "$@" --host "${SLURMD_NODENAME:-$(hostname)}"' on-node-address)

# join_by SEPARATOR WORD... prints the words joined by the separator.
join_by() {
    local IFS=$1
    shift
    echo "$*"
}

# wait_healthy URL: poll until the URL answers 200, for at most HEALTH_TIMEOUT seconds.
wait_healthy() {
    local deadline=$((SECONDS + ${HEALTH_TIMEOUT:-1800}))
    until curl --silent --fail --output /dev/null "$1"; do
        if ((SECONDS >= deadline)); then
            echo "error: $1 not healthy after ${HEALTH_TIMEOUT:-1800} s" >&2
            return 1
        fi
        sleep 10
    done
}
