#!/usr/bin/env python3
"""What a connection costs `sse_server`: memory per connection, CPU per
delivered event and delivery latency, for many clients that keep up (and
optionally many that never read), in each mode, side by side.

    cargo build --release --example sse_server --features axum,metrics
    python3 benches/conns.py --clients 5000 --rate 2 --size 64 --runs 3
    python3 benches/conns.py --clients 0 --stalled 2000 --rate 1000 --runs 3
    python3 benches/conns.py --clients 19000 --rate 1 --size 64 --runs 3 --mode hub

Each run starts `sse_server --rate R --size S` in one mode on a free
loopback port: `passthrough` (`--passthrough`: axum's `Sse` over a
broadcast channel, no layer), `layer` (the per-client path) or `hub`
(`--hub`). After `--warmup` seconds with no client it reads the server's
resident memory (VmRSS), then a client process of its own (this script,
`--client`) opens the connections, `--batch` at a time:

- `--clients N` that read every event (`GET /events`, HTTP/1.1);
- `--stalled M` that send their request and never read (4 KiB receive
  buffer).

Once every reading client has had an event and every stalled one has
been sent its response headers, the run waits `--settle` seconds and
measures for `--seconds`: the server's CPU seconds (user + system,
/proc/PID/stat), VmRSS at the end, and what the readers took. It prints
per run and mode:

- `rss/conn`: (VmRSS with the connections - VmRSS before) / connections,
  in KiB;
- `us/event`: server CPU per event delivered to a reader;
- `p50/p99/max`: delivery latency. Event `seq` is due at
  `start + (seq + 1) / rate` (the producer's schedule); `start` is taken
  as the earliest `arrival - (seq + 1) / rate` seen by any client, so
  the figures are relative to the quickest delivery (on loopback within
  about 0.1 ms of the true latency).

Runs alternate between the modes (`--runs` rounds), and the medians come
last. Everything listens on 127.0.0.1, and every process is killed at the
end; one client process holds at most 19,500 sockets (this machine's limit
is 20,000 open files per process).
"""

import argparse
import asyncio
import json
import os
import resource
import socket
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from fleet import cpu_seconds, free_port  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.join(ROOT, "target", "release", "examples", "sse_server")
MODES = {"passthrough": ["--passthrough"], "layer": [], "hub": ["--hub"]}


def raise_nofile():
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def rss_bytes(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


# ---------------------------------------------------------------- client


async def reader(port, rate, stats, ready, stop):
    """One client that keeps up: parses `id:` lines, records lateness."""
    r, w = await asyncio.open_connection("127.0.0.1", port)
    w.write(b"GET /events HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: text/event-stream\r\n\r\n")
    await w.drain()
    first = True
    buf = b""
    try:
        while not stop.is_set():
            chunk = await r.read(65536)
            if not chunk:
                stats["ended"] += 1
                return
            now = time.time()
            buf += chunk
            lines = buf.split(b"\n")
            buf = lines.pop()
            for line in lines:
                if line.startswith(b"id: "):
                    seq = int(line[4:])
                    stats["events"] += 1
                    stats["offsets"].append(now - (seq + 1) / rate)
                    if first:
                        first = False
                        ready.append(1)
    finally:
        w.close()


def stalled(port, socks):
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.setblocking(False)
    try:
        s.connect(("127.0.0.1", port))
    except BlockingIOError:
        pass
    socks.append(s)
    return s


async def client_main(opts):
    raise_nofile()
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    stats = {"events": 0, "ended": 0, "offsets": []}
    ready = []
    tasks = []
    socks = []
    # Stalled first, so that they are all in place before the readers.
    for k in range(0, opts.stalled, opts.batch):
        batch = []
        for _ in range(min(opts.batch, opts.stalled - k)):
            batch.append(stalled(opts.port, socks))
        for s in batch:
            await loop.sock_sendall(s, b"GET /events HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    for k in range(0, opts.clients, opts.batch):
        n = min(opts.batch, opts.clients - k)
        for _ in range(n):
            tasks.append(asyncio.create_task(reader(opts.port, opts.rate, stats, ready, stop)))
        deadline = time.time() + 30
        while len(ready) < k + n and time.time() < deadline:
            await asyncio.sleep(0.01)
    deadline = time.time() + 60
    while len(ready) < opts.clients and time.time() < deadline:
        await asyncio.sleep(0.05)
    print(json.dumps({"ready": len(ready)}), flush=True)
    # Measure on the driver's word: `mark` starts a window, `end` ends it.
    window = None
    reader_stream = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader_stream), sys.stdin)
    while True:
        line = (await reader_stream.readline()).decode().strip()
        if line == "mark":
            window = (stats["events"], len(stats["offsets"]))
            stats["offsets_start"] = len(stats["offsets"])
            print(json.dumps({"marked": True}), flush=True)
        elif line == "end" or not line:
            events0, off0 = window or (0, 0)
            all_offsets = stats["offsets"]
            base = min(all_offsets) if all_offsets else 0.0
            lat = sorted((o - base) * 1000 for o in all_offsets[off0:])

            def pct(p):
                return lat[min(len(lat) - 1, int(p * len(lat)))] if lat else None

            print(
                json.dumps(
                    {
                        "events": stats["events"] - events0,
                        "ended": stats["ended"],
                        "p50_ms": pct(0.50),
                        "p99_ms": pct(0.99),
                        "max_ms": lat[-1] if lat else None,
                    }
                ),
                flush=True,
            )
            stop.set()
            for t in tasks:
                t.cancel()
            for s in socks:
                s.close()
            return


# ---------------------------------------------------------------- driver


