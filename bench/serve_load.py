"""`hemaclip serve` under load, beside `hemaclip describe` on the same images in the same run (issue 15).

* describe: ``Describer.describe_paths`` on N PBC test images (seeded sample), the way the CLI runs it
  (shipped model, default reference index, batch 64), in this process while the server idles.
* serve: the installed ``hemaclip serve --no-saliency`` in its own process on a free loopback port; the
  same N images POSTed to /api/describe by ``concurrency`` clients at once (1, 8, 32): requests/s,
  latency p50/p99, the server's CPU time per request and the images per model batch. Concurrency 32 runs
  in rounds, each between two describe runs; the median ratio of the rounds is the issue's target
  (>= 0.70). CPU time per image (server vs describe) is reported too: on a shared machine it moves far
  less with other jobs than wall-clock rates do.
* hostile: concurrency 32 again with hostile uploads sent at the same time (8 pixel bombs of 7999x7999,
  the issue's 203 KB PNGs; 4 camera fields of 4000x3000, the largest accepted; 4 bodies over the byte
  limit; 4 of 9.5 MB read in full, then refused; 4 truncated JPEGs): the status each got, and the server's peak resident memory (VmHWM from
  /proc, the whole process from start to end) must stay under 2 GB.

Writes bench/results/serve_load.json.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from datetime import date
from pathlib import Path

import numpy as np

from bench.machine import machine_info

from hemaclip.data.datasets import load_dataset
from hemaclip.io import write_json

RSS_LIMIT_MIB = 2048
TARGET_RATIO = 0.70


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def memory_mib(pid: int) -> dict[str, float]:
    """Current (VmRSS) and peak (VmHWM) resident memory of a process, from /proc (Linux)."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = round(int(value.split()[0]) / 1024, 1)
    return out


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (all its threads), from /proc/PID/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def hostile_uploads() -> list[tuple[str, bytes, str]]:
    """(kind, body, content type) of the hostile mix."""
    from PIL import Image

    def png(image: Image.Image) -> bytes:
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        return buffer.getvalue()

    bomb = png(Image.new("L", (7999, 7999), 200))
    ramp = np.linspace(0, 255, 4000, dtype=np.uint8)
    field = png(Image.fromarray(np.stack([np.tile(ramp, (3000, 1))] * 3 + [np.full((3000, 4000), 255, np.uint8)], -1), "RGBA"))
    records = load_dataset("pbc").split("val")
    truncated = Path(records[0].path).read_bytes()[:2000]
    noise = b"\xff\xd8\xff\xe0" + np.random.default_rng(0).bytes(int(9.5 * 2**20))
    return ([("pixel bomb 7999x7999 PNG", bomb, "image/png")] * 8 + [("camera field 4000x3000 RGBA PNG", field, "image/png")] * 4
            + [("body over the byte limit (12 MB)", b"\xff\xd8\xff" + b"\0" * (12 * 2**20), "image/jpeg")] * 4
            + [("body just under the byte limit (9.5 MB of noise after a JPEG header)", noise, "image/jpeg")] * 4
            + [("truncated JPEG", truncated, "image/jpeg")] * 4)


