#!/usr/bin/env python3
"""Benchmark scenarios for cascade-router, on loopback only.

Each scenario starts the mock upstream and the router (and, where it compares, a baseline),
drives them with the project's load harness (`cascade-bench load --json`), stops everything
and prints a Markdown table. Figures are compared within one run, alternating A and B and
taking the median of the repetitions, because these machines are shared and noisy.

    python3 benches/scenarios.py all                 # the full run behind BENCHMARKS.md
    python3 benches/scenarios.py overhead pooling    # some scenarios
    python3 benches/scenarios.py all --smoke         # tiny counts: checks the scripts work (CI)

--bin picks the router binary (default target/release/cascade-router); the tools (mock
provider, load harness, bare server) come from `cascade-bench` beside it. Build both first with
`cargo build --release --workspace`.
"""

import argparse
import glob
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from datetime import datetime, timezone

CLK_TCK = os.sysconf("SC_CLK_TCK")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port, proc, timeout=30.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening on {port}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listening on {port} after {timeout} s")


def cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime + stime


def status_kib(pid, key):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


class Bench:
    def __init__(self, binary, smoke, old_bin=None):
        self.bin = binary
        self.old_bin = old_bin
        self.tools = os.path.join(os.path.dirname(binary), "cascade-bench")
        self.smoke = smoke
        self.procs = []
        self.tmp = tempfile.mkdtemp(prefix="cascade-bench-")

    def spawn(self, args, port, exe=None, wrap=()):
        log = open(os.path.join(self.tmp, f"{os.path.basename(str(args[0]))}-{port}.log"), "w")
        exe = exe or (self.bin if args[0] == "serve" else self.tools)
        p = subprocess.Popen([*wrap, exe, *map(str, args)], stdout=log, stderr=log, stdin=subprocess.DEVNULL)
        self.procs.append(p)
        wait_port(port, p, timeout=120.0 if wrap else 30.0)
        return p

    def stop(self, p):
        p.terminate()
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
        self.procs.remove(p)

    def stop_all(self):
        for p in list(self.procs):
            self.stop(p)

    def mock(self, *extra):
        port = free_port()
        return self.spawn(["mock-provider", "--listen", f"127.0.0.1:{port}", *extra], port), port

    def router(self, providers_yaml, cascade_yaml="cascade:\n  max_retries_per_provider: 0\n", exe=None):
        port = free_port()
        path = os.path.join(self.tmp, f"router-{port}.yaml")
        with open(path, "w") as f:
            f.write(cascade_yaml + "providers:\n" + providers_yaml)
        return self.spawn(["serve", "--config", path, "--listen", f"127.0.0.1:{port}"], port, exe=exe), port

    def load(self, *args):
        out = subprocess.run([self.tools, "load", "--json", *map(str, args)], capture_output=True, text=True, timeout=600)
        if out.returncode != 0:
            raise RuntimeError(f"load {' '.join(map(str, args))} failed: {out.stderr.strip()}")
        report = json.loads(out.stdout)
        if report["ok"] == 0:
            raise RuntimeError(f"load {' '.join(map(str, args))}: no request succeeded: {report['errors']}")
        return report


def openai_provider(name, base, extra=""):
    return (f"  - name: {name}\n    type: openai\n    base_url: \"{base}\"\n    models: [m]\n"
            f"    max_concurrency: 20000\n{extra}")


def med(values):
    return statistics.median(values)


def pct(report, key, which="latency_us"):
    p = report.get(which)
    return p[key] if p else 0


DATA = '{"model":"m","prompt":"hello {{n}}"}'


def overhead(b):
    """Latency direct to the mock vs through the router at fixed offered rates: the router as
    configured by default (a unary call goes to the OpenAI-shaped mock as a stream, read whole:
    `stream_unary`), with `stream_unary: false` (a unary request, as the direct path), and the
    floor: the team's bare tonic server forwarding each prompt with reqwest (no cascade, no
    metrics, no listener bounds) — what any router on tonic and reqwest pays here."""
    mock, mport = b.mock()
    base = f"http://127.0.0.1:{mport}/v1"
    routers = {"streamed": b.router(openai_provider("mock", base)),
               "unary": b.router(openai_provider("mock", base, "    stream_unary: false\n"))}
    pport = free_port()
    routers["bare proxy"] = (b.spawn(["bare-server", "--listen", f"127.0.0.1:{pport}", "--forward", base], pport), pport)
    rates = [200, 500] if b.smoke else [1000, 5000, 10000]
    reps, secs = (1, 0.5) if b.smoke else (3, 5)
    common = ["-c", 512, "--connections", 8, "--warmup", 200, "-d", DATA, "--duration", secs]
    rows = []
    for rate in rates:
        direct = []
        routed = {k: [] for k in routers}
        cpu = {k: [] for k in routers}
        for _ in range(reps):
            direct.append(b.load("--http", base, "--rate", rate, *common))
            for name, (router, rport) in routers.items():
                c0 = cpu_seconds(router.pid)
                r = b.load("--addr", f"127.0.0.1:{rport}", "--rate", rate, *common)
                cpu[name].append((cpu_seconds(router.pid) - c0) / (r["requests"] + 200) * 1e6)
                routed[name].append(r)
        d50, d99 = med([pct(r, "p50") for r in direct]), med([pct(r, "p99") for r in direct])
        row = [rate, d50, d99]
        for name in routers:
            r50, r99 = med([pct(r, "p50") for r in routed[name]]), med([pct(r, "p99") for r in routed[name]])
            row += [r50, r99, r50 - d50, r99 - d99, f"{med(cpu[name]):.1f}"]
        errors = sum(sum(r["errors"].values()) for runs in routed.values() for r in runs)
        rows.append(row + [f"{med([r['throughput_rps'] for r in routed['streamed']]):.0f}", errors])
    b.stop_all()
    return table("Overhead: direct to the mock vs through the router (open loop, latency in µs); "
                 "the router streams unary calls upstream by default (`stream_unary`), and not with "
                 "`stream_unary: false`; the bare tonic proxy is the floor",
                 ["offered req/s", "direct p50", "direct p99",
                  "router p50", "router p99", "added p50", "added p99", "router CPU µs/req",
                  "unary upstream: router p50", "p99", "added p50", "added p99", "CPU µs/req",
                  "bare proxy: p50", "p99", "added p50", "added p99", "CPU µs/req",
                  "router req/s", "errors"], rows)


def ceiling(b):
    """Cache hits through the router vs a bare tonic server answering a constant."""
    bport = free_port()
    b.spawn(["bare-server", "--listen", f"127.0.0.1:{bport}"], bport)
    mock, mport = b.mock()
    router, rport = b.router(openai_provider("mock", f"http://127.0.0.1:{mport}/v1"), cascade_yaml="cache: {}\n")
    hit = '{"model":"m","prompt":"the same question","temperature":0}'
    reps, secs = (1, 0.5) if b.smoke else (3, 5)
    common = ["-c", 64, "--connections", 4, "--warmup", 500, "--duration", secs]
    res = {"bare tonic (constant)": [], "router, cache hits": []}
    for _ in range(reps):
        res["bare tonic (constant)"].append(b.load("--addr", f"127.0.0.1:{bport}", "-d", DATA, *common))
        res["router, cache hits"].append(b.load("--addr", f"127.0.0.1:{rport}", "-d", hit, *common))
    upstream = mock_stats(mport)["requests"]
    rows = []
    for name, runs in res.items():
        rows.append([name, f"{med([r['throughput_rps'] for r in runs]):.0f}",
                     med([pct(r, "p50") for r in runs]), med([pct(r, "p99") for r in runs])])
    ratio = med([r["throughput_rps"] for r in res["router, cache hits"]]) / med([r["throughput_rps"] for r in res["bare tonic (constant)"]])
    b.stop_all()
    return table(f"Stack ceiling: cache hits reach {ratio:.0%} of a bare tonic server's throughput "
                 f"(upstream saw {upstream} request(s) in all)",
                 ["server", "req/s", "p50 µs", "p99 µs"], rows)


