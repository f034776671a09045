#!/usr/bin/env python3
"""What OpenTelemetry tracing costs the training loop.

`ringtrain bench train` (samples/s of the real training path, start-up excluded) is run
with tracing off, on with the default step sampling (every step of the first 20, then
1 in 100), and on for every step, exporting over OTLP/gRPC to a receiver that runs on
the same machine (tools/otlp_sink.rs, a stand-in for Jaeger's collector). The three
modes alternate within each round, in a rotating order; the table reports medians of
REPEATS launches and every launch, and the spans the receiver got. Nothing here is a
test: it prints numbers, it never fails on them.

    cargo build --release --bin ringtrain --example otlp_sink
    python3 benches/tracing_cost.py --exe target/release/ringtrain \\
        --sink target/release/examples/otlp_sink --repeats 5

A fresh receiver is started for each launch with tracing on, and stopped after it, so
its span count belongs to that launch.
"""

import argparse
import json
import os
import resource
import signal
import statistics
import subprocess
import sys

MODES = ["off", "sampled", "every"]


def start_sink(sink):
    p = subprocess.Popen([sink], stdout=subprocess.PIPE, text=True)
    line = p.stdout.readline().strip()
    if not line.startswith("listening on "):
        p.kill()
        sys.exit(f"otlp_sink did not start: {line!r}")
    return p, "http://" + line[len("listening on "):]


def stop_sink(p):
    p.send_signal(signal.SIGTERM)
    out, _ = p.communicate(timeout=30)
    for line in reversed(out.strip().splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    return None


def run(exe, sink, job, workers, steps, threads, mode):
    env = dict(os.environ, RAYON_NUM_THREADS=str(threads))
    for k in ["OTEL_EXPORTER_OTLP_ENDPOINT", "RINGTRAIN_TRACE_FIRST_STEPS",
              "RINGTRAIN_TRACE_EVERY_STEPS"]:
        env.pop(k, None)
    receiver = None
    if mode != "off":
        receiver, endpoint = start_sink(sink)
        env["OTEL_EXPORTER_OTLP_ENDPOINT"] = endpoint
    if mode == "every":
        env["RINGTRAIN_TRACE_EVERY_STEPS"] = "1"
    cmd = [exe, "bench", "train", "--workers", str(workers), "--steps", str(steps), job,
           "--json"]
    # CPU seconds of the ringtrain processes (coordinator and workers, which are waited
    # for inside this call; the receiver is waited for after it): far less sensitive to
    # other load on the machine than wall-clock throughput.
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    received = stop_sink(receiver) if receiver else None
    if out.returncode != 0:
        sys.stderr.write(f"FAILED ({mode}) {' '.join(cmd)}\n{out.stderr[-2000:]}\n")
        return None, received, None
    v = json.loads(out.stdout.strip().splitlines()[-1])
    return v["samples_per_sec"], received, cpu


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--exe", default="target/release/ringtrain")
    p.add_argument("--sink", default="target/release/examples/otlp_sink")
    p.add_argument("--job", default="examples/big-mlp.toml")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--threads", type=int, default=1,
                   help="RAYON_NUM_THREADS per worker (compute threads)")
    p.add_argument("--repeats", type=int, default=5)
    a = p.parse_args()

    results = {m: [] for m in MODES}
    spans = {m: [] for m in MODES}
    cpus = {m: [] for m in MODES}
    for r in range(a.repeats):
        order = MODES[r % 3:] + MODES[:r % 3]
        for mode in order:
            sps, received, cpu = run(a.exe, a.sink, a.job, a.workers, a.steps, a.threads,
                                     mode)
            if sps is not None:
                results[mode].append(sps)
                cpus[mode].append(cpu)
            spans[mode].append(received["spans"] if received else 0)
            print(f"round {r + 1} {mode:>7}: {sps if sps is None else round(sps)} samples/s, "
                  f"{received['spans'] if received else 0} spans, {cpu} CPU s", file=sys.stderr)

    base = statistics.median(results["off"]) if results["off"] else None
    print(f"\n{a.job}, {a.workers} workers, {a.steps} steps, RAYON_NUM_THREADS={a.threads}, "
          f"{a.repeats} rounds\n")
    print("| tracing | samples/s, median | vs off | CPU s per run, median | vs off | "
          "spans received per run | launches, samples/s |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    cpu_base = statistics.median(cpus["off"]) if cpus["off"] else None
    labels = {"off": "off", "sampled": "on, sampled (first 20, then 1 in 100)",
              "every": "on, every step"}
    summary = {}
    for m in MODES:
        xs = results[m]
        if not xs:
            print(f"| {labels[m]} | failed | | | | | |")
            continue
        med = statistics.median(xs)
        rel = f"{med / base:.3f}" if base else "n/a"
        cpu = statistics.median(cpus[m])
        cpu_rel = f"{cpu / cpu_base:.3f}" if cpu_base else "n/a"
        print(f"| {labels[m]} | {med:,.0f} | {rel} | {cpu:.2f} | {cpu_rel} | "
              f"{statistics.median(spans[m]):.0f} | {', '.join(f'{x:,.0f}' for x in xs)} |")
        summary[m] = {"median": med, "runs": xs, "cpu_seconds": cpus[m], "spans": spans[m]}
    print()
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
