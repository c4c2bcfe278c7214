#!/usr/bin/env bash
#SBATCH --job-name=simmim
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
# SimMIM pretraining over several machines, one `accelerate launch` per machine (examples/run_mim.py's flags follow).
#
#   sbatch examples/multi_node.sh --preset vit-base-patch16-224 --dataset_name DATA ...    # SLURM, from the repo root
#   MAIN_PROCESS_IP=ADDRESS_OF_MACHINE_0 MACHINE_RANK=0 bash examples/multi_node.sh ...   # by hand, on machine 0,
#   MAIN_PROCESS_IP=ADDRESS_OF_MACHINE_0 MACHINE_RANK=1 bash examples/multi_node.sh ...   # then on machine 1
#
# Optional: NUM_MACHINES (2), PROCESSES_PER_MACHINE (the GPUs nvidia-smi lists), MAIN_PROCESS_PORT (29500),
# MIXED_PRECISION (bf16), RENDEZVOUS_TIMEOUT (seconds to wait for every machine, 600). The learning rate follows the
# total batch (per-device batch x all processes x accumulation), so the recipe holds at any number of machines.
set -euo pipefail

if [[ -n "${SLURM_JOB_ID:-}" ]]; then
    # sbatch runs a copy of this file from its spool folder: the repository is where the job was submitted
    cd "$SLURM_SUBMIT_DIR"
    if [[ -z "${SIMMIM_NODE_STEP:-}" ]]; then
        # the batch script itself: start this file once per machine
        SIMMIM_NODE_STEP=1 exec srun --ntasks-per-node=1 --export=ALL bash examples/multi_node.sh "$@"
    fi
else
    cd "$(dirname "${BASH_SOURCE[0]}")/.."
fi
if [[ -n "${SLURM_JOB_ID:-}" ]]; then
    MACHINE_RANK=$SLURM_NODEID
    NUM_MACHINES=${SLURM_NNODES}
    MAIN_PROCESS_IP=${MAIN_PROCESS_IP:-$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)}
fi
: "${MAIN_PROCESS_IP:?set MAIN_PROCESS_IP to the address of machine 0 (the one with MACHINE_RANK=0)}"
: "${MACHINE_RANK:?set MACHINE_RANK to the rank of this machine: 0 on the machine at MAIN_PROCESS_IP, then 1, 2, ...}"
NUM_MACHINES=${NUM_MACHINES:-2}
if ! python -c 'import socket, sys; socket.getaddrinfo(sys.argv[1], None)' "$MAIN_PROCESS_IP" 2>/dev/null; then
    echo "multi_node.sh: MAIN_PROCESS_IP=$MAIN_PROCESS_IP does not resolve to an address; give machine 0's address." >&2
    exit 2
fi
if [[ -z "${PROCESSES_PER_MACHINE:-}" ]]; then
    PROCESSES_PER_MACHINE=$(nvidia-smi --list-gpus 2>/dev/null | wc -l)
    (( PROCESSES_PER_MACHINE > 0 )) || PROCESSES_PER_MACHINE=1
fi

exec python -m accelerate.commands.launch --config_file examples/accelerate_configs/multi_node.yaml \
    --num_machines "$NUM_MACHINES" --machine_rank "$MACHINE_RANK" \
    --num_processes $(( NUM_MACHINES * PROCESSES_PER_MACHINE )) \
    --main_process_ip "$MAIN_PROCESS_IP" --main_process_port "${MAIN_PROCESS_PORT:-29500}" \
    --mixed_precision "${MIXED_PRECISION:-bf16}" --rdzv_conf "timeout=${RENDEZVOUS_TIMEOUT:-600}" \
    examples/run_mim.py "$@"
