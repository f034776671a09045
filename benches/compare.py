#!/usr/bin/env python3
"""Side-by-side benchmark: this build of ringtrain, an older build, and the peers.

Every configuration is launched REPEATS times, the contenders one after the other in
each round (old ringtrain, new ringtrain, peer), and the table reports medians and the
ratios of medians. Nothing here is a test: it prints numbers, it never fails on them.

    python3 benches/compare.py --new target/release/ringtrain \
        --old /work/old/target/release/ringtrain --peers ../shared/bench \
        --venv /tmp/anchors-venv --repeats 3

The all-reduce figure is busbw (GB/s, NCCL-tests convention); training is samples/s
with start-up excluded (`ringtrain bench train`, PyTorch's own timer).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile


def run_json(cmd, env=None, cwd=None):
    """Runs cmd, returns the last JSON object it printed on stdout."""
    out = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=900)
    if out.returncode != 0:
        sys.stderr.write(f"FAILED {' '.join(cmd)}\n{out.stderr[-2000:]}\n")
        return None
    for line in reversed(out.stdout.strip().splitlines()):
        line = line.strip()
        if line.startswith("{") or line.startswith("["):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                continue
    sys.stderr.write(f"no JSON from {' '.join(cmd)}:\n{out.stdout[-2000:]}\n")
    return None


def ringtrain_allreduce(exe, n, mib):
    v = run_json([exe, "bench", "allreduce", "--workers", str(n), "--bytes", f"{mib}MiB",
                  "--iters", "20", "--json"])
    if v is None:
        return None
    rows = v if isinstance(v, list) else v.get("results", [v])
    return rows[0]["busbw_gbps"] if rows and "busbw_gbps" in rows[0] else None


def gloo_allreduce(peers, venv, n, mib, tmp):
    out = os.path.join(tmp, f"gloo-{n}-{mib}.jsonl")
    if os.path.exists(out):
        os.remove(out)
    env = dict(os.environ, GLOO_SOCKET_IFNAME="lo")
    cmd = [f"{venv}/bin/python", f"{peers}/allreduce_gloo.py", "--nprocs", str(n),
           "--sizes-mib", str(mib), "--iters", "20", "--warmup", "5",
           "--port", str(29600 + n), "--json", out]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    if r.returncode != 0 or not os.path.exists(out):
        sys.stderr.write(f"gloo failed: {r.stderr[-1500:]}\n")
        return None
    rows = [json.loads(l) for l in open(out) if l.strip()]
    return rows[-1].get("busbw_GBps")


def ringtrain_train(exe, job, workers, steps, threads):
    env = dict(os.environ, RAYON_NUM_THREADS=str(threads))
    v = run_json([exe, "bench", "train", "--workers", str(workers), "--steps", str(steps),
                  job, "--json"], env=env)
    return None if v is None else v.get("samples_per_sec")


def torch_train(peers, venv, model, mode, threads, tmp, extra):
    out = os.path.join(tmp, f"torch-{model}-{mode}-{threads}.jsonl")
    if os.path.exists(out):
        os.remove(out)
    cmd = [f"{venv}/bin/python", f"{peers}/train_mlp.py", "--model", model, "--mode", mode,
           "--threads", str(threads), "--epochs", "2", "--json", out] + extra
    env = dict(os.environ, GLOO_SOCKET_IFNAME="lo")
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    if r.returncode != 0 or not os.path.exists(out):
        sys.stderr.write(f"torch failed: {r.stderr[-1500:]}\n")
        return None
    rows = [json.loads(l) for l in open(out) if l.strip()]
    return rows[-1].get("sps_med")


def med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def fmt(x, digits=2):
    if x is None:
        return "—"
    return f"{x:,.{digits}f}" if x < 1000 else f"{x:,.0f}"


def ratio(a, b):
    return "—" if a is None or b is None or b == 0 else f"{a / b:.2f}×"


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--new", required=True)
    p.add_argument("--old", required=True)
    p.add_argument("--peers", required=True)
    p.add_argument("--venv", default="/tmp/anchors-venv")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--examples", default="examples")
    p.add_argument("--skip-train", action="store_true")
    a = p.parse_args()
    tmp = tempfile.mkdtemp(prefix="ringtrain-compare-")
    seed = os.path.abspath(f"{a.examples}/seed-mlp.toml")
    big = os.path.abspath(f"{a.examples}/big-mlp.toml")
    seed64 = os.path.join(tmp, "seed64.toml")
    with open(seed) as f, open(seed64, "w") as g:
        g.write(f.read().replace("batch_size = 32", "batch_size = 64", 1))
    big512 = os.path.join(tmp, "big512.toml")
    with open(big) as f, open(big512, "w") as g:
        g.write(f.read().replace("batch_size = 256", "batch_size = 512", 1))

    ar_rows = []
    for n in (2, 3):
        for mib in (16, 64):
            old, new, gloo = [], [], []
            for _ in range(a.repeats):
                old.append(ringtrain_allreduce(a.old, n, mib))
                new.append(ringtrain_allreduce(a.new, n, mib))
                gloo.append(gloo_allreduce(a.peers, a.venv, n, mib, tmp))
            ar_rows.append((n, mib, med(old), med(new), med(gloo), old, new, gloo))
            print(f"allreduce N={n} {mib} MiB: old {old} new {new} gloo {gloo}", file=sys.stderr)

    print("### All-reduce busbw (GB/s), medians of", a.repeats, "interleaved launches\n")
    print("| N | size | gloo | ringtrain c2c3173 | ringtrain now | old ÷ gloo | now ÷ gloo | now ÷ old |")
    print("|---|---|---|---|---|---|---|---|")
    for n, mib, o, w, g, *_ in ar_rows:
        print(f"| {n} | {mib} MiB | {fmt(g)} | {fmt(o)} | {fmt(w)} | {ratio(o, g)} | {ratio(w, g)} | {ratio(w, o)} |")

    if a.skip_train:
        return
    cases = [
        ("seed MLP, 1 process, 1 thread", (seed, 1, 4000, 1), ("small", "single", 1, [])),
        ("seed MLP, 2 processes × batch 32", (seed64, 2, 2000, 1),
         ("small", "ddp", 1, ["--nprocs", "2", "--port", "29651"])),
        ("big MLP, 1 process, 1 thread", (big, 1, 60, 1), ("big", "single", 1, ["--max-steps", "60"])),
        ("big MLP, 2 processes × batch 256", (big512, 2, 60, 1),
         ("big", "ddp", 1, ["--nprocs", "2", "--max-steps", "60", "--port", "29652"])),
    ]
    tr_rows = []
    for name, (job, workers, steps, th), (model, mode, tth, extra) in cases:
        old, new, pt = [], [], []
        for _ in range(a.repeats):
            old.append(ringtrain_train(a.old, job, workers, steps, th))
            new.append(ringtrain_train(a.new, job, workers, steps, th))
            pt.append(torch_train(a.peers, a.venv, model, mode, tth, tmp, extra))
        tr_rows.append((name, med(old), med(new), med(pt)))
        print(f"train {name}: old {old} new {new} torch {pt}", file=sys.stderr)
    print("\n### Training samples/s, medians of", a.repeats, "interleaved launches\n")
    print("| setting | PyTorch | ringtrain c2c3173 | ringtrain now | old ÷ PyTorch | now ÷ PyTorch | now ÷ old |")
    print("|---|---|---|---|---|---|---|")
    for name, o, w, t in tr_rows:
        print(f"| {name} | {fmt(t, 0)} | {fmt(o, 0)} | {fmt(w, 0)} | {ratio(o, t)} | {ratio(w, t)} | {ratio(w, o)} |")


if __name__ == "__main__":
    main()
