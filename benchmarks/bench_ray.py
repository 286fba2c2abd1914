"""Ray Serve scale-out benchmark on a local cluster: throughput and p95 latency with 1 and 2
replicas, and the adapter-affinity hit rate (requests whose adapters were already resident on
the replica that admitted them) with multiplexed routing against Ray's default routing.

Zipf (s=1.1) popularity over 16 demo LoRAs; each replica holds at most ``--resident``
adapters (LRU), so where a request lands matters. Closed loop over HTTP, ``--clients``
clients, ``--requests`` requests per configuration, the demo pipeline at ``--size``.

    python benchmarks/bench_ray.py [--requests 48 --clients 8 --resident 4]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_serve import workload  # noqa: E402

from lorakernels.serve import demo  # noqa: E402


def run_config(url, reqs, clients):
    import httpx

    lat, hits, replicas, statuses = [], [], [], []
    lock = threading.Lock()

    def client(c):
        with httpx.Client(timeout=600) as http:
            for i in range(c, len(reqs), clients):
                t0 = time.perf_counter()
                r = http.post(url + "/sdapi/v1/txt2img", json=reqs[i])
                dt = time.perf_counter() - t0
                with lock:
                    statuses.append(r.status_code)
                    if r.status_code == 200:
                        lk = json.loads(r.json()["info"])["lorakernels"]
                        lat.append(dt)
                        hits.append(lk["adapters_were_resident"])
                        replicas.append(lk["replica"])

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    return {
        "images_per_s": len(lat) / wall,
        "p50_s": statistics.median(lat),
        "p95_s": float(np.percentile(lat, 95)),
        "hit_rate": sum(hits) / max(1, len(hits)),
        "per_replica": {r: replicas.count(r) for r in sorted(set(replicas))},
        "non_200": len(statuses) - statuses.count(200),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--requests", type=int, default=48)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--resident", type=int, default=4)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--demo-dir", type=Path, default=None)
    args = p.parse_args()

    import ray
    from ray import serve

    from lorakernels.serve.ray import build_app

    model, loras = demo.build(args.demo_dir, n_loras=16)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    url = f"http://127.0.0.1:{port}"
    reqs = [
        {
            "prompt": f"<lora:{name}:1> a cat",
            "seed": seed,
            "steps": args.steps,
            "width": args.size,
            "height": args.size,
            "sampler_name": "Euler a",
        }
        for name, seed in workload(args.requests, "zipf", seed=1)
    ]
    rows = []
    for replicas, affinity in ((1, True), (2, True), (2, False)):
        app = build_app(
            str(model),
            [str(loras)],
            model_name="demo",
            replicas=replicas,
            replica_cpus=1,
            affinity=affinity,
            max_models_per_replica=args.resident,
            server_kwargs={"max_batch_rows": 16, "max_resident_adapters": args.resident},
        )
        serve.run(app, name="lk", route_prefix="/")
        run_config(url, reqs[: args.clients], args.clients)  # warm-up
        res = run_config(url, reqs, args.clients)
        res.update(replicas=replicas, routing="adapter affinity" if affinity else "default")
        rows.append(res)
        print(json.dumps(res), flush=True)
        serve.delete("lk")
    serve.shutdown()
    ray.shutdown()
    print(
        f"\n# local Ray cluster (num_cpus=2), load {os.getloadavg()[0]:.1f}, {args.requests} "
        f"zipf requests over 16 LoRAs from {args.clients} clients, {args.size}x{args.size}, "
        f"{args.steps} steps, {args.resident} resident adapters per replica"
    )
    print("| replicas | routing | images/s | p50 s | p95 s | adapters already resident |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['replicas']} | {r['routing']} | {r['images_per_s']:.2f} | {r['p50_s']:.2f} "
            f"| {r['p95_s']:.2f} | {r['hit_rate']:.0%} |"
        )


if __name__ == "__main__":
    main()
