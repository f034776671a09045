#!/usr/bin/env python3
"""What DP-SGD costs per step, beside Opacus on the same models.

For the big MLP (784-1024-1024-10, batch 256) and the seed MLP (100-64-64-10, batch 32),
each round runs, in a rotating order:
  - `ringtrain bench train` on the plain job,
  - `ringtrain bench train` on the same job with a [privacy] section (benches/jobs/; SGD
    at lr 0.1, sigma 1, C 1, as the Opacus script),
  - ../shared/bench/dp_opacus_modes.py (plain PyTorch, Opacus per-sample hooks, Opacus
    ghost clipping; SGD, synthetic data, Poisson sampling),
all with one compute thread. It prints every launch and a table of medians with the
ratios DP/plain (ours) and ours/Opacus-ghost. Nothing here is a test: it never fails on
the numbers.

    cargo build --release --bin ringtrain
    python3 benches/dp_cost.py --exe target/release/ringtrain \\
        --python /tmp/anchors-venv/bin/python --repeats 5

Our samples/s is the worker's timed steps (start-up excluded): samples actually in
the Poisson batches over the summed step time (compute, clipping, noise, all-reduce,
optimizer). Opacus's is its timed steps after two warm-up steps.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
JOBS = {
    "big": {
        "plain": os.path.join(HERE, "jobs", "big-mlp-plain.toml"),
        "dp": os.path.join(HERE, "jobs", "big-mlp-dp.toml"),
        "steps": 100,
    },
    "small": {
        "plain": os.path.join(HERE, "jobs", "seed-mlp-plain.toml"),
        "dp": os.path.join(HERE, "jobs", "seed-mlp-dp.toml"),
        "steps": 1500,
    },
}


def ours(exe, job, steps):
    env = dict(os.environ, RAYON_NUM_THREADS="1")
    out = subprocess.run(
        [exe, "bench", "train", "--workers", "1", "--steps", str(steps), "--json", job],
        env=env, capture_output=True, text=True, check=False,
    )
    if out.returncode != 0:
        sys.exit(f"bench train {job} failed: {out.stderr[-2000:]}")
    line = [l for l in out.stdout.splitlines() if l.startswith("{")][-1]
    return json.loads(line)["samples_per_sec"]


def opacus(python, script, model, steps):
    out = subprocess.run(
        [python, script, "--model", model, "--steps", str(steps), "--threads", "1"],
        capture_output=True, text=True, check=False,
    )
    if out.returncode != 0:
        sys.exit(f"{script} failed: {out.stderr[-2000:]}")
    res = {}
    for line in out.stdout.splitlines():
        if line.startswith("{"):
            d = json.loads(line)
            res[d["mode"]] = d["samples_per_sec"]
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--exe", default=os.path.join(ROOT, "target", "release", "ringtrain"))
    ap.add_argument("--python", default="/tmp/anchors-venv/bin/python")
    ap.add_argument("--opacus-script",
                    default=os.path.join(ROOT, "..", "shared", "bench", "dp_opacus_modes.py"))
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--models", default="big,small")
    ap.add_argument("--opacus-steps", type=int, default=8)
    a = ap.parse_args()
    results = {}
    for model in a.models.split(","):
        spec = JOBS[model]
        runs = {k: [] for k in ["plain", "dp", "torch", "hooks", "ghost"]}
        kinds = ["plain", "dp", "opacus"]
        for r in range(a.repeats):
            order = kinds[r % 3:] + kinds[:r % 3]
            for kind in order:
                if kind == "opacus":
                    o = opacus(a.python, a.opacus_script, model,
                               a.opacus_steps if model == "big" else 10 * a.opacus_steps)
                    runs["torch"].append(o["plain"])
                    runs["hooks"].append(o["hooks"])
                    runs["ghost"].append(o["ghost"])
                    print(json.dumps({"model": model, "round": r, "impl": "opacus", **o}), flush=True)
                else:
                    sps = ours(a.exe, spec[kind], spec["steps"])
                    runs[kind].append(sps)
                    print(json.dumps({"model": model, "round": r, "impl": "ringtrain",
                                      "mode": kind, "samples_per_sec": sps}), flush=True)
        med = {k: statistics.median(v) for k, v in runs.items()}
        results[model] = (med, runs)
    print()
    print("| model | ringtrain plain | ringtrain DP | DP step time / plain | PyTorch plain | Opacus hooks | Opacus ghost | ringtrain DP / Opacus ghost |")
    print("|---|---|---|---|---|---|---|---|")
    for model, (m, runs) in results.items():
        print(f"| {model} | {m['plain']:,.0f} | {m['dp']:,.0f} | {m['plain'] / m['dp']:.2f}x | "
              f"{m['torch']:,.0f} | {m['hooks']:,.0f} | {m['ghost']:,.0f} | {m['dp'] / m['ghost']:.2f}x |")
    print()
    for model, (m, runs) in results.items():
        for k, v in runs.items():
            print(f"{model} {k}: " + ", ".join(f"{x:,.0f}" for x in v))


if __name__ == "__main__":
    main()
