#!/usr/bin/env python3
"""Ceiling of a two-way exchange on one host: the traffic pattern of a ring all-reduce
at N = 2, where every rank sends and receives at the same time.

  python3 benches/bidi_loopback.py --transport tcp|unix [--mib 2048] [--runs 3]

Two processes connect (127.0.0.1 TCP with TCP_NODELAY, or a Unix stream socket with
4 MiB buffers); each sends MIB MiB in 4 MiB writes from a sender thread while its main
thread receives the other's MIB MiB into one reused 4 MiB buffer. Prints GB/s (1e9)
each way: the slower of the two directions of a run, then the median over runs. No
reduction is done, and the 4 MiB buffers stay in cache, so this bounds any all-reduce
from above.
"""
import argparse
import multiprocessing as mp
import os
import socket
import statistics
import tempfile
import threading
import time

CHUNK = 4 << 20


def side(rank, transport, addr_q, total, out_q):
    if transport == "tcp":
        if rank == 0:
            srv = socket.socket()
            srv.bind(("127.0.0.1", 0))
            srv.listen(1)
            addr_q.put(srv.getsockname()[1])
            conn, _ = srv.accept()
        else:
            conn = socket.create_connection(("127.0.0.1", addr_q.get()))
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    else:
        if rank == 0:
            path = os.path.join(tempfile.mkdtemp(), "s")
            srv = socket.socket(socket.AF_UNIX)
            srv.bind(path)
            srv.listen(1)
            addr_q.put(path)
            conn, _ = srv.accept()
        else:
            conn = socket.socket(socket.AF_UNIX)
            conn.connect(addr_q.get())
        for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
            conn.setsockopt(socket.SOL_SOCKET, opt, CHUNK)
    conn.sendall(b"x")
    conn.recv(1)
    src = bytes(CHUNK)
    sink = memoryview(bytearray(CHUNK))
    start = time.perf_counter()

    def send():
        sent = 0
        while sent < total:
            conn.sendall(src)
            sent += CHUNK

    sender = threading.Thread(target=send)
    sender.start()
    got = 0
    while got < total:
        n = conn.recv_into(sink, CHUNK)
        if n == 0:
            break
        got += n
    sender.join()
    out_q.put(total / (time.perf_counter() - start) / 1e9)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--transport", choices=["tcp", "unix"], default="tcp")
    ap.add_argument("--mib", type=int, default=2048)
    ap.add_argument("--runs", type=int, default=3)
    a = ap.parse_args()
    rates = []
    for _ in range(a.runs):
        addr_q, out_q = mp.Queue(), mp.Queue()
        procs = [mp.Process(target=side, args=(r, a.transport, addr_q, a.mib << 20, out_q)) for r in (0, 1)]
        for p in procs:
            p.start()
        rates.append(min(out_q.get(), out_q.get()))
        for p in procs:
            p.join()
    print(f"{a.transport} two-way exchange, {a.mib} MiB each way: "
          f"{' '.join(f'{r:.2f}' for r in rates)} GB/s each way, median {statistics.median(rates):.2f}")


if __name__ == "__main__":
    main()