def callgrind(b):
    """Instructions per cache hit, counted by valgrind's callgrind — a count, not a time: the
    same on a loaded machine — for the router and for the bare tonic server answering a
    constant, with the same client and requests. Each server runs under callgrind; after a
    warm-up (the router's cache filled, every buffer grown) its counters are zeroed, N calls
    are made, and the dump's total (every thread of the process) is divided by N."""
    n = 200 if b.smoke else 2000
    mock, mport = b.mock()
    hit = '{"model":"m","prompt":"the same question","temperature":0}'
    rows, per = [], {}
    for name in ["bare tonic (constant)", "router, cache hits"]:
        port = free_port()
        out = os.path.join(b.tmp, f"callgrind-{port}.out")
        wrap = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}"]
        if name.startswith("bare"):
            proc, data = b.spawn(["bare-server", "--listen", f"127.0.0.1:{port}"], port, wrap=wrap), DATA
        else:
            path = os.path.join(b.tmp, f"router-{port}.yaml")
            with open(path, "w") as f:
                f.write("cache: {}\nproviders:\n" + openai_provider("mock", f"http://127.0.0.1:{mport}/v1"))
            proc = b.spawn(["serve", "--config", path, "--listen", f"127.0.0.1:{port}"], port, wrap=wrap)
            data = hit
        calls = ["--addr", f"127.0.0.1:{port}", "-d", data, "-c", 8, "--connections", 2, "--timeout", 60]
        b.load(*calls, "-n", 200)
        subprocess.run(["callgrind_control", "-z", str(proc.pid)], check=True, capture_output=True)
        r = b.load(*calls, "-n", n)
        subprocess.run(["callgrind_control", "-d", str(proc.pid)], check=True, capture_output=True)
        dumps = sorted(glob.glob(out + ".*"), key=os.path.getmtime)
        with open(dumps[-1]) as f:
            total = next(int(line.split()[1]) for line in f if line.startswith(("totals:", "summary:")))
        per[name] = total / n
        rows.append([name, n, r["ok"], f"{total:,}", f"{total / n:,.0f}"])
        b.stop(proc)
    b.stop_all()
    ratio = per["router, cache hits"] / per["bare tonic (constant)"]
    return table(f"Instructions per call under callgrind: a cache hit costs {ratio:.2f}x the bare tonic "
                 f"server's constant answer (same client: 8 callers on 2 connections; every thread counted)",
                 ["server", "calls", "answered", "instructions", "per call"], rows)


def pooling(b):
    """Pooled upstream client vs a new TLS connection per request."""
    port = free_port()
    pem = os.path.join(b.tmp, "mock-ca.pem")
    b.spawn(["mock-provider", "--listen", f"127.0.0.1:{port}", "--tls-cert-out", pem], port)
    base = f"https://localhost:{port}/v1"
    pooled, pport = b.router(openai_provider("tls", base, f"    http: {{ca_file: \"{pem}\"}}\n"))
    fresh, fport = b.router(openai_provider("tls", base, f"    http: {{ca_file: \"{pem}\", pool_max_idle_per_host: 0}}\n"))
    reps, secs = (1, 0.5) if b.smoke else (3, 5)
    common = ["-c", 16, "--connections", 2, "--warmup", 100, "-d", DATA, "--duration", secs]
    res = {"pooled": [], "new connection per request": []}
    cpu = {k: [] for k in res}
    for _ in range(reps):
        for name, proc, rport in [("pooled", pooled, pport), ("new connection per request", fresh, fport)]:
            c0 = cpu_seconds(proc.pid)
            r = b.load("--addr", f"127.0.0.1:{rport}", *common)
            cpu[name].append((cpu_seconds(proc.pid) - c0) / (r["requests"] + 100) * 1e6)
            res[name].append(r)
    rows = []
    for name, runs in res.items():
        rows.append([name, med([pct(r, "p50", "upstream_us") for r in runs]),
                     med([pct(r, "p99", "upstream_us") for r in runs]),
                     med([pct(r, "p50") for r in runs]),
                     f"{med([r['throughput_rps'] for r in runs]):.0f}", f"{med(cpu[name]):.1f}"])
    p50 = [med([pct(r, "p50", "upstream_us") for r in runs]) for runs in res.values()]
    saved = 1 - p50[0] / p50[1] if p50[1] else 0
    b.stop_all()
    return table(f"Pooling against a TLS upstream: upstream p50 {saved:.0%} lower with the pool",
                 ["client", "upstream p50 µs", "upstream p99 µs", "client p50 µs", "req/s", "router CPU µs/req"], rows)


def memory(b):
    """Peak RSS of the router with N calls in flight against a slow upstream."""
    levels = [100, 500] if b.smoke else [1000, 10000]
    hold_ms = 500 if b.smoke else 3000
    mock, mport = b.mock("--latency-ms", hold_ms, "--concurrency", 20000)
    base = f"http://127.0.0.1:{mport}/v1"
    setups = [
        ("simulated upstream (router side only)",
         f"  - {{name: sim, type: simulated, models: [m], max_concurrency: 20000, simulated: {{latency_ms: {hold_ms}}}}}\n"),
        ("HTTP/1.1 upstream, a connection per call", openai_provider("slow", base)),
        ("HTTP/1.1 upstream, max_concurrency 256", openai_provider("slow", base).replace("20000", "256")),
    ]
    rows = []
    for n in levels:
        for name, provider in setups:
            router, rport = b.router(provider)
            idle = status_kib(router.pid, "VmRSS")
            # Every call is sent at once and stays in flight until answered or its 5 s deadline.
            r = b.load("--addr", f"127.0.0.1:{rport}", "-c", n, "-n", n, "--connections", max(1, n // 100),
                       "-d", DATA, "--timeout", 5 if "256" in name else 60)
            peak = status_kib(router.pid, "VmHWM")
            rows.append([n, name, r["ok"], f"{idle / 1024:.1f}", f"{peak / 1024:.1f}", f"{(peak - idle) / n:.1f}"])
            b.stop(router)
    b.stop_all()
    return table(f"Memory: router RSS with N calls in flight (upstream holds each {hold_ms} ms)",
                 ["in flight", "upstream", "answered", "idle RSS MiB", "peak RSS MiB", "KiB per call"], rows)


TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]


def payloads(b):
    """Router CPU per request and RSS for a plain text request, a tool-bearing request and a
    request with a 1 MiB image, in one run; then how many copies of the image the router holds
    per call, from its RSS with K image calls held in flight by a slow upstream."""
    n = 100 if b.smoke else 3000
    image = 1 << 20
    kinds = [
        ("plain text (prompt)", {"model": "m", "prompt": "hello {{n}}"}),
        ("tools (1 tool, chat; answered with a tool call)",
         {"model": "m", "prompt": "weather in city {{n}}?", "tools": TOOLS}),
        ("1 MiB image (chat)", {"model": "m", "prompt": "what is in picture {{n}}?", "image_bytes": image}),
    ]
    mock, mport = b.mock()
    base = f"http://127.0.0.1:{mport}/v1"
    rows = []
    for name, data in kinds:
        router, rport = b.router(openai_provider("mock", base))
        idle = status_kib(router.pid, "VmRSS")
        c0 = cpu_seconds(router.pid)
        r = b.load("--addr", f"127.0.0.1:{rport}", "-c", 16, "-n", n, "--warmup", 0, "-d", json.dumps(data))
        cpu = (cpu_seconds(router.pid) - c0) / max(1, r["requests"]) * 1e6
        peak = status_kib(router.pid, "VmHWM")
        rows.append([name, r["ok"], f"{cpu:.0f}", pct(r, "p50"), f"{r['throughput_rps']:.0f}",
                     f"{idle / 1024:.1f}", f"{peak / 1024:.1f}"])
        b.stop(router)
    b.stop(mock)
    out = table(f"Payloads: router CPU and RSS per kind of request ({n} calls each, 16 at once, "
                "a fresh router each)",
                ["request", "answered", "router CPU µs/req", "p50 µs", "req/s", "idle RSS MiB",
                 "peak RSS MiB"], rows)
    hold_ms = 1000 if b.smoke else 3000
    slow, sport = b.mock("--latency-ms", hold_ms, "--concurrency", 1000)
    rows = []
    for k in ([8] if b.smoke else [16, 64]):
        router, rport = b.router(openai_provider("slow", f"http://127.0.0.1:{sport}/v1"))
        idle = status_kib(router.pid, "VmRSS")
        held = []
        sampler = threading.Thread(target=lambda: (time.sleep(hold_ms / 2000), held.append(status_kib(router.pid, "VmRSS"))))
        sampler.start()
        data = {"model": "m", "prompt": "what is in picture {{n}}?", "image_bytes": image}
        r = b.load("--addr", f"127.0.0.1:{rport}", "-c", k, "-n", k, "--warmup", 0,
                   "--connections", 1, "-d", json.dumps(data), "--timeout", 30)
        sampler.join()
        peak = status_kib(router.pid, "VmHWM")
        per_held = (held[0] - idle) / k / 1024
        per_peak = (peak - idle) / k / 1024
        rows.append([k, r["ok"], f"{idle / 1024:.1f}", f"{held[0] / 1024:.1f}", f"{peak / 1024:.1f}",
                     f"{per_held:.2f}", f"{per_peak:.2f}"])
        b.stop(router)
    b.stop_all()
    return out + "\n" + table(
        f"Copies of a 1 MiB image: RSS with K image calls held {hold_ms} ms by the upstream "
        "(MiB per call; 1.00 = one copy of the image, base64 text is 1.33)",
        ["K in flight", "answered", "idle RSS MiB", "RSS while held MiB", "peak RSS MiB",
         "MiB per call held", "MiB per call at peak"], rows)


