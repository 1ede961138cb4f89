#!/usr/bin/env bash
# Every GPU check in one call of the device tool (a lent GPU's time is short), most
# important first: machine facts, the CUDA tests, the fast recipe over 10 seeds (accuracy
# after its 2 epochs, and time to 99%), the cnn recipe's epoch, bench --time-to-accuracy,
# and the cnn recipe over 8 seeds in one vmapped run.
# Usage, from the repository root on a CUDA machine: bash research/gpu_session.sh MNIST_DIR OUT_DIR
# MNIST_DIR holds all four MNIST files (`tinymnist download --from` makes such a folder
# where they cannot be downloaded); everything lands in OUT_DIR. No step stops the others.
set -u
mnist=$1 out=$2
mkdir -p "$out"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 TORCHINDUCTOR_CACHE_DIR=/tmp/inductor-cache TINYMNIST_TEST_MNIST=$mnist
py=python3
tm="$py -m tinymnist"
cuda="--device cuda --data-dir $mnist --no-download"
step() {  # step NAME SECONDS COMMAND...: run one check under a time limit, log it to $out/NAME.txt
    local name=$1 limit=$2; shift 2
    echo "=== $name ($(date +%T))"
    timeout "$limit" "$@" > "$out/$name.txt" 2>&1
    echo "exit $? after $SECONDS s"; tail -n 4 "$out/$name.txt"
    # The device tool brings back only a few files: with ARCHIVE set, pack them all after each step.
    [ -n "${ARCHIVE:-}" ] && tar czf "$ARCHIVE" -C "$(dirname "$out")" "$(basename "$out")"
}
step machine 30 bash -c "nvidia-smi -L; $tm info; git log -1 --format=%H 2>/dev/null"
step tests 80 $py -m pytest -q -x -p no:cacheprovider tests/transforms/test_cuda_graph.py tests/tool/test_cli.py -k "cuda or graph"
step fast-seeds 60 $tm train --model fast --seeds 10 $cuda --log-interval 100000 --metrics "$out/fast-seeds.jsonl"
step fast-time-to-99 70 $py research/time_to_99.py --model fast --seeds 1-10 --target 0.99 --data-dir "$mnist" --device cuda
step cnn-epochs 60 $tm train --model cnn --epochs 3 $cuda --log-interval 100000 --metrics "$out/cnn-epochs.jsonl"
step bench-time-to-99 80 $tm bench --time-to-accuracy 0.99 $cuda --json "$out/time-to-99.json"
step cnn-seeds 90 $tm train --model cnn --seeds 8 $cuda --log-interval 100000 --metrics "$out/cnn-seeds.jsonl"