class Connection:
    """One keep-alive HTTP/1.1 connection driven by h11 over asyncio streams: the load generator. httpx cost
    about 4 ms of CPU per request on the 2 cores the server also runs on, more than the server's own
    HTTP work (1.7 ms with a no-op model); this costs a fraction of that, so the client takes less of
    the CPU it is measuring."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def post(self, target: str, body: bytes, content_type: str) -> tuple[int, bytes]:
        import h11

        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
            self.http = h11.Connection(h11.CLIENT)
        headers = [("Host", f"{self.host}:{self.port}"), ("Content-Type", content_type), ("Content-Length", str(len(body)))]
        self.writer.write(self.http.send(h11.Request(method="POST", target=target, headers=headers))
                          + self.http.send(h11.Data(data=body)) + self.http.send(h11.EndOfMessage()))
        status, chunks = 0, []
        while True:
            event = self.http.next_event()
            if event is h11.NEED_DATA:
                self.http.receive_data(await self.reader.read(1 << 16))
            elif isinstance(event, h11.Response):
                status = event.status_code
            elif isinstance(event, h11.Data):
                chunks.append(bytes(event.data))
            elif isinstance(event, (h11.EndOfMessage, h11.ConnectionClosed)):
                break
        if self.http.our_state is h11.DONE and self.http.their_state is h11.DONE:
            self.http.start_next_cycle()
        else:
            await self.close()
        return status, b"".join(chunks)

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


async def load(url: str, bodies: list[bytes], concurrency: int, extra: list[tuple[str, bytes, str]] = ()) -> dict:
    """POST every body once, `concurrency` at a time; `extra` (hostile) uploads go out at the start, beside them."""
    import httpx

    host, port = url.rsplit("//", 1)[1].split(":")
    latencies: list[float] = []
    answers: list[dict] = []  # the first answer, checked below: a 200 must carry a reading
    statuses: Counter = Counter()
    extra_statuses: dict[str, Counter] = {}
    queue: asyncio.Queue = asyncio.Queue()
    for body in bodies:
        queue.put_nowait(body)
    limits = httpx.Limits(max_connections=concurrency + len(extra), max_keepalive_connections=concurrency + len(extra))
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as client:

        async def worker() -> None:
            connection = Connection(host, port)
            while not queue.empty():
                body = queue.get_nowait()
                started = time.perf_counter()
                status, answer = await connection.post("/api/describe?saliency=false", body, "image/jpeg")
                latencies.append(time.perf_counter() - started)
                statuses[status] += 1
                if status == 200 and not answers:
                    answers.append(json.loads(answer))
            await connection.close()

        async def hostile(kind: str, body: bytes, content_type: str) -> None:
            try:
                response = await client.post("/api/describe?saliency=false", content=body, headers={"Content-Type": content_type})
                status = str(response.status_code)
            except httpx.HTTPError as exc:  # the server may close a connection whose body it refused
                status = type(exc).__name__
            extra_statuses.setdefault(kind, Counter())[status] += 1

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)), *(hostile(*item) for item in extra))
        elapsed = time.perf_counter() - started
    if answers and not {"label", "probability", "cells", "neighbours"} <= set(answers[0]):
        raise SystemExit(f"a 200 answer without a reading: {sorted(answers[0])}")
    ms = sorted(1000 * t for t in latencies)
    out = {
        "concurrency": concurrency,
        "requests": len(bodies),
        "seconds": round(elapsed, 2),
        "requests_per_second": round(len(bodies) / elapsed, 1),
        "p50_ms": round(statistics.median(ms), 1),
        "p99_ms": round(ms[min(len(ms) - 1, int(np.ceil(0.99 * len(ms))) - 1)], 1),
        "statuses": {str(k): v for k, v in statuses.items()},
    }
    if extra:
        out["hostile_statuses"] = {k: dict(v) for k, v in extra_statuses.items()}
    return out


def measured(url: str, pid: int, bodies: list[bytes], concurrency: int, extra: list[tuple[str, bytes, str]] = ()) -> dict:
    """One load phase, with the server's CPU time per request and the number of model batches it ran
    (from /api/health)."""
    import httpx

    def batches() -> int:
        return int(httpx.get(f"{url}/api/health", timeout=30).json()["describe_batches"]["recent"])

    before, cpu_before, client_before = batches(), cpu_seconds(pid), time.process_time()
    out = asyncio.run(load(url, bodies, concurrency, extra))
    out["server_cpu_ms_per_request"] = round(1000 * (cpu_seconds(pid) - cpu_before) / len(bodies), 1)
    out["client_cpu_ms_per_request"] = round(1000 * (time.process_time() - client_before) / len(bodies), 2)
    memory = memory_mib(pid)
    out["server_rss_mib_after"], out["server_peak_rss_mib_so_far"] = memory["VmRSS"], memory["VmHWM"]
    run = batches() - before
    out["model_batches"] = run
    out["mean_images_per_batch"] = round((len(bodies) + len(extra)) / run, 1) if run else None  # refused uploads included: an upper bound
    return out


def time_describe(describer, paths: list[Path], batch_size: int) -> tuple[float, float]:
    """Wall and CPU seconds (this process, all threads) of describing `paths`."""
    started, cpu = time.perf_counter(), time.process_time()
    described = list(describer.describe_paths(paths, batch_size=batch_size, progress=False))
    elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu
    assert sum(d.error is not None for d in described) == 0
    return elapsed, cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=256, help="images per phase")
    parser.add_argument("--concurrency", default="1,8,32")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of (serve at the highest concurrency, describe)")
    parser.add_argument("--batch-size", type=int, default=64, help="describe's batch size (the CLI default)")
    parser.add_argument("--shared-machine", default="yes: other engineers' jobs ran on the same 2 cores during this run",
                        help="a note on what else ran on the machine")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "serve_load.json")
    args = parser.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]
    top = max(levels)

    from hemaclip.tasks.describe import Describer

    records = sorted(load_dataset("pbc").split("test"), key=lambda r: str(r.path))
    pick = np.random.default_rng(0).choice(len(records), size=args.n, replace=False)
    paths = [Path(records[i].path) for i in sorted(pick)]
    bodies = [p.read_bytes() for p in paths]  # also warms the OS file cache for describe
    hostile = hostile_uploads()

    describer = Describer.from_checkpoint(None)
    describer.build_reference_index()
    time_describe(describer, paths[: args.batch_size], args.batch_size)  # warm-up
    describes = [time_describe(describer, paths, args.batch_size)]

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    entry_point = Path(sys.executable).parent / "hemaclip"
    log = tempfile.TemporaryFile(mode="w+")  # a file, not a pipe: a full pipe would stall the server
    server = subprocess.Popen([str(entry_point), "serve", "--no-saliency", "--port", str(port)],
                              stdout=subprocess.DEVNULL, stderr=log, text=True)
    result: dict = {
        "what": f"hemaclip serve (--no-saliency, its own process) vs hemaclip describe on the same {args.n} PBC test images "
                "(seeded sample), shipped model, default reference index, same run",
        "date": date.today().isoformat(),
        "machine_shared": args.shared_machine,
        "load_average_at_start": [round(v, 2) for v in os.getloadavg()],
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "n_images": args.n,
    }
    rounds = []
    try:
        import httpx

        deadline = time.time() + 600
        while True:
            try:
                if httpx.get(f"{url}/api/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if server.poll() is not None or time.time() > deadline:
                log.seek(0)
                raise SystemExit(f"the server did not start: {log.read()[-2000:]}")
            time.sleep(0.5)
        asyncio.run(load(url, bodies[:64], 8))  # warm-up
        result["server_rss_mib_after_warm_up"] = memory_mib(server.pid)["VmRSS"]
        phases = [measured(url, server.pid, bodies, c) for c in levels if c != top]
        # The highest concurrency in rounds, each between two describe runs (the server idles during
        # those), so a change in the machine's load between them hits both sides of a round's ratio.
        for _ in range(args.rounds):
            describes_before = describes[-1]
            serve = measured(url, server.pid, bodies, top)
            describes.append(time_describe(describer, paths, args.batch_size))
            describe_rate = args.n / ((describes_before[0] + describes[-1][0]) / 2)
            describe_cpu = 1000 * (describes_before[1] + describes[-1][1]) / 2 / args.n
            rounds.append({**serve, "describe_images_per_second": round(describe_rate, 1),
                           "describe_cpu_ms_per_image": round(describe_cpu, 1),
                           "throughput_ratio": round(serve["requests_per_second"] / describe_rate, 3),
                           "cpu_per_image_ratio": round(serve["server_cpu_ms_per_request"] / describe_cpu, 3)})
        with_hostile = measured(url, server.pid, bodies, top, hostile)
        health = httpx.get(f"{url}/api/health", timeout=10)
        memory = memory_mib(server.pid)
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()

    ratio = statistics.median(r["throughput_ratio"] for r in rounds)
    describe_rate = args.n / statistics.median(d[0] for d in describes)
    for phase in phases:
        phase["throughput_ratio_to_describe_median"] = round(phase["requests_per_second"] / describe_rate, 3)
    result.update({
        "describe": {
            "images_per_second_each_run": [round(args.n / d[0], 1) for d in describes],
            "cpu_ms_per_image_each_run": [round(1000 * d[1] / args.n, 1) for d in describes],
            "images_per_second_median": round(describe_rate, 1),
            "how": f"Describer.describe_paths, batch {args.batch_size}, in the benchmark's process while the server idled",
        },
        "serve": phases,
        f"serve_at_{top}_rounds": rounds,
        f"serve_to_describe_throughput_ratio_at_{top}": round(ratio, 3),
        "ratio_is": f"median over the rounds of serve requests/s at {top} over describe images/s of the describe runs around it",
        "target_ratio": TARGET_RATIO,
        "ratio_met": bool(ratio >= TARGET_RATIO),
        # CPU time per image depends far less on what else the shared machine runs: the cost of serving.
        f"serve_to_describe_cpu_per_image_ratio_at_{top}": round(statistics.median(r["cpu_per_image_ratio"] for r in rounds), 3),
        "with_hostile_uploads": with_hostile,
        "server_still_healthy_after": health.status_code == 200,
        "server_peak_rss_mib": memory["VmHWM"],
        "server_rss_mib_at_end": memory["VmRSS"],
        "rss_limit_mib": RSS_LIMIT_MIB,
        "rss_met": bool(memory["VmHWM"] < RSS_LIMIT_MIB),
        "load_average_at_end": [round(v, 2) for v in os.getloadavg()],
        "machine": machine_info(),
    })
    write_json(args.out, result)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