def wait_listening(proc, timeout=20):
    deadline = time.time() + timeout
    line = proc.stdout.readline().decode()
    if not line.startswith("listening on http://") or time.time() > deadline:
        raise RuntimeError(f"sse_server did not start: {line!r}")
    return int(line.strip().rsplit(":", 1)[1])


def run(opts, mode):
    cmd = [opts.bin, "--addr", "127.0.0.1:0", "--rate", str(opts.rate), "--size", str(opts.size)]
    cmd += MODES[mode] + opts.server_arg
    server = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, preexec_fn=raise_nofile)
    client = None
    try:
        port = wait_listening(server)
        time.sleep(opts.warmup)
        rss0 = rss_bytes(server.pid)
        client = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--client", "--port", str(port),
             "--clients", str(opts.clients), "--stalled", str(opts.stalled),
             "--rate", str(opts.rate), "--batch", str(opts.batch)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        )
        ready = json.loads(client.stdout.readline())["ready"]
        if ready < opts.clients:
            raise RuntimeError(f"{mode}: only {ready} of {opts.clients} readers had an event")
        time.sleep(opts.settle)
        client.stdin.write(b"mark\n")
        client.stdin.flush()
        json.loads(client.stdout.readline())
        cpu0 = cpu_seconds(server.pid)
        t0 = time.time()
        time.sleep(opts.seconds)
        cpu1 = cpu_seconds(server.pid)
        rss1 = rss_bytes(server.pid)
        client.stdin.write(b"end\n")
        client.stdin.flush()
        got = json.loads(client.stdout.readline())
        conns = opts.clients + opts.stalled
        events = got["events"]
        return {
            "mode": mode,
            "conns": conns,
            "rss0_mib": rss0 / 2**20,
            "rss_mib": rss1 / 2**20,
            "rss_kib_per_conn": (rss1 - rss0) / 1024 / conns if conns else None,
            "cpu_s": cpu1 - cpu0,
            "seconds": time.time() - t0,
            "events": events,
            "us_per_event": (cpu1 - cpu0) / events * 1e6 if events else None,
            "p50_ms": got["p50_ms"],
            "p99_ms": got["p99_ms"],
            "max_ms": got["max_ms"],
            "ended": got["ended"],
        }
    finally:
        if client is not None:
            client.kill()
            client.wait()
        server.kill()
        server.wait()


def fmt(x, f):
    return "-" if x is None else format(x, f)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bin", default=BIN)
    p.add_argument("--clients", type=int, default=5000)
    p.add_argument("--stalled", type=int, default=0)
    p.add_argument("--rate", type=int, default=2)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--mode", action="append", choices=sorted(MODES))
    p.add_argument("--warmup", type=float, default=1.0)
    p.add_argument("--settle", type=float, default=3.0)
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--batch", type=int, default=250)
    p.add_argument("--server-arg", action="append", default=[], metavar="ARG")
    p.add_argument("--json", action="store_true")
    # The client process.
    p.add_argument("--client", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, help=argparse.SUPPRESS)
    opts = p.parse_args()
    if opts.client:
        asyncio.run(client_main(opts))
        return
    if not (0 <= opts.clients + opts.stalled <= 19_500 and 1 <= opts.runs <= 20 and 0 < opts.seconds <= 600
            and 1 <= opts.rate <= 1_000_000 and 1 <= opts.batch <= 1000):
        sys.exit("error: --clients + --stalled in 0..=19500, --runs in 1..=20, --seconds in (0, 600], "
                 "--rate in 1..=1000000, --batch in 1..=1000")
    modes = opts.mode or ["passthrough", "layer", "hub"]
    runs = []
    for i in range(opts.runs):
        # Rotate which goes first, so that a drift of the machine does not
        # always favour one.
        order = modes[i % len(modes):] + modes[: i % len(modes)]
        for mode in order:
            r = run(opts, mode)
            runs.append(r)
            print(
                f"run {i + 1} {mode:<11} {r['conns']:>6} conns  rss {r['rss0_mib']:.1f} -> {r['rss_mib']:.1f} MiB"
                f"  {fmt(r['rss_kib_per_conn'], '.2f')} KiB/conn  {r['events']:>8} events"
                f"  {fmt(r['us_per_event'], '.2f')} us/event  p50 {fmt(r['p50_ms'], '.2f')}"
                f"  p99 {fmt(r['p99_ms'], '.2f')}  max {fmt(r['max_ms'], '.2f')} ms",
                flush=True,
            )
    print()
    summary = {}
    for mode in modes:
        rs = [r for r in runs if r["mode"] == mode]

        def med(k):
            xs = [r[k] for r in rs if r[k] is not None]
            return statistics.median(xs) if xs else None

        summary[mode] = {k: med(k) for k in ["rss_kib_per_conn", "us_per_event", "p50_ms", "p99_ms", "max_ms"]}
        s = summary[mode]
        print(
            f"median {mode:<11} {fmt(s['rss_kib_per_conn'], '.2f')} KiB/conn  {fmt(s['us_per_event'], '.2f')} us/event"
            f"  p50 {fmt(s['p50_ms'], '.2f')}  p99 {fmt(s['p99_ms'], '.2f')}  max {fmt(s['max_ms'], '.2f')} ms"
        )
    if "passthrough" in summary:
        base = summary["passthrough"]
        for mode in modes:
            if mode != "passthrough" and base["rss_kib_per_conn"] is not None and summary[mode]["rss_kib_per_conn"] is not None:
                print(f"{mode} - passthrough: {summary[mode]['rss_kib_per_conn'] - base['rss_kib_per_conn']:+.2f} KiB/conn")
    if opts.json:
        print(json.dumps({"args": {k: v for k, v in vars(opts).items() if k not in ("client", "port")}, "runs": runs,
                          "medians": summary}))


if __name__ == "__main__":
    main()
