#!/usr/bin/env bash
# Every GPU check in one call of the device tool (a lent GPU's time is short): machine
# facts, the CUDA tests, each model's recipe trained on full MNIST, and
# `tinymnist bench --device cuda`; with VARIANTS=1, also the variants behind the GPU
# defaults (scripts/cuda_variants.py).
# Usage, from the repository root on a CUDA machine: bash scripts/gpu_session.sh MNIST_DIR OUT_DIR
# MNIST_DIR holds all four MNIST files (scripts/train_images_from_pickle.py makes such a
# folder where they cannot be downloaded); everything lands in OUT_DIR. No step stops the others.
set -u
mnist=$1 out=$2
mkdir -p "$out"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 TORCHINDUCTOR_CACHE_DIR=/tmp/inductor-cache TINYMNIST_TEST_MNIST=$mnist
py=python3
step() {  # step NAME SECONDS COMMAND...: run one check under a time limit, log it to $out/NAME.txt
    local name=$1 limit=$2; shift 2
    echo "=== $name ($(date +%T))"
    timeout "$limit" "$@" > "$out/$name.txt" 2>&1
    echo "exit $? after $SECONDS s"; tail -n 6 "$out/$name.txt"
}
step machine 60 bash -c "nvidia-smi; $py -m tinymnist info; $py -m pip list 2>/dev/null | grep -iE '^(torch|triton|typer|rich|numpy|pillow|hypothesis|pytest) '"
step tests 180 $py -m pytest -q -p no:cacheprovider -k "cuda or graph" tests
for model in cnn mlp mlp3 lenet; do
    step "train-$model" 90 $py -m tinymnist train --model "$model" --device cuda --data-dir "$mnist" --no-download --log-interval 200
done
step bench 200 $py -m tinymnist bench --device cuda --window-images 16384 --json "$out/cuda.json"
[ -n "${VARIANTS:-}" ] && step variants 240 $py scripts/cuda_variants.py --json "$out/cuda_variants.json"
