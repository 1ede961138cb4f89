"""Summarise results/fast-recipe/*.jsonl (written by scripts/fast_recipe.py) as tables.

    python scripts/fast_recipe_summary.py [--target 0.99] > results/fast-recipe/summary.md

Per candidate and mode: final test accuracy over seeds (mean ± std, min, max), the
training steps to the first evaluation at or above the target, and the measured
seconds per epoch (from `time` mode: the fastest window, alternated with the others).
Seconds to the target = steps to it x seconds per step: a step's count does not depend
on the machine's load, and the timing of each step was measured in one process, in
alternating windows, so the load hits every candidate alike.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict
from pathlib import Path

RESULTS = Path(__file__).resolve().parent.parent / "results" / "fast-recipe"


def read(name: str) -> list[dict]:
    path = RESULTS / name
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def steps_to(run: dict, target: float) -> int | None:
    return next((e["step"] for e in run["evals"] if e["test_accuracy"] >= target), None)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--target", type=float, default=0.99)
    target = parser.parse_args().target
    timing = {t["name"]: t for t in read("time.jsonl")}  # the last timing of each candidate
    groups = defaultdict(list)
    for run in read("screen.jsonl") + read("confirm.jsonl"):
        groups[(run["mode"], run["name"])].append(run)
    print(f"| mode | candidate | seeds | epochs | mean ± std | min | max | steps to {target:.2%} (per seed) |")
    print("|---|---|---|---|---|---|---|---|")
    for (mode, name), runs in groups.items():
        reached = ", ".join(str(steps_to(r, target)) for r in runs)
        epochs = runs[0]["candidate"]["epochs"]
        accs = [100 * r["final_accuracy"] for r in runs if "final_accuracy" in r]  # not of runs stopped at the target
        if not accs:
            print(f"| {mode} | {name} | {len(runs)} | stopped at the target | | | | {reached} |")
            continue
        spread = statistics.stdev(accs) if len(accs) > 1 else 0.0
        print(f"| {mode} | {name} | {len(runs)} | {epochs} | {statistics.mean(accs):.2f} ± {spread:.2f} | "
              f"{min(accs):.2f} | {max(accs):.2f} | {reached} |")  # fmt: skip
    print("\n| candidate | steps/epoch | s/epoch (best window) | s/epoch (median) | CPU s/epoch | s to target, mean |")
    print("|---|---|---|---|---|---|")
    for name, t in timing.items():
        runs = groups.get(("confirm", name)) or groups.get(("screen", name), [])
        reached = [s for s in (steps_to(r, target) for r in runs) if s is not None]
        per_step = t["best_wall_s_per_epoch"] / t["steps_per_epoch"]
        to_target = f"{statistics.mean(reached) * per_step:.1f} ({len(reached)}/{len(runs)} seeds)" if reached else "-"
        print(f"| {name} | {t['steps_per_epoch']} | {t['best_wall_s_per_epoch']:.2f} | "
              f"{t['median_wall_s_per_epoch']:.2f} | {t['best_cpu_s_per_epoch']:.2f} | {to_target} |")  # fmt: skip


if __name__ == "__main__":
    main()
