#!/usr/bin/env bash
# Issue 12 on a CUDA machine, in one short call: an N-model cnn run (vmap + compile + one
# CUDA graph replay per step), then `bench --seeds` for cnn (N = 1, 16 against single runs).
# Usage, from the repository root: bash research/ensemble_gpu.sh MNIST_DIR OUT_DIR
set -u
mnist=$1 out=$2
mkdir -p "$out"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 TORCHINDUCTOR_CACHE_DIR=/tmp/inductor-cache
py=python3
nvidia-smi -L | tee "$out/machine.txt"
timeout 150 $py -m tinymnist train --model cnn --seeds 4 --epochs 1 --device cuda --data-dir "$mnist" --no-download \
    --log-interval 400 > "$out/train-cnn-seeds4.txt" 2>&1; echo "train exit $?"; tail -n 4 "$out/train-cnn-seeds4.txt"
timeout 240 $py -m tinymnist bench --models cnn --seeds 1,16 --device cuda --window-images 16384 --repeats 3 \
    --json "$out/cuda-ensemble.json" > "$out/bench-cnn-seeds.txt" 2>&1; echo "bench exit $?"; tail -n 8 "$out/bench-cnn-seeds.txt"
