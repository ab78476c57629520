#!/bin/bash
# The body of the RePO training jobs: `train.sh CONFIG [key=value ...]`, called by the
# *_repo*.sbatch scripts inside their allocation.
#
# Disaggregated (rollout.sglang.weight_sync = distributed or disk): the first
# N - ROLLOUT_NODES nodes train, the last ROLLOUT_NODES nodes each run one SGLang server with
# TP = GPUs per node. Colocated (weight_sync = tensor, which needs shared GPUs): every node
# runs a server and trainer ranks on the same GPUs; the servers' share of each GPU is the
# --mem-fraction-static in rollout.sglang.launch.args, which every server gets. sglang-router
# runs on the first trainer node and the trainer talks to it only.
#
# Network exposure: every server binds its own node's address (not 0.0.0.0) and, like the
# router, requires the API key $REPO_SGLANG_API_KEY (a random one per job when unset); the
# trainer sends it. The servers read the key from a 0600 file in the job's log directory, so it
# is on no command line; sglang-router only takes --api-key. See docs/security.md.
set -euo pipefail
# shellcheck source=common.sh
source "${REPO_DIR:-${SLURM_SUBMIT_DIR:-$PWD}}/examples/slurm/common.sh"

CONFIG=$1
shift
OVERRIDES=("$@")
read_settings "$CONFIG" "${OVERRIDES[@]}"

mapfile -t HOSTS < <(job_hosts)
SERVER_ARGS=(--model-path "$REPO_HF_PATH" --tp "$GPUS_PER_NODE" --port "$SGLANG_PORT"
             "${REPO_SERVER_ARGS[@]}")
if [[ $REPO_WEIGHT_SYNC == tensor ]]; then
    TRAIN_HOSTS=("${HOSTS[@]}")
    ROLLOUT_HOSTS=("${HOSTS[@]}")
else
    : "${ROLLOUT_NODES:?set ROLLOUT_NODES, the nodes of the SGLang pool}"
    if ((ROLLOUT_NODES >= ${#HOSTS[@]})); then
        echo "error: ROLLOUT_NODES=$ROLLOUT_NODES leaves no trainer node of ${#HOSTS[@]}" >&2
        exit 1
    fi
    TRAIN_HOSTS=("${HOSTS[@]:0:${#HOSTS[@]}-ROLLOUT_NODES}")
    ROLLOUT_HOSTS=("${HOSTS[@]:${#HOSTS[@]}-ROLLOUT_NODES}")
fi
TRAIN_NODES=${#TRAIN_HOSTS[@]}

# Pre-flight: divisibility and per-GPU memory of this layout, before any GPU is touched.
"$PYTHON" -m repo_megatron.cli plan "$CONFIG" "${OVERRIDES[@]}" --nodes "$TRAIN_NODES" \
    --gpus-per-node "$GPUS_PER_NODE"

LOG_DIR=$REPO_RUN_DIR/slurm-${SLURM_JOB_ID}
mkdir -p "$LOG_DIR"
export REPO_SGLANG_API_KEY=${REPO_SGLANG_API_KEY:-$(new_api_key)}
SERVER_ARGS+=(--config "$(sglang_key_file "$LOG_DIR/sglang-auth.yaml")")
STEP_PIDS=()
trap 'kill "${STEP_PIDS[@]}" 2>/dev/null || true' EXIT

# One SGLang server per rollout node (--overlap: colocated servers share the trainer's GPUs),
# bound to that node's own address.
srun --overlap --nodes="${#ROLLOUT_HOSTS[@]}" --ntasks-per-node=1 \
    --nodelist="$(join_by , "${ROLLOUT_HOSTS[@]}")" --gpus-per-node="$GPUS_PER_NODE" \
    --output="$LOG_DIR/sglang-%N.log" "${CONTAINER_ARGS[@]}" \
    "${ON_NODE_ADDRESS[@]}" "$PYTHON" -m sglang.launch_server "${SERVER_ARGS[@]}" &
STEP_PIDS+=($!)
WORKER_URLS=()
for host in "${ROLLOUT_HOSTS[@]}"; do
    WORKER_URLS+=("http://$host:$SGLANG_PORT")
done
for url in "${WORKER_URLS[@]}"; do
    wait_healthy "$url/health_generate"
done

ROUTER_HOST=${TRAIN_HOSTS[0]}
ROUTER_URL=http://$ROUTER_HOST:$REPO_ROUTER_PORT
srun --overlap --nodes=1 --ntasks=1 --nodelist="$ROUTER_HOST" \
    --output="$LOG_DIR/router.log" "${CONTAINER_ARGS[@]}" \
    "$PYTHON" -m sglang_router.launch_router --host "$ROUTER_HOST" --port "$REPO_ROUTER_PORT" \
    --api-key "$REPO_SGLANG_API_KEY" --policy round_robin --worker-urls "${WORKER_URLS[@]}" &
STEP_PIDS+=($!)
wait_healthy "$ROUTER_URL/health"

# torch.distributed: ranks from SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID (set by srun for
# each task), rendezvous on the first trainer node. --overlap: the router (and, colocated, the
# servers) run on these nodes too.
export MASTER_ADDR=$ROUTER_HOST
export MASTER_PORT=${MASTER_PORT:-29500}
# Megatron overlaps TP / sequence-parallel communication with compute only with one queue.
export CUDA_DEVICE_MAX_CONNECTIONS=1
srun --overlap --nodes="$TRAIN_NODES" --ntasks="$((TRAIN_NODES * GPUS_PER_NODE))" \
    --ntasks-per-node="$GPUS_PER_NODE" --nodelist="$(join_by , "${TRAIN_HOSTS[@]}")" \
    --gpus-per-node="$GPUS_PER_NODE" --kill-on-bad-exit=1 "${CONTAINER_ARGS[@]}" \
    "$PYTHON" -m repo_megatron.cli train "$CONFIG" "${OVERRIDES[@]}" rollout.engine=sglang \
    "rollout.sglang.router_url=$ROUTER_URL"
