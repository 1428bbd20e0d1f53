# Shared launch logic of the recipes in examples/ (sourced, not run). docs/launching.md explains
# every launcher; this turns a few environment variables into one of those command lines.
#
#   LAUNCHER       deepspeed (default) | torchrun | mpirun
#   NUM_NODES      nodes in the job (default 1)
#   GPUS_PER_NODE  processes per node (default 8)
#   HOSTFILE       deepspeed/mpirun multi-node: "host slots=N" lines (default examples/hostfile)
#   MASTER_ADDR    address of node 0 (required for more than one node)
#   MASTER_PORT    rendezvous port on node 0 (default 29500)
#   NODE_RANK      torchrun, and deepspeed with NO_SSH=1: this node's index, 0..NUM_NODES-1
#   NO_SSH=1       deepspeed: start the runner on every node by hand (no pdsh/ssh)
#   DRY_RUN=1      print the command, one argument per line, and exit (nothing is started)
#   GLM_SCRIPT     the entry point (default pretrain_glm.py; the finetuning recipes set
#                  finetune_glm.py)
#
# Usage in a recipe:  glm_launch "${ARGS[@]}" "$@"   (extra recipe arguments go to the trainer)

EXAMPLES_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_DIR=$(dirname "$EXAMPLES_DIR")

glm_launch() {
    local launcher=${LAUNCHER:-deepspeed}
    local num_nodes=${NUM_NODES:-1}
    local gpus_per_node=${GPUS_PER_NODE:-8}
    local hostfile=${HOSTFILE:-$EXAMPLES_DIR/hostfile}
    local master_port=${MASTER_PORT:-29500}
    local script=$REPO_DIR/${GLM_SCRIPT:-pretrain_glm.py}
    local -a cmd
    if ((num_nodes > 1)) && [[ -z ${MASTER_ADDR:-} ]]; then
        echo "glm_launch: NUM_NODES=$num_nodes needs MASTER_ADDR (the address of node 0)" >&2
        return 2
    fi
    case $launcher in
    deepspeed)
        if ((num_nodes == 1)); then
            cmd=(deepspeed --num_gpus "$gpus_per_node" --master_port "$master_port")
        elif [[ ${NO_SSH:-0} == 1 ]]; then
            : "${NODE_RANK:?NO_SSH=1 needs NODE_RANK (the index of this node in the hostfile)}"
            cmd=(deepspeed --hostfile "$hostfile" --num_nodes "$num_nodes" --no_ssh
                --node_rank "$NODE_RANK" --master_addr "$MASTER_ADDR" --master_port "$master_port")
        else
            cmd=(deepspeed --hostfile "$hostfile" --num_nodes "$num_nodes"
                --master_addr "$MASTER_ADDR" --master_port "$master_port")
        fi
        ;;
    torchrun)
        if ((num_nodes == 1)); then
            cmd=(torchrun --nproc-per-node "$gpus_per_node" --master-port "$master_port")
        else
            : "${NODE_RANK:?torchrun on several nodes needs NODE_RANK (0 on the MASTER_ADDR node)}"
            cmd=(torchrun --nnodes "$num_nodes" --nproc-per-node "$gpus_per_node"
                --node-rank "$NODE_RANK" --master-addr "$MASTER_ADDR" --master-port "$master_port")
        fi
        ;;
    mpirun)
        cmd=(mpirun -np $((num_nodes * gpus_per_node)) -x PATH -x "MASTER_PORT=$master_port")
        if ((num_nodes > 1)); then
            cmd+=(--hostfile "$hostfile" -x "MASTER_ADDR=$MASTER_ADDR")
        fi
        cmd+=(python)
        ;;
    *)
        echo "glm_launch: LAUNCHER must be deepspeed, torchrun or mpirun, got '$launcher'" >&2
        return 2
        ;;
    esac
    cmd+=("$script" "$@")
    if [[ ${DRY_RUN:-0} == 1 ]]; then
        printf '%s\n' "${cmd[@]}"
        return 0
    fi
    echo "+ ${cmd[*]}" >&2
    "${cmd[@]}"
}
