"""Summarise results/fast-recipe/*.jsonl (written by research/fast_recipe.py) as tables.

    python research/fast_recipe_summary.py [--target 0.99] > results/fast-recipe/summary.md

Per candidate and mode: final test accuracy over seeds (mean ± std, min, max) and the
training steps to the first evaluation at or above the target (`screen` runs evaluate at
epoch ends only). Then, from the latest `time` run: seconds per epoch, and the time to
the target as a multiple of fast's = (mean steps to it) x (step time as a multiple of
fast's). A step count does not depend on the machine's load; the step-time ratio is
taken window by window from alternating windows, so both saw the same load.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict
from pathlib import Path

RESULTS = Path(__file__).resolve().parent.parent / "results" / "fast-recipe"
TIMED_AS = {"fast-2ep": "fast"}  # the same step: only the schedule differs


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
        print(
            f"| {mode} | {name} | {len(runs)} | {epochs} | {statistics.mean(accs):.2f} ± {spread:.2f} | "
            f"{min(accs):.2f} | {max(accs):.2f} | {reached} |"
        )
    print_timing(timing, groups, target)


def print_timing(timing: dict, groups: dict, target: float) -> None:
    """Seconds per epoch, and each candidate's time to the target as a multiple of fast's.

    The ratio of two step times is taken window by window (the windows alternate, so
    neighbours saw the same load) and its median kept: the load on a shared CPU moves
    the absolute numbers several-fold, the ratio much less.
    """
    fast_windows = timing["fast"]["wall_s_per_step"]
    print(
        "\n| candidate | steps/epoch | s/epoch, best window | s/epoch, median | CPU s/epoch, best "
        f"| step time / fast's | mean steps to {target:.2%} | time to {target:.2%} / fast's |"
    )
    print("|---|---|---|---|---|---|---|---|")
    fast_steps = mean_steps_to(groups[("confirm", "fast")], target)
    for name in ("fast", "fast-2ep", "cnn"):
        t = timing[TIMED_AS.get(name, name)]
        ratio = statistics.median(w / f for w, f in zip(t["wall_s_per_step"], fast_windows, strict=True))
        steps = mean_steps_to(groups.get(("confirm", name), []), target)
        print(
            f"| {name} | {t['steps_per_epoch']} | {t['best_wall_s_per_epoch']:.2f} | "
            f"{t['median_wall_s_per_epoch']:.2f} | {t['best_cpu_s_per_epoch']:.2f} | {ratio:.2f} | "
            f"{steps:.0f} | {steps * ratio / fast_steps:.1f} |"
        )


def mean_steps_to(runs: list[dict], target: float) -> float:
    reached = [steps_to(r, target) for r in runs]
    return statistics.mean(s for s in reached if s is not None) if reached else float("nan")


if __name__ == "__main__":
    main()
