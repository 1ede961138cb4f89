"""The compiled step's images/s, before (abd566a) and after the one-loop restructure, pooled
over every round whose numbers are valid on both sides: a run of the 'after' side before
commit 615f940 left later models on the thread count the first model's adaptive step chose,
so only its first model counts. python research/one_loop_pooled.py"""

import json
import statistics
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent / "results" / "one-loop-bench"
VALID = {
    "first": (2, ["mlp"]),
    "more": (3, ["mlp"]),
    "cnn": (4, ["cnn"]),
    "final": (3, ["mlp", "mlp3", "cnn", "lenet", "fast"]),
}
rates = {}
for folder, (rounds, models) in VALID.items():
    for side in ("before", "after"):
        for r in range(1, rounds + 1):
            for row in json.loads((HERE / folder / f"{side}-{r}.json").read_text())["results"]:
                if row["model"] in models:
                    rates.setdefault((row["model"], side), []).append(row["compiled"]["images_per_second"])
print("| model | rounds | before img/s (range) | after img/s (range) | after/before |")
print("|---|---|---|---|---|")
for model in ("mlp", "mlp3", "cnn", "lenet", "fast"):
    b, a = rates[(model, "before")], rates[(model, "after")]
    mb, ma = statistics.median(b), statistics.median(a)
    span = lambda xs: f"{min(xs):,.0f}-{max(xs):,.0f}"  # noqa: E731
    print(f"| `{model}` | {len(b)} | {mb:,.0f} ({span(b)}) | {ma:,.0f} ({span(a)}) | {ma / mb:.2f}x |")
