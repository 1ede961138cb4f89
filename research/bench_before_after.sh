#!/usr/bin/env bash
# `tinymnist bench` of an earlier commit against this checkout, in alternating rounds on
# the same machine and data, so a busy machine slows both alike.
#   bash research/bench_before_after.sh BEFORE_COMMIT OUT_DIR [DATA_DIR] [ROUNDS] [-- bench options]
# Writes OUT_DIR/{before,after}-ROUND.{json,txt} and a summary of the compiled step's
# images/s (median over rounds) in OUT_DIR/summary.txt.
set -euo pipefail
before_commit=$1 out=$2 data=${3:-data} rounds=${4:-2}
shift $(($# < 4 ? $# : 4))
[[ ${1:-} == -- ]] && shift
here=$(git rev-parse --show-toplevel)
worktree=$(mktemp -d)
trap 'git -C "$here" worktree remove --force "$worktree"' EXIT
git -C "$here" worktree add --detach --force -q "$worktree" "$before_commit"
mkdir -p "$out"
{
  echo "before: $(git -C "$worktree" rev-parse --short HEAD)  after: $(git -C "$here" rev-parse --short HEAD) (+ uncommitted: $(git -C "$here" status --porcelain | wc -l) files)"
  echo "data: $data  rounds: $rounds  options: $*  $(date -u +%FT%TZ)"
} > "$out/summary.txt"
for round in $(seq 1 "$rounds"); do
  for side in before after; do
    root=$([[ $side == before ]] && echo "$worktree" || echo "$here")
    (cd "$root" && PYTHONPATH="$root" python -m tinymnist bench --device cpu --data-dir "$data" \
      --json "$out/$side-$round.json" "$@") > "$out/$side-$round.txt" 2>&1
    echo "round $round $side done"
  done
done
python - "$out" "$rounds" >> "$out/summary.txt" <<'EOF'
import json, statistics, sys
out, rounds = sys.argv[1], int(sys.argv[2])
runs = {side: [json.load(open(f"{out}/{side}-{r}.json"))["results"] for r in range(1, rounds + 1)]
        for side in ("before", "after")}
print(f"{'model':6} {'loop':9} {'before img/s':>13} {'after img/s':>12} {'after/before':>13}")
for i, row in enumerate(runs["before"][0]):
    for loop in ("reference", "eager", "compiled"):
        b = statistics.median(run[i][loop]["images_per_second"] for run in runs["before"])
        a = statistics.median(run[i][loop]["images_per_second"] for run in runs["after"])
        print(f"{row['model']:6} {loop:9} {b:13,.0f} {a:12,.0f} {a / b:12.2f}x")
EOF
cat "$out/summary.txt"
