#!/usr/bin/env bash

#SBATCH -J wsi-lymph
#SBATCH -p gpu
#SBATCH -n 1
#SBATCH --cpus-per-task=8
#SBATCH --mem=30G
#SBATCH -t 04:00:00
#SBATCH --gres=gpu:1
export MALLOC_ARENA_MAX=1
module load cuda/12.4
source $HOME/wsi-lymph/.venv/bin/activate
export OMP_NUM_THREADS=${SLURM_CPUS_PER_TASK:-8}
PYTHON -m distributed.cli.dask_worker tls://SCHEDULER:PORT --name dummy-name --nthreads 8 --memory-limit 29.80GiB --nanny --death-timeout 120 --local-directory ${TMPDIR:-/tmp} --resources GPU=1 --lifetime 225m --lifetime-stagger 5m --protocol tls:// --tls-ca-file PRIVATE_TLS_DIR/ca_file --tls-cert PRIVATE_TLS_DIR/cert --tls-key PRIVATE_TLS_DIR/key
