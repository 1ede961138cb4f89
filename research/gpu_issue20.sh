#!/usr/bin/env bash
# Issue 20's GPU part in one call of the device tool (a lent GPU's time is short), most
# important first: machine facts, the CUDA tests (the N-model step's among them), the cnn
# recipe's epoch, cnn with 16 models in one run, fast's time to 99% over 10 seeds,
# tuomaso/train_mnist_fast's code beside it, the N-model convolution rules on CUDA, the
# data-parallel step under NCCL as a CUDA graph, and torchrun with one process.
# Usage, from the repository root on a CUDA machine: bash research/gpu_issue20.sh MNIST_DIR OUT_DIR
# MNIST_DIR holds all four MNIST files; everything lands in OUT_DIR, packed into $ARCHIVE
# (if set) after each step. No step stops the others; each has a time limit, and none
# starts past the whole script's BUDGET seconds.
set -u
mnist=$1 out=$2
budget=${BUDGET:-540}
mkdir -p "$out"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 TORCHINDUCTOR_CACHE_DIR=/tmp/inductor-cache TINYMNIST_TEST_MNIST=$mnist
py=python3
tm="$py -m tinymnist"
cuda="--device cuda --data-dir $mnist --no-download"
step() {  # step NAME SECONDS COMMAND...: run one check under a time limit, log it to $out/NAME.txt
    local name=$1 limit=$2; shift 2
    local left=$((budget - SECONDS))
    if [ "$left" -lt 20 ]; then echo "=== $name: skipped, the budget is spent"; return; fi
    [ "$limit" -gt "$left" ] && limit=$left
    echo "=== $name ($(date +%T), limit $limit s)"
    timeout "$limit" "$@" > "$out/$name.txt" 2>&1
    echo "exit $? after $SECONDS s"; tail -n 6 "$out/$name.txt"
    [ -n "${ARCHIVE:-}" ] && tar czf "$ARCHIVE" -C "$(dirname "$out")" "$(basename "$out")"
}
step machine 20 bash -c "nvidia-smi -L; $tm info; git log -1 --format=%H 2>/dev/null"
step tests 100 $py -m pytest -q -p no:cacheprovider tests/transforms/test_cuda_graph.py \
    tests/transforms/test_wide_conv.py tests/tool/test_cli.py tests/tool/test_checkpoint.py -k "cuda or graph"
step cnn-epochs 45 $tm train --model cnn --epochs 3 $cuda --log-interval 100000 --metrics "$out/cnn-epochs.jsonl"
step cnn-16-models 60 $tm train --model cnn --seeds 16 --epochs 1 $cuda --log-interval 100000 --metrics "$out/cnn-16.jsonl"
step fast-time-to-99 60 $py research/time_to_99.py --model fast --seeds 1-10 --target 0.99 --data-dir "$mnist" --device cuda
step tuomaso 40 $py research/tuomaso_reference.py --data-dir "$mnist" --device cuda --runs 10
step wide-conv-rules 120 $py research/wide_conv.py --device cuda --models cnn,fast --counts 16 --rounds 3 \
    --window-images 16384 --rules vmap-gradient,one-by-one-graph,loop,unfold --json "$out/wide-conv-rules.json"
step nccl-graph 60 $py research/nccl_graph.py --model lenet --batch 64 --steps 300
step torchrun-1 50 $py -m torch.distributed.run --standalone --nproc-per-node 1 -m tinymnist train --model cnn \
    --epochs 1 $cuda --log-interval 100000
echo "done after $SECONDS s"
