#!/usr/bin/env python3
"""What the layer costs a client that keeps up: `sse_server` against
`sse_server --passthrough`, same clients, same rate, alternating runs.

    cargo build --release --example sse_server --features axum,metrics
    python3 benches/ratio.py --clients 4 --rate 20000 --size 512 --seconds 8 --pairs 5

Each run starts the server on a free loopback port, connects `--clients`
`curl -N` readers to `/events`, waits `--warmup` seconds, then measures for
`--seconds` (`--server-arg` passes more arguments to both runs, e.g.
`--server-arg=--flush --server-arg=immediate`; without it, the
library's default flush, `coalesce`; `--layer-arg` passes arguments to
the layer's run only, e.g. `--layer-arg=--hub` for the hub behind the
layer against the plain `--passthrough`):

- with `--stalled N`, N more clients that send their request and never
  read (a 4 KiB receive buffer), held open for the whole run;
- the server's CPU seconds (user + system, /proc/PID/stat);
- the events delivered, from the bytes the readers downloaded in the
  window divided by the bytes of one event.

It prints one line per run, then per pair the ratio layer / passthrough of
CPU per delivered event, and their median. (This VM has no hardware
counters for `perf stat`; `cargo bench --bench callgrind paced` counts the
layer's instructions instead.) With --json the last line is one JSON object with every run.
Everything listens on 127.0.0.1 and every process is killed at the end.
"""

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

# Helpers shared with the fleet benchmark (this directory).
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from fleet import cpu_times, free_port  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.join(ROOT, "target", "release", "examples", "sse_server")


def wait_ready(port, timeout=15):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"sse_server did not listen on {port} within {timeout} s")


def syscalls_and_switches(pid):
    """Write syscalls (`syscw` of /proc/PID/io) and context switches
    (voluntary and not, summed over the process's threads)."""
    with open(f"/proc/{pid}/io") as f:
        syscw = next(int(l.split()[1]) for l in f if l.startswith("syscw:"))
    switches = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/status") as f:
                for line in f:
                    if line.startswith(("voluntary_ctxt_switches:", "nonvoluntary_ctxt_switches:")):
                        switches += int(line.split()[1])
        except FileNotFoundError:
            pass
    return syscw, switches


def event_bytes(size):
    # `id: N\ndata: <size bytes>\n\n`: ids are a few digits; the exact
    # figure is the same for both variants, so the ratio does not depend on
    # it.
    return size + len("id: 1000000\ndata: \n\n")


