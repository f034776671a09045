"""A client of ringtrain's JobService that is not ours: Python grpcio stubs generated from
proto/proto/ringtrain.proto. It submits a job, watches it to the end and prints one JSON
object of measurements on stdout; tests/third_party_client.rs runs it and checks them.

Usage: watch_client.py --stubs DIR --coordinator HOST:PORT --job FILE.toml
  [--end-grace SECONDS]

--stubs is the directory that holds ringtrain_pb2.py and ringtrain_pb2_grpc.py (from
`python3 -m grpc_tools.protoc`). If the stream has not ended --end-grace seconds after
the terminal status arrived, the script cancels the call and reports "ended": false.
"""

import argparse
import json
import os
import sys
import threading
import time


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--stubs", required=True)
    ap.add_argument("--coordinator", required=True)
    ap.add_argument("--job", required=True)
    ap.add_argument("--end-grace", type=float, default=10.0)
    ap.add_argument("--timeout", type=float, default=600.0)
    args = ap.parse_args()

    sys.path.insert(0, args.stubs)
    import grpc
    import ringtrain_pb2 as pb
    import ringtrain_pb2_grpc as pb_grpc

    job = os.path.abspath(args.job)
    with open(job, encoding="utf-8") as f:
        spec = f.read()

    channel = grpc.insecure_channel(args.coordinator)
    stub = pb_grpc.JobServiceStub(channel)
    job_id = stub.Submit(
        pb.SubmitRequest(spec_toml=spec, base_dir=os.path.dirname(job), source=job),
        timeout=30,
    ).job_id

    # A deadline for the whole watch, so a stream that never ends fails the run rather
    # than hanging it; the grace timer below reports the same failure much sooner.
    call = stub.Watch(pb.JobRequest(job_id=job_id), timeout=args.timeout)
    started = time.monotonic()
    messages = 0
    payload_bytes = 0
    with_history = []  # history length of each message that carries one
    states = []  # distinct states in order
    last = None
    terminal_at = None
    timer = None
    ended = False
    error = None
    try:
        for msg in call:
            messages += 1
            payload_bytes += msg.ByteSize()
            if msg.history:
                with_history.append(len(msg.history))
            if not states or states[-1] != msg.state:
                states.append(msg.state)
            last = msg
            if terminal_at is None and msg.state in ("completed", "failed", "cancelled"):
                terminal_at = time.monotonic()
                timer = threading.Timer(args.end_grace, call.cancel)
                timer.start()
        ended = True
    except grpc.RpcError as e:
        error = f"{e.code()}: {e.details()}"
    finally:
        if timer is not None:
            timer.cancel()
    finished = time.monotonic()

    final = stub.Get(pb.JobRequest(job_id=job_id), timeout=30)
    out = {
        "job_id": job_id,
        "ended": ended,
        "error": error,
        "messages": messages,
        "bytes": payload_bytes,
        "watch_seconds": finished - started,
        "seconds_after_terminal": None if terminal_at is None else finished - terminal_at,
        "states": states,
        # How many messages carried a history, and the lengths of the first 50 of them
        # (a stream that repeats the history every step would make this list huge).
        "history_messages": len(with_history),
        "history_lengths": with_history[:50],
        "last_state": last.state if last else None,
        "last_epochs": last.epochs if last else None,
        "last_history_epochs": [h.epoch for h in last.history] if last else [],
        "last_step": last.step if last else None,
        "last_equals_get": last == final,
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
