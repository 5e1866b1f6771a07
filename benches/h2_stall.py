#!/usr/bin/env python3
"""What one stalled HTTP/2 client costs a streaming server.

Starts the server command given after `--` (it gets `--addr 127.0.0.1:0`
appended and must print `listening on http://HOST:PORT`), opens ONE HTTP/2
connection (prior knowledge, h2c) with the largest flow-control windows
(2^31 - 1 for the connection and every stream), sends `--streams` requests
`GET --path` on it, reads until every stream has its response headers (or
was refused), then never reads again. Meanwhile it samples the server's
resident memory (`VmRSS` in /proc/PID/status) every 0.25 s for `--seconds`
and prints, on the last line, one JSON object:

    {"streams": 100, "accepted": 100, "refused": 0, "rss_start_mib": ...,
     "rss_peak_mib": ..., "rss_end_mib": ..., "hwm_mib": ..., "exit_status": 0}

then stops the server with SIGTERM and waits for it (bounded).

    pip install h2
    cargo build --release --example sse_server --features axum,metrics
    python3 benches/h2_stall.py --streams 100 --seconds 15 -- \\
        target/release/examples/sse_server --rate 10000 --size 256 --capacity 1000

Only loopback is used; every wait is bounded; the server is killed if it
does not stop within 10 s of SIGTERM. Linux only (reads /proc).
"""

import argparse
import json
import re
import select
import signal
import socket
import subprocess
import sys
import time

import h2.config
import h2.connection
import h2.events
import h2.settings

MAX_WINDOW = 2**31 - 1
DEFAULT_WINDOW = 65535


def rss_kib(pid, field="VmRSS"):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def start_server(command, timeout):
    proc = subprocess.Popen(
        command + ["--addr", "127.0.0.1:0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], 0.1)
        if ready:
            line = proc.stdout.readline()
            m = re.match(r"listening on http://(127\.0\.0\.1):(\d+)", line)
            if m:
                return proc, (m.group(1), int(m.group(2)))
            if not line:
                break
    proc.kill()
    proc.wait()
    sys.exit(f"server did not print its listening line within {timeout} s")


def stop_server(proc):
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        return None


def open_streams(addr, streams, path, timeout):
    """Opens the streams on one connection; returns (socket, accepted, refused)."""
    sock = socket.create_connection(addr, timeout=timeout)
    config = h2.config.H2Configuration(client_side=True, header_encoding="utf-8")
    conn = h2.connection.H2Connection(config=config)
    conn.local_settings = h2.settings.Settings(
        client=True,
        initial_values={
            h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: MAX_WINDOW,
            h2.settings.SettingCodes.ENABLE_PUSH: 0,
        },
    )
    conn.initiate_connection()
    conn.increment_flow_control_window(MAX_WINDOW - DEFAULT_WINDOW)
    authority = f"{addr[0]}:{addr[1]}"
    pending = set()
    for _ in range(streams):
        sid = conn.get_next_available_stream_id()
        conn.send_headers(
            sid,
            [
                (":method", "GET"),
                (":path", path),
                (":scheme", "http"),
                (":authority", authority),
            ],
            end_stream=True,
        )
        pending.add(sid)
    sock.sendall(conn.data_to_send())

    accepted, refused = 0, 0
    deadline = time.monotonic() + timeout
    while pending and time.monotonic() < deadline:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            data = sock.recv(65536)
        except socket.timeout:
            break
        if not data:
            break
        for event in conn.receive_data(data):
            if isinstance(event, h2.events.ResponseReceived):
                if event.stream_id in pending:
                    pending.discard(event.stream_id)
                    accepted += 1
            elif isinstance(event, h2.events.StreamReset):
                if event.stream_id in pending:
                    pending.discard(event.stream_id)
                    refused += 1
            elif isinstance(event, h2.events.ConnectionTerminated):
                pending.clear()
        # Settings ACKs; no WINDOW_UPDATE is needed with these windows.
        out = conn.data_to_send()
        if out:
            sock.sendall(out)
    return sock, accepted, refused


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--streams", type=int, default=100)
    parser.add_argument("--path", default="/events")
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the server command after --")
    if not 1 <= args.streams <= 1000 or not 0 < args.seconds <= 600:
        parser.error("--streams must be in 1..=1000, --seconds in (0, 600]")

    proc, addr = start_server(command, timeout=30)
    try:
        time.sleep(0.5)
        rss_start = rss_kib(proc.pid)
        sock, accepted, refused = open_streams(addr, args.streams, args.path, timeout=10)
        peak = rss_start
        end = time.monotonic() + args.seconds
        while time.monotonic() < end:
            time.sleep(0.25)
            peak = max(peak, rss_kib(proc.pid))
        rss_end = rss_kib(proc.pid)
        hwm = rss_kib(proc.pid, "VmHWM")
        sock.close()
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    status = stop_server(proc)
    mib = lambda kib: round(kib / 1024, 1)  # noqa: E731
    print(
        json.dumps(
            {
                "streams": args.streams,
                "accepted": accepted,
                "refused": refused,
                "rss_start_mib": mib(rss_start),
                "rss_peak_mib": mib(peak),
                "rss_end_mib": mib(rss_end),
                "hwm_mib": mib(hwm),
                "exit_status": status,
            }
        )
    )


if __name__ == "__main__":
    main()
