#!/usr/bin/env bash

#PBS -N wsi-lymph
#PBS -q gpu
#PBS -l select=1:ncpus=8:ngpus=1:mem=32GB
#PBS -l walltime=04:00:00
#PBS -j oe
export MALLOC_ARENA_MAX=1
module load cuda/12.4
source $HOME/wsi-lymph/.venv/bin/activate
export OMP_NUM_THREADS=${NCPUS:-8}
PYTHON -m distributed.cli.dask_worker tls://SCHEDULER:PORT --name dummy-name --nthreads 8 --memory-limit 29.80GiB --nanny --death-timeout 120 --local-directory ${TMPDIR:-/tmp} --resources GPU=1 --lifetime 225m --lifetime-stagger 5m --protocol tls:// --tls-ca-file PRIVATE_TLS_DIR/ca_file --tls-cert PRIVATE_TLS_DIR/cert --tls-key PRIVATE_TLS_DIR/key
