"""Serving benchmark: images/s and latency of the continuous-batching server against
(a) diffusers sequential per request (PEFT ``load_lora_weights`` once per adapter, then
``set_adapters`` + one pipeline call per request, one request at a time: the usual
single-pipeline server) and (b) our server restricted to batch only requests that share an
adapter (``mixed_adapters=False``: what servers that co-batch by adapter do).

Closed loop: ``C`` clients each send their share of ``R`` requests back to back; adapters are
drawn over 16 LoRA files with ``distinct`` (round robin) or ``zipf`` (s=1.1) popularity. All
providers run the same requests (prompt, adapter, seed, steps, size, sampler) in one process,
interleaved per configuration. Correctness first: ours and (a) must give the same image for
the first request of each configuration.

    python benchmarks/bench_serve.py [--clients 1 4 16] [--requests 32] [--steps 8] [--size 64]
    python benchmarks/bench_serve.py --load-test 200      # loopback HTTP load test
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import queue
import re
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lorakernels.serve import demo  # noqa: E402
from lorakernels.serve.server import DiffusionServer, GenerationRequest  # noqa: E402

N_ADAPTERS = 16
TAG = re.compile(r"<lora:([^:>]+):([^>]+)>\s*")


def workload(n: int, popularity: str, seed: int = 0) -> list[tuple[str, int]]:
    """``n`` (adapter name, seed) pairs."""
    names = demo.lora_names(N_ADAPTERS)
    rng = np.random.default_rng(seed)
    if popularity == "distinct":
        picks = [i % N_ADAPTERS for i in range(n)]
    else:
        p = 1.0 / np.arange(1, N_ADAPTERS + 1) ** 1.1
        picks = list(rng.choice(N_ADAPTERS, size=n, p=p / p.sum()))
    return [(names[k], 1000 + i) for i, k in enumerate(picks)]


def make_request(name: str, seed: int, args) -> GenerationRequest:
    return GenerationRequest(
        f"<lora:{name}:1> a cat",
        steps=args.steps,
        seed=seed,
        width=args.size,
        height=args.size,
        sampler="Euler a",
        guidance_scale=7.0,
    )


class Sequential:
    """Baseline (a): one diffusers pipeline, PEFT adapters, one request at a time."""

    def __init__(self, model_dir: Path, lora_dir: Path) -> None:
        from diffusers import EulerAncestralDiscreteScheduler

        self.pipe = demo.load_pipeline(model_dir)
        self.pipe.scheduler = EulerAncestralDiscreteScheduler.from_config(
            self.pipe.scheduler.config
        )
        for name in demo.lora_names(N_ADAPTERS):
            self.pipe.load_lora_weights(str(lora_dir / f"{name}.safetensors"), adapter_name=name)
        self.jobs: queue.Queue = queue.Queue()
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        while True:
            req, fut, loop = self.jobs.get()
            try:
                tags = TAG.findall(req.prompt)
                self.pipe.set_adapters([n for n, _ in tags], [float(w) for _, w in tags])
                out = self.pipe(
                    TAG.sub("", req.prompt),
                    num_inference_steps=req.steps,
                    guidance_scale=req.guidance_scale,
                    height=req.height,
                    width=req.width,
                    generator=torch.Generator().manual_seed(req.seed),
                    output_type="np",
                ).images[0]
                loop.call_soon_threadsafe(fut.set_result, out)
            except Exception as exc:  # noqa: BLE001 - reported to the client
                loop.call_soon_threadsafe(fut.set_exception, exc)

    async def submit(self, req: GenerationRequest):
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self.jobs.put((req, fut, loop))
        return await fut


class Ours:
    def __init__(self, model_dir: Path, lora_dir: Path, mixed: bool, rows: int) -> None:
        self.server = DiffusionServer(
            demo.load_pipeline(model_dir), [lora_dir], max_batch_rows=rows, mixed_adapters=mixed
        ).start()
        # adapters resident before timing, as in (a)
        self.server.batcher.handle.ensure_loaded(demo.lora_names(N_ADAPTERS))

    async def submit(self, req: GenerationRequest):
        return (await self.server.submit(req)).images[0]


async def closed_loop(provider, reqs: list[GenerationRequest], clients: int):
    lat: list[float] = []
    images: dict[int, np.ndarray] = {}

    async def client(c: int) -> None:
        for i in range(c, len(reqs), clients):
            t0 = time.perf_counter()
            images[i] = await provider.submit(reqs[i])
            lat.append(time.perf_counter() - t0)

    t0 = time.perf_counter()
    await asyncio.gather(*(client(c) for c in range(clients)))
    wall = time.perf_counter() - t0
    return wall, lat, images


def bench(args) -> None:
    torch.set_num_threads(args.threads)
    model_dir, lora_dir = demo.build(args.demo_dir, n_loras=N_ADAPTERS)
    providers = {
        "ours": Ours(model_dir, lora_dir, mixed=True, rows=args.max_batch_rows),
        "same-adapter batches (b)": Ours(
            model_dir, lora_dir, mixed=False, rows=args.max_batch_rows
        ),
        "diffusers sequential (a)": Sequential(model_dir, lora_dir),
    }
    rows = []
    for popularity in args.popularity:
        for clients in args.clients:
            n = max(args.requests, clients)
            reqs = [make_request(a, s, args) for a, s in workload(n, popularity)]
            runs: dict[str, list] = {name: [] for name in providers}
            for prov in providers.values():
                asyncio.run(closed_loop(prov, reqs[:1], 1))  # warm-up
            for _ in range(args.repeats):  # providers interleaved: the machine's load drifts
                for name, prov in providers.items():
                    runs[name].append(asyncio.run(closed_loop(prov, reqs, clients)))
            for name, rs in runs.items():
                rows.append(
                    {
                        "popularity": popularity,
                        "clients": clients,
                        "provider": name,
                        "requests": n,
                        "repeats": args.repeats,
                        "images_per_s": statistics.median(n / w for w, _, _ in rs),
                        "p50_s": statistics.median(statistics.median(lat) for _, lat, _ in rs),
                        "p95_s": statistics.median(
                            float(np.percentile(lat, 95)) for _, lat, _ in rs
                        ),
                    }
                )
                print(json.dumps(rows[-1]), flush=True)
            a, b = runs["ours"][0][2][0], runs["diffusers sequential (a)"][0][2][0]
            diff = np.abs(a - b).max()
            print(f"# check: ours vs diffusers+PEFT, request 0: max |diff| {diff:.2e}", flush=True)
    print_table(rows, args)


def print_table(rows, args) -> None:
    print(
        f"\n# {platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"{args.threads} thread(s), load {os.getloadavg()[0]:.1f}, {args.size}x{args.size}, "
        f"median of {args.repeats} interleaved rounds, "
        f"{args.steps} steps Euler a, cfg 7, max_batch_rows {args.max_batch_rows}"
    )
    print("| popularity | clients | provider | images/s | p50 s | p95 s | ours / this |")
    print("|---|---|---|---|---|---|---|")
    ours = {
        (r["popularity"], r["clients"]): r["images_per_s"] for r in rows if r["provider"] == "ours"
    }
    for r in rows:
        ratio = ours[(r["popularity"], r["clients"])] / r["images_per_s"]
        print(
            f"| {r['popularity']} | {r['clients']} | {r['provider']} | {r['images_per_s']:.2f} "
            f"| {r['p50_s']:.2f} | {r['p95_s']:.2f} | {ratio:.2f}x |"
        )


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return -1


def load_test(args) -> None:
    """``args.load_test`` requests from 16 clients against ``lorakernels serve --demo`` on
    loopback: every request answered once with its own seed, RSS sampled along the way."""
    import socket

    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(args.threads)}
    cmd = [
        sys.executable,
        "-m",
        "lorakernels",
        "serve",
        "--demo",
        "--port",
        str(port),
        "--max-batch-rows",
        str(args.max_batch_rows),
        "--log-level",
        "warning",
    ]
    if args.demo_dir:
        cmd += ["--demo-dir", str(args.demo_dir)]
    proc = subprocess.Popen(cmd, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        while True:
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        names = demo.lora_names(4)
        total, clients = args.load_test, 16
        answers: dict[int, list[int]] = {}
        statuses: list[int] = []
        rss = [rss_kib(proc.pid)]
        lock = threading.Lock()

        def client(c: int) -> None:
            with httpx.Client(timeout=300) as http:
                for i in range(c, total, clients):
                    body = {
                        "prompt": f"<lora:{names[i % 4]}:1> a cat",
                        "seed": 10_000 + i,
                        "steps": args.steps,
                        "width": 32,
                        "height": 32,
                    }
                    r = http.post(url + "/sdapi/v1/txt2img", json=body)
                    with lock:
                        statuses.append(r.status_code)
                        if r.status_code == 200:
                            seed = json.loads(r.json()["info"])["seed"]
                            answers.setdefault(i, []).append(seed)
                        if len(statuses) % 50 == 0:
                            rss.append(rss_kib(proc.pid))

        t0 = time.perf_counter()
        threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
        rss.append(rss_kib(proc.pid))
        wrong = [i for i, s in answers.items() if s != [10_000 + i]]
        print(
            json.dumps(
                {
                    "requests": total,
                    "answered_200": statuses.count(200),
                    "other_status": sorted(set(statuses) - {200}),
                    "missing": total - len(answers),
                    "duplicated_or_wrong_seed": len(wrong),
                    "wall_s": round(wall, 1),
                    "images_per_s": round(total / wall, 2),
                    "rss_mib": [round(r / 1024) for r in rss],
                }
            )
        )
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--popularity", nargs="+", default=["distinct", "zipf"])
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--max-batch-rows", type=int, default=32)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3, help="interleaved rounds; medians")
    p.add_argument("--demo-dir", type=Path, default=None)
    p.add_argument("--load-test", type=int, default=0, help="loopback HTTP load test of N")
    args = p.parse_args()
    if args.load_test:
        load_test(args)
    else:
        bench(args)


if __name__ == "__main__":
    main()