def stalled_client(port):
    """A client that sends its request and never reads: a 4 KiB receive
    buffer, so that the server's writes back up at once."""
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.connect(("127.0.0.1", port))
    s.sendall(b"GET /events HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    return s


def run(args, passthrough):
    port = free_port()
    cmd = [
        args.bin,
        "--addr",
        f"127.0.0.1:{port}",
        "--rate",
        str(args.rate),
        "--size",
        str(args.size),
    ]
    cmd += args.server_arg
    if passthrough:
        cmd.append("--passthrough")
    else:
        cmd += args.layer_arg
    server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    tmp = tempfile.mkdtemp()
    readers = []
    stalled = []
    try:
        wait_ready(port)
        stalled = [stalled_client(port) for _ in range(args.stalled)]
        for i in range(args.clients):
            out = os.path.join(tmp, f"c{i}")
            readers.append(
                (
                    out,
                    subprocess.Popen(
                        ["curl", "-sN", "-o", out, f"http://127.0.0.1:{port}/events"],
                        stdout=subprocess.DEVNULL,
                        stderr=subprocess.DEVNULL,
                    ),
                )
            )
        time.sleep(args.warmup)
        size0 = sum(os.path.getsize(o) for o, _ in readers if os.path.exists(o))
        user0, sys0 = cpu_times(server.pid)
        w0, cs0 = syscalls_and_switches(server.pid)
        time.sleep(args.seconds)
        user1, sys1 = cpu_times(server.pid)
        w1, cs1 = syscalls_and_switches(server.pid)
        size1 = sum(os.path.getsize(o) for o, _ in readers if os.path.exists(o))
        events = (size1 - size0) / event_bytes(args.size)
        cpu = (user1 + sys1) - (user0 + sys0)
        result = {
            "variant": "passthrough" if passthrough else "layer",
            "cpu_s": cpu,
            "events": events,
            "cpu_us_per_event": cpu / events * 1e6 if events else None,
            "user_us_per_event": (user1 - user0) / events * 1e6 if events else None,
            "writes_per_event": (w1 - w0) / events if events else None,
            "switches_per_event": (cs1 - cs0) / events if events else None,
        }
        return result
    finally:
        for s in stalled:
            s.close()
        for _, r in readers:
            r.kill()
            r.wait()
        server.kill()
        server.wait()
        shutil.rmtree(tmp, ignore_errors=True)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bin", default=BIN)
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--rate", type=int, default=20000)
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--warmup", type=float, default=2)
    p.add_argument("--seconds", type=float, default=8)
    p.add_argument("--pairs", type=int, default=5)
    p.add_argument(
        "--stalled",
        type=int,
        default=0,
        help="clients that never read, besides the --clients readers",
    )
    p.add_argument(
        "--layer-only",
        action="store_true",
        help="run only the layer (with --stalled: the per-stalled-client cost, "
        "compared across builds with --bin)",
    )
    p.add_argument(
        "--server-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="one more argument for sse_server, both runs (repeat for several; "
        "e.g. --server-arg=--flush --server-arg=immediate)",
    )
    p.add_argument(
        "--layer-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="one more argument for the layer's run only (repeat for several; "
        "e.g. --layer-arg=--hub: the hub behind the layer against the plain "
        "--passthrough)",
    )
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    if not (
        1 <= args.clients <= 64
        and 1 <= args.pairs <= 50
        and 0 < args.seconds <= 600
        and 0 <= args.stalled <= 4096
    ):
        sys.exit(
            "error: --clients in 1..=64, --pairs in 1..=50, --seconds in (0, 600], "
            "--stalled in 0..=4096"
        )
    runs = []
    keys = ["cpu_us_per_event", "user_us_per_event", "writes_per_event", "switches_per_event"]
    ratios = {k: [] for k in keys}
    for i in range(args.pairs):
        # Alternate which goes first, so that a drift of the machine does
        # not always favour one.
        order = [False, True] if i % 2 == 0 else [True, False]
        if args.layer_only:
            order = [False]
        pair = {}
        for passthrough in order:
            r = run(args, passthrough)
            runs.append(r)
            pair[r["variant"]] = r
            print(
                f"pair {i + 1} {r['variant']:<11} {r['events']:>9.0f} events"
                f"  {r['cpu_us_per_event']:.3f} us/event"
                f" ({r['user_us_per_event']:.3f} user)"
                f"  {r['writes_per_event']:.3f} writes/event"
                f"  {r['switches_per_event']:.3f} switches/event",
                flush=True,
            )
        for k in keys:
            if "passthrough" in pair and pair["passthrough"].get(k):
                ratios[k].append(pair["layer"][k] / pair["passthrough"][k])
    print()
    layer = [r["cpu_us_per_event"] for r in runs if r["variant"] == "layer"]
    print(f"layer CPU per delivered event: median {statistics.median(layer):.3f} us")
    summary = {}
    for k in keys:
        if ratios[k]:
            med = statistics.median(ratios[k])
            summary[k] = {"median": med, "pairs": ratios[k]}
            print(f"layer / passthrough, {k}: median {med:.3f}, pairs " + ", ".join(f"{x:.3f}" for x in ratios[k]))
    if args.json:
        print(json.dumps({"args": vars(args), "runs": runs, "ratios": summary}))


if __name__ == "__main__":
    main()
