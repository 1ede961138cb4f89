"""How OpenMP threads should wait at a barrier: spin counts side by side in one run (issue 20).

One worker process per setting (libgomp reads its variables once, when torch loads it),
each compiled and warmed up on the step `train` runs; then windows taken in turn across
the workers, quiet and with one core kept busy by bench's busy process. Around each
window the driver reads /proc: the machine's busy CPU time less the worker's own (and the
busy process's) is what other programs took, in cores. Windows where others took under
0.1 core count as clean, and each setting's medians are over its clean windows only: the
machine this ran on was shared with other work. Each round starts only after 2 s in
which the machine was at least 95% idle (for up to MAX_MINUTES in all). Linux only.

    python research/wait_policy.py mlp 32768 20
    python research/wait_policy.py cnn 1024 12

What it found: no spin count keeps mlp both fast quiet and robust with a core taken; one
thread does the latter. So tinymnist adapts its thread count instead
(tinymnist/transforms/cpu_threads.py, BENCHMARKS.md "A busy core"); raw output in
results/bench/cpu-busy-core/wait-policy-{mlp,cnn}.txt. The workers time the step on
fixed threads (adaptive_threads=False): the OpenMP settings alone.
"""

import json
import os
import statistics
import subprocess
import sys
import time

CANDIDATES = {
    "old default (spin 300000)": {},
    "OMP_WAIT_POLICY=PASSIVE (spin 0)": {"OMP_WAIT_POLICY": "PASSIVE"},
    "GOMP_SPINCOUNT=1000": {"GOMP_SPINCOUNT": "1000"},
    "GOMP_SPINCOUNT=10000": {"GOMP_SPINCOUNT": "10000"},
    "OMP_NUM_THREADS=1": {"OMP_NUM_THREADS": "1"},
}
VARIABLES = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME", "OMP_NUM_THREADS")
CLEAN = 0.1  # cores taken by other programs during a window, at most
TICK = os.sysconf("SC_CLK_TCK")
MAX_MINUTES = 45


def wait_for_idle(give_up_at):
    """Until 2 s at least 95% idle, or give_up_at; returns whether it was idle."""
    while time.monotonic() < give_up_at:
        m0, t0 = machine_busy_seconds(), time.monotonic()
        time.sleep(2)
        if (machine_busy_seconds() - m0) / (time.monotonic() - t0) < 0.1:  # of 2 cores: 95% idle
            return True
    return False


def worker(model, window_images):
    import torch

    from tinymnist.algorithm.config import recipe_config
    from tinymnist.tool import bench

    device = torch.device("cpu")
    images, labels, _ = bench.bench_data("data", device)
    config = recipe_config(model)
    steps = bench.our_steps(config, images, labels, device, compile=True, adaptive_threads=False)
    bench.warm_up(steps, device, 3)
    window_steps = max(1, window_images // config.batch_size)
    print("ready", flush=True)
    for _ in sys.stdin:
        print(bench.window_rate(steps, config.batch_size, device, window_steps), flush=True)


def machine_busy_seconds():
    fields = [int(x) for x in open("/proc/stat").readline().split()[1:]]
    return (sum(fields[:8]) - fields[3] - fields[4]) / TICK  # all but idle and iowait (no guest double count)


def process_seconds(pid):
    """CPU time of a process and its threads (utime + stime)."""
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def driver(model, window_images, rounds):
    from tinymnist.tool.busy_core import busy_core

    base = {k: v for k, v in os.environ.items() if k not in VARIABLES}
    workers = {}
    for name, env in CANDIDATES.items():  # one at a time: compiles do not overlap
        w = subprocess.Popen(
            [sys.executable, __file__, "worker", model, str(window_images)],
            env=base | env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert w.stdout.readline() == "ready\n"
        workers[name] = w
    windows = {name: {"quiet": [], "busy": []} for name in workers}

    def window(name, side, busy=None):
        time.sleep(0.05)  # the previous worker's threads stop spinning
        w = workers[name]
        ours = [w.pid] + ([busy.pid] if busy else [])
        m0, p0, t0 = machine_busy_seconds(), sum(map(process_seconds, ours)), time.monotonic()
        w.stdin.write("go\n")
        w.stdin.flush()
        rate = float(w.stdout.readline())
        m1, p1, t1 = machine_busy_seconds(), sum(map(process_seconds, ours)), time.monotonic()
        others = max(0.0, ((m1 - m0) - (p1 - p0)) / (t1 - t0))
        windows[name][side].append({"images_per_second": rate, "other_cores": others})

    give_up_at = time.monotonic() + MAX_MINUTES * 60
    try:
        for r in range(rounds):
            if not wait_for_idle(give_up_at):
                print(f"gave up waiting for an idle machine after {r} rounds", file=sys.stderr)
                break
            order = list(workers) if r % 2 == 0 else list(reversed(workers))
            for name in order:
                window(name, "quiet")
            with busy_core() as busy:
                for name in order:
                    window(name, "busy", busy)
            print(f"round {r + 1} done", file=sys.stderr, flush=True)
    finally:
        for w in workers.values():
            w.kill()
            w.wait()

    def median(side):
        clean = [w["images_per_second"] for w in side if w["other_cores"] < CLEAN]
        return (statistics.median(clean) if clean else float("nan")), len(clean)

    rounds = len(windows["old default (spin 300000)"]["quiet"])
    print(f"{model}: {rounds} rounds of {window_images}-image windows; medians over windows where other")
    print(f"programs took under {CLEAN} core (clean windows / all)")
    print()
    print("| setting | quiet img/s | quiet vs old default | busy core img/s | busy/quiet |")
    print("|---|---|---|---|---|")
    old, _ = median(windows["old default (spin 300000)"]["quiet"])
    for name, sides in windows.items():
        (q, nq), (b, nb) = median(sides["quiet"]), median(sides["busy"])
        n = len(sides["quiet"])
        print(f"| {name} | {q:,.0f} ({nq}/{n}) | {q / old:.2f}x | {b:,.0f} ({nb}/{n}) | {b / q:.2f}x |")
    print()
    print(json.dumps(windows))


if __name__ == "__main__":
    if sys.argv[1] == "worker":
        worker(sys.argv[2], int(sys.argv[3]))
    else:
        driver(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