def memory_rounds(b):
    """Whether memory comes back after bursts: four rounds of N calls held in flight by the
    simulated provider (router side only), RSS idle before, at the peak, and 1 s and 5 s after
    each round's last answer."""
    n = 500 if b.smoke else 10000
    hold_ms = 500 if b.smoke else 2000
    settle = 0.2 if b.smoke else 4
    router, port = b.router(
        f"  - {{name: sim, type: simulated, models: [m], max_concurrency: 20000, simulated: {{latency_ms: {hold_ms}}}}}\n")
    rows = []
    first_idle = status_kib(router.pid, "VmRSS")
    for round_ in range(1, 5):
        before = status_kib(router.pid, "VmRSS")
        sampled = []
        sampler = threading.Thread(target=lambda: (time.sleep(hold_ms / 2000), sampled.append(status_kib(router.pid, "VmRSS"))))
        sampler.start()
        r = b.load("--addr", f"127.0.0.1:{port}", "-c", n, "-n", n, "--connections", max(1, n // 100),
                   "-d", DATA, "--timeout", 60)
        sampler.join()
        time.sleep(1)  # every call answered: RSS as the allocator hands memory back
        after_1s = status_kib(router.pid, "VmRSS")
        time.sleep(settle)
        after = status_kib(router.pid, "VmRSS")
        rows.append([round_, r["ok"], f"{before / 1024:.1f}", f"{sampled[0] / 1024:.1f}", f"{after_1s / 1024:.1f}",
                     f"{after / 1024:.1f}", f"{after / max(first_idle, 1):.2f}"])
    b.stop_all()
    return table(f"Memory after bursts: RSS around four rounds of {n} calls held {hold_ms} ms (simulated provider)",
                 ["round", "answered", "idle before MiB", "in flight MiB", "1 s after MiB", f"{1 + settle:g} s after MiB",
                  "settled / first idle"], rows)


def redis_stall(b):
    """A cached router in front of a real redis-server that hangs (SIGSTOP) mid-run: latency of
    cache misses with Redis healthy, then stalled (Redis is skipped after a few failures), then
    back (SIGCONT; a background probe finds it)."""
    secs = 0.5 if b.smoke else 4
    rate = 200 if b.smoke else 2000
    rport = free_port()
    redis = subprocess.Popen(["redis-server", "--port", str(rport), "--bind", "127.0.0.1", "--save", "",
                              "--appendonly", "no"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_port(rport, redis)
        mock, mport = b.mock()
        cache = (f"cache: {{backend: redis, redis_url: \"redis://127.0.0.1:{rport}\", "
                 f"redis_timeout_ms: 100}}\ncascade:\n  max_retries_per_provider: 0\n")
        router, port = b.router(openai_provider("mock", f"http://127.0.0.1:{mport}/v1"), cascade_yaml=cache)
        rows = []
        for phase in ["healthy", "stalled (SIGSTOP)", "back (SIGCONT)"]:
            if phase.startswith("stalled"):
                os.kill(redis.pid, signal.SIGSTOP)
            if phase.startswith("back"):
                os.kill(redis.pid, signal.SIGCONT)
                time.sleep(1)  # the probe runs every 250 ms; give it a few
            # Every call a miss (a new deterministic prompt): a Redis GET, then a SET.
            data = json.dumps({"model": "m", "prompt": f"{phase} {{{{n}}}}", "temperature": 0})
            r = b.load("--addr", f"127.0.0.1:{port}", "-c", 64, "--rate", rate, "--duration", secs,
                       "--warmup", 0, "-d", data)
            errors = sum(r["errors"].values())
            rows.append([phase, r["ok"], errors, pct(r, "p50"), pct(r, "p99"), pct(r, "max")])
        b.stop_all()
        return table(f"Redis stalls: cache misses through a router whose Redis hangs ({rate} req/s offered, "
                     f"{secs} s per phase, redis_timeout_ms 100; latency in µs)",
                     ["Redis", "answered", "errors", "p50", "p99", "max"], rows)
    finally:
        if redis.poll() is None:
            os.kill(redis.pid, signal.SIGCONT)
            redis.terminate()
            redis.wait()


def mock_stats(port):
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/stats", timeout=10) as r:
        return json.loads(r.read())


GPU = ["--latency-ms", 20, "--per-item-ms", 1, "--concurrency", 8]
GPU_NOTE = "mock cost model: 20 ms per request + 1 ms per prompt, at most 8 requests in service"


def batched_run(b, mport, rport, secs):
    """One closed-loop run of 64 callers with distinct prompts; adds the mock's request counts."""
    before = mock_stats(mport)
    r = b.load("--addr", f"127.0.0.1:{rport}", "-c", 64, "--connections", 4, "--duration", secs,
               "-d", '{"model":"m","prompt":"prompt {{n}}"}', "--timeout", 60)
    after = mock_stats(mport)
    r["upstream_requests"] = after["requests"] - before["requests"]
    r["prompts"] = after["items"] - before["items"]
    return r


def batching(b):
    """64 callers against a GPU-like upstream: batching off, fixed and adaptive."""
    mock, mport = b.mock(*GPU)
    base = f"http://127.0.0.1:{mport}/v1"
    ports = {
        "batching off": b.router(openai_provider("gpu", base))[1],
        "batching on, fixed (32, 5 ms)": b.router(openai_provider(
            "gpu", base, "    batching: {mode: fixed, max_batch_size: 32, max_wait_ms: 5}\n"))[1],
        "batching on, adaptive (the default)": b.router(openai_provider("gpu", base, "    batching: {}\n"))[1],
    }
    reps, secs = (1, 0.5) if b.smoke else (3, 5)
    res = {name: [] for name in ports}
    for _ in range(reps):
        for name, port in ports.items():
            res[name].append(batched_run(b, mport, port, secs))
    rows = []
    for name, runs in res.items():
        rows.append([name, f"{med([r['upstream_requests'] / max(1, r['prompts']) for r in runs]):.3f}",
                     f"{med([r['throughput_rps'] for r in runs]):.0f}",
                     med([pct(r, "p50") / 1000 for r in runs]), med([pct(r, "p99") / 1000 for r in runs]),
                     sum(sum(r["errors"].values()) for r in runs)])
    off_r, on_r = res["batching off"], res["batching on, adaptive (the default)"]
    fewer = 1 - med([r["upstream_requests"] / max(1, r["prompts"]) for r in on_r]) / med([r["upstream_requests"] / max(1, r["prompts"]) for r in off_r])
    faster = 1 - med([pct(r, "p50") for r in on_r]) / med([pct(r, "p50") for r in off_r])
    b.stop_all()
    return table(f"Batching: 64 callers, distinct prompts, closed loop ({GPU_NOTE}): "
                 f"{fewer:.0%} fewer upstream requests, p50 {faster:.0%} lower with batching",
                 ["router", "upstream requests per prompt", "prompts/s", "p50 ms", "p99 ms", "errors"], rows)


def window(b):
    """The max_wait_ms sweep: latency against upstream efficiency."""
    mock, mport = b.mock(*GPU)
    base = f"http://127.0.0.1:{mport}/v1"
    waits = [0, 5] if b.smoke else [0, 1, 2, 5, 10]
    routers = {w: b.router(openai_provider("gpu", base, f"    batching: {{mode: fixed, max_batch_size: 32, max_wait_ms: {w}}}\n"))[1] for w in waits}
    reps, secs = (1, 0.5) if b.smoke else (3, 4)
    res = {w: [] for w in waits}
    for _ in range(reps):
        for w in waits:
            res[w].append(batched_run(b, mport, routers[w], secs))
    rows = []
    for w, runs in res.items():
        rows.append([w, f"{med([r['prompts'] / max(1, r['upstream_requests']) for r in runs]):.1f}",
                     f"{med([r['upstream_requests'] / max(1, r['prompts']) for r in runs]):.3f}",
                     f"{med([r['throughput_rps'] for r in runs]):.0f}",
                     med([pct(r, "p50") / 1000 for r in runs]), med([pct(r, "p99") / 1000 for r in runs])])
    b.stop_all()
    return table(f"Window sweep (fixed mode): max_batch_size 32, 64 callers ({GPU_NOTE})",
                 ["max_wait_ms", "mean batch size", "upstream requests per prompt", "prompts/s", "p50 ms", "p99 ms"], rows)


def agent_loop(b):
    """An agent's 200 prompts sent one at a time vs as one CompleteBatch through the router."""
    mock, mport = b.mock(*GPU)
    base = f"http://127.0.0.1:{mport}/v1"
    plain, plain_port = b.router(openai_provider("gpu", base))
    batched, batched_port = b.router(openai_provider("gpu", base, "    batching: {max_batch_size: 32, max_wait_ms: 5}\n"))
    n = 20 if b.smoke else 200
    reps = 1 if b.smoke else 3
    data = ["-d", '{"model":"m","prompt":"triage item {{n}}"}', "--timeout", 120]
    res = {"one at a time (Complete × N)": [], "one CompleteBatch of N, batching on": []}
    for _ in range(reps):
        before = mock_stats(mport)["requests"]
        r = b.load("--addr", f"127.0.0.1:{plain_port}", "-c", 1, "-n", n, *data)
        r["upstream"] = mock_stats(mport)["requests"] - before
        res["one at a time (Complete × N)"].append(r)
        before = mock_stats(mport)["requests"]
        r = b.load("--addr", f"127.0.0.1:{batched_port}", "-c", 1, "-n", 1, "--batch", n, *data)
        r["upstream"] = mock_stats(mport)["requests"] - before
        res["one CompleteBatch of N, batching on"].append(r)
    rows = [[name, n, f"{med([r['elapsed_s'] for r in runs]):.3f}", med([r["upstream"] for r in runs])]
            for name, runs in res.items()]
    one, batch = (med([r["elapsed_s"] for r in runs]) for runs in res.values())
    b.stop_all()
    return table(f"Agent loop: {n} prompts per iteration ({GPU_NOTE}): the iteration is {1 - batch / one:.0%} shorter as one batch",
                 ["how the agent sends", "prompts", "iteration s", "upstream requests"], rows)


COST_MODELS = [
    ("20 ms + 1 ms/prompt, 8 slots", ["--latency-ms", 20, "--per-item-ms", 1, "--concurrency", 8]),
    ("50 ms + 0.5 ms/prompt, 4 slots", ["--latency-ms", 50, "--per-item-ms", 0.5, "--concurrency", 4]),
    ("5 ms + 2 ms/prompt, 16 slots", ["--latency-ms", 5, "--per-item-ms", 2, "--concurrency", 16]),
]
FIXED_SWEEP = [(size, wait) for size in (8, 32, 128) for wait in (0, 1, 5)]


def closed_run(b, mport, rport, callers, secs):
    """`callers` closed-loop callers with distinct prompts for `secs`; adds the mock's counts."""
    before = mock_stats(mport)
    r = b.load("--addr", f"127.0.0.1:{rport}", "-c", callers, "--connections", min(4, callers),
               "--duration", secs, "-d", '{"model":"m","prompt":"prompt {{n}}"}', "--timeout", 60)
    after = mock_stats(mport)
    r["upstream_requests"] = after["requests"] - before["requests"]
    r["prompts"] = after["items"] - before["items"]
    return r


def spread(runs):
    """Max over min of a setting's runs' throughput: how much it varies from run to run."""
    rates = [r["throughput_rps"] for r in runs]
    return f"{max(rates) / max(min(rates), 1e-9):.2f}x"


def adaptive(b):
    """Adaptive batching against the best fixed setting of a window/size sweep, per cost model
    and caller count (closed loop), with batching off for reference. Two stages per caller
    count: the sweep (every fixed setting once) ranks them; then batching off, adaptive and the
    two leading fixed settings run head to head, alternating, after a warm-up run each (the
    routers are long-lived; this measures each at its steady state for that load). Medians of
    the head-to-head runs; the best fixed setting is the better of the two finalists there, so
    one lucky sweep run does not pick it and adaptive is held to the better of two."""
    callers_list = [1, 64] if b.smoke else [1, 8, 64, 256]
    models = COST_MODELS[:1] if b.smoke else COST_MODELS
    sweep = [(32, 5)] if b.smoke else FIXED_SWEEP
    reps, secs, warm = (1, 0.5, 0.2) if b.smoke else (5, 2, 1)
    out = []
    for model_name, args in models:
        mock, mport = b.mock(*args)
        base = f"http://127.0.0.1:{mport}/v1"
        ports = {"off": b.router(openai_provider("up", base))[1],
                 "adaptive": b.router(openai_provider("up", base, "    batching: {mode: adaptive}\n"))[1]}
        if b.old_bin:
            ports["old adaptive"] = b.router(openai_provider("up", base, "    batching: {mode: adaptive}\n"),
                                             exe=b.old_bin)[1]
        fixed = []
        for size, wait in sweep:
            fixed.append(f"fixed {size}/{wait} ms")
            ports[fixed[-1]] = b.router(openai_provider(
                "up", base, f"    batching: {{mode: fixed, max_batch_size: {size}, max_wait_ms: {wait}}}\n"))[1]
        res = {}
        for c in callers_list:
            swept = {k: closed_run(b, mport, ports[k], c, secs)["throughput_rps"] for k in fixed}
            ranked = sorted(fixed, key=swept.get, reverse=True)
            finalists = ["off", "adaptive", *(["old adaptive"] if b.old_bin else []), *ranked[:2]]
            for k in finalists:
                closed_run(b, mport, ports[k], c, warm)
            runs = {k: [] for k in finalists}
            for _ in range(reps):
                for k in finalists:
                    runs[k].append(closed_run(b, mport, ports[k], c, secs))
            res[c] = runs
        rate = lambda c, k: med([r["throughput_rps"] for r in res[c][k]])
        p50 = lambda c, k: med([pct(r, "p50") for r in res[c][k]]) / 1000
        size = lambda c, k: med([r["prompts"] / max(1, r["upstream_requests"]) for r in res[c][k]])
        rows = []
        for c in callers_list:
            best = max((k for k in res[c] if k.startswith("fixed")), key=lambda k: rate(c, k))
            rows.append([c, f"{rate(c, 'off'):.0f} ({p50(c, 'off'):.1f})",
                         f"{rate(c, 'adaptive'):.0f} ({p50(c, 'adaptive'):.1f}, {size(c, 'adaptive'):.1f})",
                         best, f"{rate(c, best):.0f} ({p50(c, best):.1f}, {size(c, best):.1f})",
                         f"{rate(c, 'adaptive') / rate(c, best):.2f}",
                         " ".join(f"{r['throughput_rps']:.0f}" for r in res[c]["adaptive"]),
                         spread(res[c]["adaptive"]), spread(res[c][best]),
                         *([f"{rate(c, 'old adaptive'):.0f} ({rate(c, 'old adaptive') / rate(c, best):.2f})"]
                           if b.old_bin else [])])
        b.stop_all()
        lone = p50(callers_list[0], "adaptive") - p50(callers_list[0], "off")
        out.append(table(f"Adaptive batching, mock {model_name}: sweep of {len(sweep)} fixed settings once, then "
                         f"off, adaptive and the two leading fixed settings {secs} s x {reps} alternating after a "
                         f"{warm} s warm-up, medians; lone caller p50 {lone:+.2f} ms against batching off",
                         ["callers", "off: prompts/s (p50 ms)", "adaptive: prompts/s (p50 ms, mean batch)",
                          "best fixed (size/window)", "best fixed: prompts/s (p50 ms, mean batch)",
                          "adaptive / best fixed", "adaptive's runs, prompts/s",
                          "adaptive's spread", "best fixed's spread",
                          *(["old adaptive: prompts/s (/ best fixed)"] if b.old_bin else [])], rows))
    return "\n".join(out)


OLD_LOOP = r"""
import json, sys, time, urllib.request
base, n = sys.argv[1], int(sys.argv[2])
start = time.monotonic()
for i in range(n):
    body = json.dumps({"model": "m", "prompt": f"triage item {i}"}).encode()
    req = urllib.request.Request(base + "/completions", data=body,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:  # a new connection per call
        json.loads(r.read())["choices"][0]["text"]
print(time.monotonic() - start)
"""


def agent_cli(b):
    """An agent's N prompts: the old loop (Python, one at a time, a new connection per call,
    straight at the model server) vs `cascade-router batch` over a JSONL file through the
    router (batching on), each timed as a whole command."""
    mock, mport = b.mock(*GPU)
    base = f"http://127.0.0.1:{mport}/v1"
    _, rport = b.router(openai_provider("gpu", base, "    batching: {}\n"))
    n = 20 if b.smoke else 200
    reps = 1 if b.smoke else 3
    prompts = os.path.join(b.tmp, "prompts.jsonl")
    with open(prompts, "w") as f:
        for i in range(n):
            f.write(json.dumps({"id": i, "model": "m", "prompt": f"triage item {i}"}) + "\n")
    res = {"old loop (Python, new connection per call)": [], "cascade-router batch": []}
    for rep in range(reps):
        t0 = time.monotonic()
        subprocess.run([sys.executable, "-c", OLD_LOOP, base, str(n)], check=True, capture_output=True, timeout=600)
        res["old loop (Python, new connection per call)"].append(time.monotonic() - t0)
        out = os.path.join(b.tmp, f"answers-{rep}.jsonl")
        t0 = time.monotonic()
        subprocess.run([b.bin, "batch", "--addr", f"http://127.0.0.1:{rport}", "--output", out, prompts],
                       check=True, capture_output=True, timeout=600)
        res["cascade-router batch"].append(time.monotonic() - t0)
        with open(out) as f:
            answers = [json.loads(l) for l in f]
        if len(answers) != n or any("error" in a for a in answers):
            raise RuntimeError(f"batch answered {len(answers)} lines, some failed: {answers[:3]}")
    old, new = (med(v) for v in res.values())
    rows = [[name, n, f"{med(v):.3f}"] for name, v in res.items()]
    b.stop_all()
    return table(f"Agent side: {n} prompts ({GPU_NOTE}), whole command timed, median of {reps}: "
                 f"`cascade-router batch` is {old / new:.0f}x faster than the old loop",
                 ["how the agent sends", "prompts", "elapsed s"], rows)


class RssSampler:
    """Samples a process's resident set every 0.5 s while a load runs."""

    def __init__(self, pid):
        import threading
        self.pid, self.samples, self.stop = pid, [], threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self):
        while not self.stop.is_set():
            self.samples.append(status_kib(self.pid, "VmRSS") / 1024)
            self.stop.wait(0.5)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()


def overload(b):
    """Offered 10x what the upstream serves, batching off and on: shed at once, serve the rest
    with a bounded tail, memory flat, and serve again as soon as the load stops."""
    latency_ms, per_item_ms, slots = 50, 1, 2
    mock, mport = b.mock("--latency-ms", latency_ms, "--per-item-ms", per_item_ms, "--concurrency", slots)
    base = f"http://127.0.0.1:{mport}/v1"
    entry = (f"  - name: slow\n    type: openai\n    base_url: \"{base}\"\n    models: [m]\n"
             f"    max_concurrency: {slots}\n")
    configs = [
        ("batching off", entry + "    max_waiting: 16\n",
         slots * 1000 / (latency_ms + per_item_ms)),
        ("batching on (8, 5 ms)", entry + "    batching: {max_batch_size: 8, max_wait_ms: 5, max_queue: 64}\n",
         slots * 8 * 1000 / (latency_ms + 8 * per_item_ms)),
    ]
    secs = 1 if b.smoke else 20
    rows = []
    for name, yaml, capacity in configs:
        router, rport = b.router(yaml)
        rate = int(capacity * 10)
        with RssSampler(router.pid) as rss:
            r = b.load("--addr", f"127.0.0.1:{rport}", "--rate", rate, "-c", 4096, "--connections", 4,
                       "--duration", secs, "--timeout", 5, "-d", DATA)
        after = b.load("--addr", f"127.0.0.1:{rport}", "-c", 1, "-n", 20, "-d", DATA)
        shed = r["errors"].get("ResourceExhausted", 0)
        other = sum(v for k, v in r["errors"].items() if k != "ResourceExhausted")
        rows.append([name, f"{capacity:.0f}", rate, r["requests"], r["ok"], f"{shed / max(1, r['requests']):.0%}",
                     other, f"{pct(r, 'p50', 'ok_latency_us') / 1000:.0f}",
                     f"{pct(r, 'p99', 'ok_latency_us') / 1000:.0f}",
                     f"{pct(r, 'p99') / 1000:.0f}",
                     f"{rss.samples[0]:.0f} / {max(rss.samples):.0f} / {rss.samples[-1]:.0f}",
                     f"{pct(after, 'p50') / 1000:.0f}", sum(after["errors"].values())])
        b.stop(router)
    b.stop_all()
    return table(f"Overload: offered 10x capacity for {secs} s (mock: {latency_ms} ms + {per_item_ms} ms per prompt, "
                 f"{slots} at a time; open loop, 5 s deadlines)",
                 ["router", "capacity req/s", "offered req/s", "calls", "served", "shed (RESOURCE_EXHAUSTED)",
                  "other errors", "served p50 ms", "served p99 ms", "all calls p99 ms", "RSS MiB first / max / last",
                  "right after: p50 ms", "right after: errors"], rows)


def soak(b):
    """Long fault soak: three providers, two failing a fifth of their requests in every way
    (then without 429s, whose Retry-After keeps the flaky ones aside most of the time)."""
    n = 2000 if b.smoke else 100_000
    rows = []
    for faults in ["500,429:1,reset,hang,malformed,slow:50", "500,reset,hang,malformed,slow:50"]:
        flaky_a, pa = b.mock("--fault", faults, "--fault-rate", 0.2)
        flaky_b, pb = b.mock("--fault", faults, "--fault-rate", 0.2)
        healthy, pc = b.mock()
        yaml = "".join(f"  - {{name: {name}, type: openai, priority: {i}, base_url: \"http://127.0.0.1:{p}/v1\", "
                       f"models: [m], timeout_seconds: 0.5}}\n"
                       for i, (name, p) in enumerate([("a", pa), ("b", pb), ("c", pc)], 1))
        router, rport = b.router(yaml, cascade_yaml="cascade:\n  max_retries_per_provider: 2\n  retry_delay_seconds: 0.01\n"
                                 "  circuit_breaker: {failure_threshold: 5, recovery_timeout: 1, half_open_max_calls: 1}\n")
        with RssSampler(router.pid) as rss:
            r = b.load("--addr", f"127.0.0.1:{rport}", "-c", 64, "--connections", 4, "-n", n, "--timeout", 20, "-d", DATA)
        sent = [mock_stats(p)["requests"] for p in (pa, pb, pc)]
        rows.append([faults, r["requests"], r["ok"], sum(r["errors"].values()), f"{pct(r, 'p50') / 1000:.1f}",
                     f"{pct(r, 'p99') / 1000:.0f}", f"{r['throughput_rps']:.0f}", " / ".join(map(str, sent)),
                     f"{sum(sent) / max(1, r['requests']):.2f}",
                     f"{rss.samples[0]:.0f} / {max(rss.samples):.0f} / {rss.samples[-1]:.0f}"])
        b.stop_all()
    return table(f"Fault soak: {n} calls per row, 64 callers; providers a and b fail 20% of their requests "
                 "(one fault of the list at random; a hang is cut at their 0.5 s timeout), c is healthy",
                 ["faults at a and b", "calls", "answered ok", "errors", "p50 ms", "p99 ms", "calls/s",
                  "upstream requests a / b / c", "upstream requests per call", "RSS MiB first / max / last"], rows)


def real_servers():
    """The real model servers (installed on first use by scripts/real-servers)."""
    out = subprocess.run([os.path.join(ROOT, "scripts", "real-servers")], capture_output=True, text=True, check=True)
    return dict(line.split("=", 1) for line in out.stdout.splitlines() if "=" in line)


def wait_ok(url, timeout=120.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{url} not ready after {timeout} s")


def real(b):
    """Real CPU inference: llama-server with SmolLM2-135M (-np 4), 32 callers, 8-token
    completions: straight at llama-server vs through the router, batching off, adaptive, and
    the fixed setting a sweep found best."""
    paths = real_servers()
    port = free_port()
    b.spawn(["-m", paths["CASCADE_GGUF"], "--alias", "smollm2", "--host", "127.0.0.1", "--port", port,
             "-c", 4096, "-t", 2, "-np", 4], port, exe=paths["CASCADE_LLAMA_SERVER"])
    wait_ok(f"http://127.0.0.1:{port}/health")
    base = f"http://127.0.0.1:{port}/v1"
    entry = f"  - {{name: llama, type: openai, base_url: \"{base}\", models: [smollm2], timeout_seconds: 120"
    routers = {"router, batching off": entry + "}\n",
               "router, adaptive batching": entry + ", batching: {mode: adaptive}}\n"}
    for size, wait in ([(8, 5)] if b.smoke else [(4, 2), (8, 5), (16, 10)]):
        routers[f"router, fixed ({size}, {wait} ms)"] = (
            entry + f", batching: {{mode: fixed, max_batch_size: {size}, max_wait_ms: {wait}}}}}\n")
    ports = {name: b.router(yaml)[1] for name, yaml in routers.items()}
    if b.old_bin:
        ports["router, old adaptive"] = b.router(routers["router, adaptive batching"], exe=b.old_bin)[1]
    data = '{"model":"smollm2","prompt":"Name one animal, number {{n}}:","max_tokens":8,"temperature":0}'
    # Short runs, many of them: the machine's speed drifts over minutes, and alternating
    # quickly keeps the paths compared under the same drift. The fixed settings are within a
    # few percent of each other on this server, and the best of three noisy medians is biased
    # up: as for the mocks, a sweep (each once) picks the leader, and the head-to-head runs
    # measure it afresh.
    reps, secs, warm = (1, 2, 1) if b.smoke else (6, 10, 5)
    run = lambda name, duration: b.load(*(("--http", base, "--connections", 4) if name not in ports
                                          else ("--addr", f"127.0.0.1:{ports[name]}")),
                                        "-c", 32, "--duration", duration, "--timeout", 120, "-d", data)
    fixed = [name for name in ports if "fixed" in name]
    sweep = {name: run(name, secs)["throughput_rps"] for name in fixed}
    best = max(fixed, key=sweep.get)
    res = {"straight at llama-server": [], "router, batching off": [], "router, adaptive batching": [], best: []}
    if b.old_bin:
        res["router, old adaptive"] = []
    for name in res:
        run(name, warm)
    for _ in range(reps):
        for name in res:
            res[name].append(run(name, secs))
    rate = lambda name: med([r["throughput_rps"] for r in res[name]])
    rows = [[name, f"{rate(name):.1f}", f"{med([pct(r, 'p50') for r in runs]) / 1000:.0f}",
             f"{med([pct(r, 'p99') for r in runs]) / 1000:.0f}", sum(sum(r["errors"].values()) for r in runs),
             " ".join(f"{r['throughput_rps']:.1f}" for r in runs)]
            for name, runs in res.items()]
    b.stop_all()
    return table(f"Real CPU inference: llama-server + SmolLM2-135M-Instruct (Q4_1, -np 4, 2 threads), "
                 f"32 callers, 8 new tokens; fixed sweep once ("
                 + ", ".join(f"{n.removeprefix('router, fixed ')} {v:.1f}" for n, v in sweep.items())
                 + f" completions/s), then the leader head to head, {secs} s x {reps} alternating after a "
                 f"{warm} s warm-up, medians; adaptive / best fixed: "
                 f"{rate('router, adaptive batching') / rate(best):.2f}",
                 ["path", "completions/s", "p50 ms", "p99 ms", "errors", "runs, completions/s"], rows)


def tree_cpu_seconds(pid):
    """CPU time of a process and its descendants (LiteLLM's proxy may fork workers)."""
    children = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
                children.setdefault(ppid, []).append(int(entry))
            except (OSError, ValueError, IndexError):
                pass
    total, todo = 0.0, [pid]
    while todo:
        p = todo.pop()
        try:
            total += cpu_seconds(p)
        except OSError:
            pass
        todo.extend(children.get(p, []))
    return total


def litellm_bin():
    """LiteLLM's proxy CLI, installed (once) by `benches/litellm-install`; None when absent."""
    exe = os.path.expanduser("~/.cache/cascade-router/litellm/bin/litellm")
    return exe if os.access(exe, os.X_OK) else None


def start_litellm(b, mport):
    """LiteLLM's proxy in front of the mock, offline (local cost map, no telemetry), one worker."""
    port = free_port()
    cfg = os.path.join(b.tmp, f"litellm-{port}.yaml")
    with open(cfg, "w") as f:
        f.write("model_list:\n  - model_name: m\n    litellm_params:\n      model: openai/m\n"
                f"      api_base: http://127.0.0.1:{mport}/v1\n      api_key: mock\n"
                "litellm_settings:\n  telemetry: false\n  set_verbose: false\n  drop_params: true\n")
    # No master key, as the router runs without client keys here: LiteLLM asks for this
    # variable to start so.
    env = dict(os.environ, LITELLM_LOCAL_MODEL_COST_MAP="True", LITELLM_LOG="ERROR",
               LITELLM_DANGEROUSLY_PERMIT_WEAK_OR_UNSET_MASTER_KEY="true",
               NO_PROXY="*", no_proxy="*", DISABLE_SCHEMA_UPDATE="True")
    log = open(os.path.join(b.tmp, f"litellm-{port}.log"), "w")
    p = subprocess.Popen([litellm_bin(), "--config", cfg, "--host", "127.0.0.1", "--port", str(port),
                          "--num_workers", "1"], stdout=log, stderr=log, stdin=subprocess.DEVNULL, env=env)
    b.procs.append(p)
    wait_port(port, p, timeout=180.0)
    return p, port


def http_front(b):
    """The OpenAI-compatible front's added latency and CPU over calling the mock directly, and
    LiteLLM's proxy in front of the same mock in the same run (chat completions, open loop):
    at 100, 1,000 and 5,000 req/s (LiteLLM at the rates it sustains), then each front's highest
    sustained rate on a ladder of offered rates."""
    mock, mport = b.mock()
    direct = f"http://127.0.0.1:{mport}/v1"
    hport = free_port()
    router, _ = b.router(openai_provider("mock", direct),
                         f"server: {{http_listen: \"127.0.0.1:{hport}\"}}\ncascade:\n  max_retries_per_provider: 0\n")
    wait_port(hport, router)
    fronts = {"cascade-router": (router, f"http://127.0.0.1:{hport}/v1")}
    if litellm_bin() and not b.smoke:
        lite, lport = start_litellm(b, mport)
        fronts["LiteLLM proxy"] = (lite, f"http://127.0.0.1:{lport}/v1")
    rates = [100, 300] if b.smoke else [50, 100, 1000, 5000]
    reps, secs = (1, 0.5) if b.smoke else (3, 5)
    # LiteLLM with one worker breaks down between 100 and 200 req/s: above its ladder's top
    # rung a run would only queue thousands of requests for minutes.
    most = {"cascade-router": 10 ** 9, "LiteLLM proxy": 150}

    def run(base, rate, duration, proc=None):
        warm = 50 if rate <= 100 else 200
        c0 = proc and tree_cpu_seconds(proc.pid)
        r = b.load("--http", base, "--chat", "--rate", rate, "-c", 512, "--connections", 8,
                   "-d", DATA, "--duration", duration, "--warmup", warm, "--timeout", 10)
        if proc:
            r["cpu_us"] = (tree_cpu_seconds(proc.pid) - c0) / (r["requests"] + warm) * 1e6
        r["answered_rps"] = r["ok"] / r["elapsed_s"]
        r["sustained"] = (r["answered_rps"] >= 0.95 * rate and not r["errors"]
                          and pct(r, "p99") < 1_000_000)
        return r

    rows = []
    for rate in rates:
        res = {"direct": []} | {name: [] for name in fronts}
        for _ in range(reps):
            res["direct"].append(run(direct, rate, secs))
            for name, (proc, base) in fronts.items():
                if rate <= most[name]:
                    res[name].append(run(base, rate, secs, proc))
        d50, d99 = med([pct(r, "p50") for r in res["direct"]]), med([pct(r, "p99") for r in res["direct"]])
        for name in fronts:
            rs = res[name]
            if not rs:
                rows.append([rate, name, d50, d99, "-", "-", "-", "-", "-", "-", "-", "no (see the ladder)"])
                continue
            p50, p99 = med([pct(r, "p50") for r in rs]), med([pct(r, "p99") for r in rs])
            errors = sum(sum(r["errors"].values()) for r in rs)
            rows.append([rate, name, d50, d99, p50, p99, p50 - d50, p99 - d99,
                         f"{med([r['cpu_us'] for r in rs]):.0f}",
                         f"{med([r['answered_rps'] for r in rs]):.0f}", errors,
                         "yes" if all(r["sustained"] for r in rs) else "no"])
    out = table("HTTP front: added latency over the mock direct, cascade-router vs LiteLLM proxy "
                "(POST /v1/chat/completions, open loop, latency in µs, CPU per request of the whole proxy process)",
                ["offered req/s", "front", "direct p50", "direct p99", "front p50", "front p99",
                 "added p50", "added p99", "front CPU µs/req", "answered req/s", "errors", "sustained"], rows)
    ladders = {"cascade-router": [300] if b.smoke else [1000, 2500, 5000, 7500, 10000, 15000],
               "LiteLLM proxy": [50, 75, 100, 125, 150, 200]}
    ladder_rows, best = [], {}
    for name, (proc, base) in fronts.items():
        for rate in ladders[name]:
            r = run(base, rate, 0.5 if b.smoke else 3, proc)
            ladder_rows.append([name, rate, f"{r['answered_rps']:.0f}", pct(r, "p50"), pct(r, "p99"),
                                sum(r["errors"].values()), "yes" if r["sustained"] else "no"])
            if not r["sustained"]:
                break
            best[name] = rate
    b.stop_all()
    title = "Highest sustained rate (answered ≥ 95% of offered, no errors, p99 < 1 s; 3 s per rung, stops at the first miss)"
    if len(best) == 2:
        title += f": cascade-router {best['cascade-router']} req/s = {best['cascade-router'] / best['LiteLLM proxy']:.0f}x LiteLLM's {best['LiteLLM proxy']}"
    return out + "\n" + table(title, ["front", "offered req/s", "answered req/s", "p50 µs", "p99 µs", "errors", "sustained"], ladder_rows)


def operator(b):
    """The status page's weight, and router CPU per request at 1k req/s with health checks and
    a page open (its 1 s poll of /api/status) against neither, in the same run."""
    mocks = [b.mock() for _ in range(3)]
    plain = "".join(openai_provider(f"p{i}", f"http://127.0.0.1:{port}/v1", "    priority: %d\n" % (i + 1))
                    for i, (_, port) in enumerate(mocks))
    checked = "".join(openai_provider(f"p{i}", f"http://127.0.0.1:{port}/v1",
                                      "    priority: %d\n    health_check: {interval_seconds: 1}\n" % (i + 1))
                      for i, (_, port) in enumerate(mocks))
    fronts = {}
    for name, providers in [("no health checks, no page", plain), ("health checks every 1 s on 3 providers, page open", checked)]:
        hport = free_port()
        router, rport = b.router(providers, cascade_yaml=f"server: {{http_listen: \"127.0.0.1:{hport}\"}}\ncascade:\n  max_retries_per_provider: 0\n")
        wait_port(hport, router)
        fronts[name] = (router, rport, hport)
    weight = {}
    _, _, hport = next(iter(fronts.values()))
    for path in ["/status", "/status/page.js", "/status/page.css"]:
        with urllib.request.urlopen(f"http://127.0.0.1:{hport}{path}") as r:
            weight[path] = len(r.read())
    with urllib.request.urlopen(f"http://127.0.0.1:{hport}/api/status") as r:
        weight["/api/status (3 providers, each poll)"] = len(r.read())
    stop = threading.Event()

    def page(port):
        while not stop.wait(1.0):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/api/status").read()
            except OSError:
                pass
    poller = threading.Thread(target=page, args=(fronts["health checks every 1 s on 3 providers, page open"][2],), daemon=True)
    poller.start()
    rate = 200 if b.smoke else 1000
    reps, secs = (1, 0.5) if b.smoke else (5, 5)
    common = ["-c", 256, "--connections", 8, "--warmup", 200, "-d", DATA, "--rate", rate, "--duration", secs]
    cpu = {name: [] for name in fronts}
    p50 = {name: [] for name in fronts}
    for _ in range(reps):
        for name, (router, rport, _) in fronts.items():
            c0 = cpu_seconds(router.pid)
            r = b.load("--addr", f"127.0.0.1:{rport}", *common)
            cpu[name].append((cpu_seconds(router.pid) - c0) / (r["requests"] + 200) * 1e6)
            p50[name].append(pct(r, "p50"))
    stop.set()
    b.stop_all()
    rows = [[name, f"{med(cpu[name]):.1f}", f"{min(cpu[name]):.1f}–{max(cpu[name]):.1f}", med(p50[name])] for name in fronts]
    base, other = (med(cpu[n]) for n in fronts)
    out = table(f"Operator: router CPU per request at {rate} req/s (open loop, {reps} alternated runs of {secs} s); "
                f"with checks and the page {other / base:.2f}× the CPU",
                ["router", "CPU µs/req (median)", "range", "p50 µs"], rows)
    out += "\n" + table("The status page's weight (bytes, uncompressed, embedded in the binary)",
                         ["asset", "bytes"], [[k, v] for k, v in weight.items()])
    return out


def endpoints(b):
    """A provider with three replicas, one ten times slower: least_outstanding and round_robin
    against the single fast replica alone (closed loop, throughput, p99, where requests went)."""
    fast = [b.mock("--latency-ms", 20, "--concurrency", 4) for _ in range(2)]
    slow = b.mock("--latency-ms", 200, "--concurrency", 4)
    url = lambda port: f"\"http://127.0.0.1:{port}/v1\""
    three = ", ".join(url(p) for _, p in [slow, *fast])

    def provider(endpoints, balance):
        return (f"  - name: replicas\n    type: openai\n    endpoints: [{endpoints}]\n"
                f"    balance: {balance}\n    models: [m]\n    max_concurrency: 64\n")
    routers = {
        "one fast endpoint": b.router(provider(url(fast[0][1]), "least_outstanding")),
        "3 endpoints (1 slow), least_outstanding": b.router(provider(three, "least_outstanding")),
        "3 endpoints (1 slow), round_robin": b.router(provider(three, "round_robin")),
    }
    reps, secs = (1, 0.5) if b.smoke else (3, 5)
    common = ["-c", 24, "--connections", 4, "--warmup", 50, "-d", DATA, "--duration", secs]
    ports = [p for _, p in [slow, *fast]]
    res = {name: [] for name in routers}
    sent = {name: [0, 0] for name in routers}
    for _ in range(reps):
        for name, (_, rport) in routers.items():
            before = [mock_stats(p)["requests"] for p in ports]
            res[name].append(b.load("--addr", f"127.0.0.1:{rport}", *common))
            after = [mock_stats(p)["requests"] for p in ports]
            d = [a - x for a, x in zip(after, before)]
            sent[name][0] += d[0]
            sent[name][1] += d[1] + d[2]
    b.stop_all()
    base = med([r["throughput_rps"] for r in res["one fast endpoint"]])
    rows = []
    for name, runs in res.items():
        tput = med([r["throughput_rps"] for r in runs])
        s_, f_ = sent[name]
        share = f"{f_ / (s_ + f_):.0%}" if name != "one fast endpoint" else "–"
        rows.append([name, f"{tput:.0f}", f"{tput / base:.2f}", med([pct(r, "p50") for r in runs]),
                     med([pct(r, "p99") for r in runs]), share,
                     sum(sum(r["errors"].values()) for r in runs)])
    return table("Endpoints: 24 callers, each replica 4 requests at a time, fast 20 ms, slow 200 ms "
                 f"({reps} × {secs} s alternating, medians)",
                 ["router", "req/s", "× one endpoint", "p50 µs", "p99 µs", "to the fast replicas", "errors"], rows)


def start_redis():
    """A real redis-server on a free loopback port: (process, port)."""
    port = free_port()
    redis = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                              "--appendonly", "no"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_port(port, redis)
    return redis, port


def fleet(b):
    """A fleet's shared limits: the latency a limit decided in Redis adds over a local one (open
    loop, 1k req/s), throughput from one to three router processes sharing a limit, and the
    balancing policies over eight replicas of unequal speed (throughput, p99, prefix-cache hits)."""
    redis, rport = start_redis()
    try:
        return fleet_limits(b, rport) + "\n" + fleet_routers(b, rport) + "\n" + fleet_balance(b)
    finally:
        b.stop_all()
        redis.terminate()
        redis.wait()


def fleet_limits(b, rport):
    mock, mport = b.mock()
    shared = f"fleet: {{routers: 1, redis_url: \"redis://127.0.0.1:{rport}\"}}\n"
    # Limits far above the offered rate, so only their cost shows.
    limit = "    rate_limit: {requests_per_minute: 60000000}\n"
    quotas = "server: {quotas: {requests_per_minute: 60000000}}\n"
    # A lease is at most half a router's share of the burst: with a million routers in the
    # fleet, one cell, so every call decides in Redis.
    one_cell = f"fleet: {{routers: 1000000, redis_url: \"redis://127.0.0.1:{rport}\"}}\n"
    base = "cascade:\n  max_retries_per_provider: 0\n"
    provider = lambda extra: openai_provider("mock", f"http://127.0.0.1:{mport}/v1", extra)
    routers = {
        "no limit": b.router(provider(""), base),
        "provider rate_limit, local": b.router(provider(limit), base),
        "provider rate_limit, fleet (leased)": b.router(provider(limit), shared + base),
        "client quota, fleet (leased)": b.router(provider(""), shared + quotas + base),
        "client quota, fleet, lease of 1 (Redis every call)": b.router(provider(""), one_cell + quotas + base),
    }
    reps, secs, rate = (1, 0.5, 200) if b.smoke else (3, 5, 1000)
    res = {name: [] for name in routers}
    for _ in range(reps):
        for name, (_, port) in routers.items():
            res[name].append(b.load("--addr", f"127.0.0.1:{port}", "-c", 64, "--rate", rate,
                                    "--duration", secs, "--warmup", 100, "-d", DATA))
    for _, (p, _) in routers.items():
        b.stop(p)
    b.stop(mock)
    p50 = {n: med([pct(r, "p50") for r in runs]) for n, runs in res.items()}
    p99 = {n: med([pct(r, "p99") for r in runs]) for n, runs in res.items()}
    rows = [[n, f"{p50[n]:.0f}", f"{p99[n]:.0f}", f"{p50[n] - p50['no limit']:+.0f}",
             f"{p99[n] - p99['no limit']:+.0f}", sum(sum(r["errors"].values()) for r in runs)]
            for n, runs in res.items()]
    return table(f"Fleet limits: latency through one router at {rate} req/s against an instant mock "
                 f"({reps} × {secs} s alternating, medians; µs)",
                 ["limit", "p50", "p99", "added p50", "added p99", "errors"], rows)


def fleet_routers(b, rport):
    """Closed-loop throughput of 1, 2 and 3 router processes sharing one Redis and one provider
    (1 ms, unlimited slots), 192 callers split over the routers, each its own load process: the
    routers, not the provider, are the bottleneck."""
    mock, mport = b.mock("--latency-ms", 1)
    shared = f"fleet: {{routers: 3, redis_url: \"redis://127.0.0.1:{rport}\"}}\ncascade:\n  max_retries_per_provider: 0\n"
    limit = "    rate_limit: {requests_per_minute: 60000000}\n"
    routers = [b.router(openai_provider("mock", f"http://127.0.0.1:{mport}/v1", limit), shared)
               for _ in range(3)]
    reps, secs, callers = (1, 0.5, 12) if b.smoke else (3, 5, 192)
    res = {n: [] for n in (1, 2, 3)}
    for _ in range(reps):
        for n in res:
            cmd = lambda port: [b.tools, "load", "--json", "--addr", f"127.0.0.1:{port}", "-c", str(callers // n),
                                "--duration", str(secs), "--warmup", "50", "-d", DATA]
            procs = [subprocess.Popen(cmd(port), stdout=subprocess.PIPE, text=True) for _, port in routers[:n]]
            reports = [json.loads(p.communicate(timeout=600)[0]) for p in procs]
            res[n].append((sum(r["throughput_rps"] for r in reports), max(pct(r, "p99") for r in reports),
                           sum(sum(r["errors"].values()) for r in reports)))
    for p, _ in routers:
        b.stop(p)
    b.stop(mock)
    one = med([t for t, _, _ in res[1]])
    rows = [[n, f"{med([t for t, _, _ in runs]):.0f}", f"{med([t for t, _, _ in runs]) / one:.2f}",
             f"{med([p for _, p, _ in runs]):.0f}", sum(e for _, _, e in runs)] for n, runs in res.items()]
    return table(f"Fleet throughput: {callers} callers over 1–3 router processes sharing a provider limit in "
                 f"Redis, mock 1 ms ({reps} × {secs} s alternating, medians; all on this machine's 2 cores)",
                 ["routers", "req/s", "× one router", "p99 µs", "errors"], rows)


def fleet_balance(b):
    """Eight replicas of unequal speed (10 to 160 ms, 4 requests at a time each), 32 callers whose
    prompts share one of 8 prefixes of 1 KiB: each balancing policy's throughput, p99 and the share
    of prompts that found their prefix in the replica's prefix / KV cache (room for 2 prefixes)."""
    speeds = [10, 10, 20, 20, 40, 40, 80, 160]
    # Each replica's prefix cache holds two of the eight prefixes.
    mocks = [b.mock("--latency-ms", ms, "--concurrency", 4, "--prefix-cache", 2) for ms in speeds]
    urls = ", ".join(f"\"http://127.0.0.1:{p}/v1\"" for _, p in mocks)
    provider = lambda balance: (f"  - name: replicas\n    type: openai\n    endpoints: [{urls}]\n"
                                f"    balance: {balance}\n    models: [m]\n    max_concurrency: 64\n"
                                f"    batching: {{mode: fixed, max_batch_size: 1}}\n")
    policies = ["least_outstanding", "round_robin", "prefix_affinity"]
    routers = {p: b.router(provider(p)) for p in policies}
    reps, secs = (1, 0.5) if b.smoke else (3, 5)
    data = json.dumps({"model": "m", "prompt": "task {{n}}", "prefix_groups": 8})
    res = {p: [] for p in policies}
    for _ in range(reps):
        for p, (_, port) in routers.items():
            before = [mock_stats(m) for _, m in mocks]
            r = b.load("--addr", f"127.0.0.1:{port}", "-c", 32, "--duration", secs, "--warmup", 0, "-d", data)
            after = [mock_stats(m) for _, m in mocks]
            items = sum(a["items"] - x["items"] for a, x in zip(after, before))
            hits = sum(a["prefix_hits"] - x["prefix_hits"] for a, x in zip(after, before))
            res[p].append((r, hits / max(items, 1)))
    b.stop_all()
    rows = [[p, f"{med([r['throughput_rps'] for r, _ in runs]):.0f}", f"{med([pct(r, 'p50') for r, _ in runs]):.0f}",
             f"{med([pct(r, 'p99') for r, _ in runs]):.0f}", f"{med([h for _, h in runs]):.0%}",
             sum(sum(r["errors"].values()) for r, _ in runs)] for p, runs in res.items()]
    return table(f"Balancing: 8 replicas (10, 10, 20, 20, 40, 40, 80, 160 ms; 4 at a time each), 32 callers, "
                 f"8 prompt prefixes of 1 KiB, each replica's prefix cache holding 2 ({reps} × {secs} s alternating, medians)",
                 ["balance", "req/s", "p50 µs", "p99 µs", "prefix hits", "errors"], rows)


def table(title, header, rows):
    out = [f"#### {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(out) + "\n"


def budget(b):
    """What spend tracking costs on the hot path (#31): latency and router CPU per call at 1k
    req/s (open loop) against an instant mock, for a free model, a priced one (ledger only),
    a priced one under budgets kept in memory, and under budgets kept in Redis (a reservation
    decided there every call, settled behind the answer)."""
    redis, rport = start_redis()
    try:
        mock, mport = b.mock()
        base = f"http://127.0.0.1:{mport}/v1"
        model = lambda price: ("{name: m, price: {input_per_million: 0.15, output_per_million: 0.6}}"
                               if price else "m")
        provider = lambda price, extra="": (f"  - name: mock\n    type: openai\n    base_url: \"{base}\"\n"
                                            f"    models: [{model(price)}]\n    max_concurrency: 20000\n{extra}")
        cascade = "cascade:\n  max_retries_per_provider: 0\n"
        # Budgets far above what the run spends, so only their cost shows.
        budgets = "cost_tracking: {budget_daily_usd: 100000}\n"
        own = "    budget: {daily_usd: 100000}\n"
        shared = f"fleet: {{routers: 1, redis_url: \"redis://127.0.0.1:{rport}\"}}\n"
        routers = {
            "free model": b.router(provider(False), cascade),
            "priced, ledger only": b.router(provider(True), cascade),
            "priced, 2 budgets in memory": b.router(provider(True, own), budgets + cascade),
            "priced, 2 budgets in Redis": b.router(provider(True, own), shared + budgets + cascade),
        }
        reps, secs, rate = (1, 0.5, 200) if b.smoke else (3, 5, 1000)
        res = {name: [] for name in routers}
        cpu = {name: [] for name in routers}
        for _ in range(reps):
            for name, (proc, port) in routers.items():
                c0 = cpu_seconds(proc.pid)
                r = b.load("--addr", f"127.0.0.1:{port}", "-c", 64, "--rate", rate,
                           "--duration", secs, "--warmup", 100, "-d", DATA)
                cpu[name].append((cpu_seconds(proc.pid) - c0) / (r["requests"] + 100) * 1e6)
                res[name].append(r)
        b.stop_all()
        p50 = {n: med([pct(r, "p50") for r in runs]) for n, runs in res.items()}
        p99 = {n: med([pct(r, "p99") for r in runs]) for n, runs in res.items()}
        rows = [[n, f"{p50[n]:.0f}", f"{p99[n]:.0f}", f"{p50[n] - p50['free model']:+.0f}",
                 f"{p99[n] - p99['free model']:+.0f}", f"{med(cpu[n]):.1f}",
                 sum(sum(r["errors"].values()) for r in runs)] for n, runs in res.items()]
        return table(f"Budgets: latency and router CPU per call at {rate} req/s against an instant mock "
                     f"({reps} × {secs} s alternating, medians; µs)",
                     ["spend tracking", "p50", "p99", "added p50", "added p99", "CPU µs/call", "errors"], rows)
    finally:
        b.stop_all()
        redis.terminate()
        redis.wait()


SCENARIOS = {"overhead": overhead, "ceiling": ceiling, "pooling": pooling, "memory": memory,
             "batching": batching, "window": window, "adaptive": adaptive, "agent_loop": agent_loop, "agent_cli": agent_cli,
             "http_front": http_front, "callgrind": callgrind, "overload": overload, "soak": soak, "real": real,
             "payloads": payloads, "redis_stall": redis_stall, "memory_rounds": memory_rounds,
             "operator": operator, "endpoints": endpoints, "fleet": fleet,
             "budget": budget}


def machine():
    model = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            model = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    return (f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, commit {commit or '?'}, "
            f"{os.cpu_count()} × {model}, {platform.system()} {platform.release()}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("scenarios", nargs="*", default=["all"], help="all, or any of " + ", ".join(SCENARIOS))
    ap.add_argument("--smoke", action="store_true", help="tiny counts, to check the scripts work")
    ap.add_argument("--bin", default=os.path.join(ROOT, "target", "release", "cascade-router"))
    ap.add_argument("--old-bin", help="a router binary of an earlier commit, run beside --bin as "
                    "'old adaptive' in the adaptive and real scenarios")
    args = ap.parse_args()
    names = list(SCENARIOS) if "all" in args.scenarios else args.scenarios
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        ap.error(f"unknown scenario(s): {', '.join(unknown)}")
    b = Bench(args.bin, args.smoke, args.old_bin)
    for exe in (b.bin, b.tools):
        if not os.access(exe, os.X_OK):
            ap.error(f"{exe} is not an executable; run cargo build --release --workspace first")
    print(f"_{machine()}; `python3 benches/scenarios.py {' '.join(sys.argv[1:])}`_\n", flush=True)
    try:
        for name in names:
            print(SCENARIOS[name](b), flush=True)
    finally:
        b.stop_all()


if __name__ == "__main__":
    main()
