"""Adapters beyond memory: folder scans, switch latency and a zipf-popular thousand adapters.

Three measurements (``--part scan|switch|many|all``), printed as a small table plus JSON
(``--json PATH``):

* ``scan``: ``AdapterLibrary.add_dir`` over 2,000 generated kohya files (headers only).
* ``switch``: the full-size SD1.5 UNet (random weights, built from SD1.5's config, no
  download) and the two real SD1.5 fixture files (``../shared/fixtures``; the third
  ``sd15_`` file is an SD2 LoRA).
  Ours: the time of entering ``use()`` with an adapter that is not resident, which reads,
  converts and writes it into the banks (``cold``: host cache off, the file is read;
  ``warm``: from the host cache), evicting the previous one (one resident slot). diffusers:
  ``lora_state_dict`` + ``load_lora_adapter`` + ``set_adapters`` on the same files (its cold
  path), and ``set_adapters`` among already-loaded adapters. The UNet forward that follows is
  the same for both and is not included.
* ``many``: ``--steps`` UNet steps of a small SD-like UNet (``--model``, default ``tiny``:
  SD1.5's block types at widths 32/64, 16×16 latents; ``sd15-small`` is 4× wider), each of 4
  samples drawing adapters from 1,000 generated files with zipf(1.0) popularity (a quarter of
  the samples mix two), with 32 resident slots and the next step's adapters prefetched while
  the current step runs; against the same steps with every adapter they use resident from
  the start. Step = ``use()`` + forward; outputs of the two
  runs are checked equal first.

The machine is shared: the load average is printed with the numbers; medians of interleaved
repeats are reported. On a loaded 2-core machine use ``--threads 1``: with 2 threads, torch's
intra-op workers stall each other (the tiny UNet step: 75 ms on 1 thread, 0.24-5 s on 2).

    PYTHONPATH=. python benchmarks/bench_adapters.py --part all --json results/adapters.json
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

import lorakernels
import lorakernels.diffusers
from lorakernels import AdapterLibrary
from lorakernels.bench.unet import MODELS

# the repository sits beside ../shared (pass --fixtures from a worktree elsewhere)
FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures"


def _load() -> str:
    one, five, _ = os.getloadavg()
    return f"load {one:.2f}/{five:.2f} (1/5 min) on {os.cpu_count()} cores"


def _attn_paths(unet) -> list[str]:
    return [
        n
        for n, m in unet.named_modules()
        if isinstance(m, torch.nn.Linear)
        and ".attn" in n
        and n.split(".")[-1] in ("to_q", "to_k", "to_v", "0")
    ]


def _write_kohya(folder: Path, count: int, unet, seed: int) -> list[str]:
    """``count`` kohya files over the attention layers of ``unet``, ranks 4-16."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = _attn_paths(unet)
    shapes = {p: unet.get_submodule(p).weight.shape for p in paths}
    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    names = []
    for i in range(count):
        r = rng.choice((4, 8, 16))
        sd = {}
        for p in paths:
            n_out, k = shapes[p]
            key = "lora_unet_" + p.replace(".", "_")
            sd[key + ".lora_down.weight"] = torch.randn(r, k, generator=g) / math.sqrt(k)
            sd[key + ".lora_up.weight"] = torch.randn(n_out, r, generator=g) / math.sqrt(r)
            sd[key + ".alpha"] = torch.tensor(float(r))
        name = f"gen_{i:04d}"
        save_file(sd, str(folder / f"{name}.safetensors"), metadata={"ss_output_name": name})
        names.append(name)
    return names


# ---------------------------------------------------------------------- scan
def bench_scan(count: int) -> dict:
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel(**MODELS["tiny"])
    with tempfile.TemporaryDirectory() as tmp:
        _write_kohya(Path(tmp), count, unet, seed=1)
        times = []
        for _ in range(3):
            lib = AdapterLibrary()
            t0 = time.perf_counter()
            names = lib.add_dir(tmp)
            times.append(time.perf_counter() - t0)
            assert len(names) == count
        size = sum(f.stat().st_size for f in Path(tmp).iterdir())
    return {"files": count, "bytes": size, "scan_s": statistics.median(times)}


# ---------------------------------------------------------------------- switch
def bench_switch(repeats: int, fixtures: Path) -> dict:
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    # the "sd15_unet_lora_bf16" fixture is an SD2 LoRA (1024-wide cross-attention): left out
    files = [fixtures / f"sd15_{n}.safetensors" for n in ("attnprocs_pokemon", "unet_lora_timo")]
    if not all(f.is_file() for f in files):
        raise SystemExit(f"switch: needs the SD1.5 fixture files in {fixtures}")
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**MODELS["sd15"]).eval().requires_grad_(False)
    out: dict = {"files": [f.name for f in files]}

    # diffusers: its own loading path on the same files, then switching among loaded ones
    cold = []
    for rep in range(repeats):
        for i, f in enumerate(files):
            name = f"d{rep}_{i}"
            t0 = time.perf_counter()
            sd, alphas = StableDiffusionPipeline.lora_state_dict(str(f))
            # what StableDiffusionPipeline.load_lora_weights does for the UNet
            prefix = "unet" if any(k.startswith("unet.") for k in sd) else None
            unet.load_lora_adapter(sd, prefix=prefix, network_alphas=alphas, adapter_name=name)
            unet.set_adapters([name])
            cold.append(time.perf_counter() - t0)
            if rep < repeats - 1:
                unet.delete_adapters([name])
    loaded = [f"d{repeats - 1}_{i}" for i in range(len(files))]
    warm = []
    for k in range(repeats * len(files)):
        t0 = time.perf_counter()
        unet.set_adapters([loaded[k % len(loaded)]])
        warm.append(time.perf_counter() - t0)
    out["diffusers_cold_ms"] = 1e3 * statistics.median(cold)
    out["diffusers_cold_min_ms"] = 1e3 * min(cold)
    out["diffusers_set_adapters_ms"] = 1e3 * statistics.median(warm)
    unet.unload_lora()
    assert not any("lora" in type(m).__name__.lower() for m in unet.modules())
    gc.collect()

    # ours: one resident slot, so every use() of another adapter evicts and loads
    def run(cache_bytes: int) -> list[float]:
        lib = AdapterLibrary(cache_bytes=cache_bytes)
        for f in files:
            lib.add(f.stem, f)
        lora = lorakernels.diffusers.patch(unet, library=lib, max_resident_adapters=1)
        with lora.use(unet=[{files[0].stem: 1.0}]):  # patch the layers, warm the code
            pass
        times = []
        for k in range(1, repeats * len(files) + 1):
            name = files[k % len(files)].stem
            t0 = time.perf_counter()
            with lora.use(unet=[{name: 1.0}]):
                times.append(time.perf_counter() - t0)
        st = lora.stats()
        assert st["evictions"] >= repeats * len(files) - 1, st
        for mgr in lora.managers.values():
            mgr.unpatch()
        del unet._lorakernels
        return times

    gc.disable()  # as in the side-by-side timing: a collection inside one switch is noise
    try:
        cold_ours, warm_ours = run(cache_bytes=0), run(cache_bytes=1 << 30)
    finally:
        gc.enable()
    out["ours_cold_ms"] = 1e3 * statistics.median(cold_ours)
    out["ours_cold_min_ms"] = 1e3 * min(cold_ours)
    out["ours_warm_ms"] = 1e3 * statistics.median(warm_ours)
    out["ours_warm_min_ms"] = 1e3 * min(warm_ours)
    out["cold_ratio"] = out["ours_cold_ms"] / out["diffusers_cold_ms"]
    return out


# ---------------------------------------------------------------------- many
def bench_many(steps: int, adapters: int, slots: int, model: str, latent: int) -> dict:
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    cfg = {**MODELS[model], "sample_size": latent}
    unet_pool = UNet2DConditionModel(**cfg).eval().requires_grad_(False)
    unet_all = UNet2DConditionModel(**cfg).eval().requires_grad_(False)
    unet_all.load_state_dict(unet_pool.state_dict())
    rng = random.Random(5)
    weights = [1.0 / (k + 1) for k in range(adapters)]  # zipf(1.0)
    with tempfile.TemporaryDirectory() as tmp:
        names = _write_kohya(Path(tmp), adapters, unet_pool, seed=2)
        plan = []
        for _ in range(steps):
            mixes = []
            for _s in range(4):
                picks = rng.choices(names, weights=weights, k=2)
                mix = {picks[0]: rng.uniform(0.5, 1.2)}
                if rng.random() < 0.25 and picks[1] != picks[0]:
                    mix[picks[1]] = -0.5
                mixes.append(mix)
            plan.append(mixes)
        needed = sorted({n for mixes in plan for m in mixes for n in m})
        lib = AdapterLibrary()
        lib.add_dir(tmp)
        pool = lorakernels.diffusers.patch(unet_pool, library=lib, max_resident_adapters=slots)
        full = lorakernels.diffusers.patch(unet_all, library=lib)
        full.ensure_loaded(needed)
        g = torch.Generator().manual_seed(0)
        x = torch.randn(4, 4, latent, latent, generator=g)
        ctx = torch.randn(4, 77, cfg["cross_attention_dim"], generator=g)

        def step(lora, unet, i: int):
            with lora.use(unet=plan[i]), torch.inference_mode():
                return unet(x, 500, ctx).sample

        # correctness first: the pool's outputs equal the all-resident run's
        for i in range(3):
            a, b = step(pool, unet_pool, i), step(full, unet_all, i)
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
        before = pool.stats()
        t_pool, t_full = [], []
        for i in range(steps):  # interleaved: the two runs see the same machine state
            if i + 1 < steps:
                pool.prefetch(sorted({n for m in plan[i + 1] for n in m}))
            t0 = time.perf_counter()
            step(pool, unet_pool, i)
            t_pool.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            step(full, unet_all, i)
            t_full.append(time.perf_counter() - t0)
        for mgr in pool.managers.values():
            mgr.wait_prefetch()
        st = pool.stats()
    hits, misses = st["hits"] - before["hits"], st["misses"] - before["misses"]
    return {
        "model": model,
        "latent": latent,
        "steps": steps,
        "adapters": adapters,
        "slots": slots,
        "distinct_used": len(needed),
        "pool_step_ms": 1e3 * statistics.median(t_pool),
        "all_resident_step_ms": 1e3 * statistics.median(t_full),
        "ratio": statistics.median(t_pool) / statistics.median(t_full),
        "hit_rate": hits / max(1, hits + misses),
        "prefetched": st["prefetched"] - before["prefetched"],
        "evictions": st["evictions"] - before["evictions"],
        "resident_max": len(st["resident"]),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--part", choices=["scan", "switch", "many", "all"], default="all")
    ap.add_argument("--files", type=int, default=2000)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--adapters", type=int, default=1000)
    ap.add_argument("--slots", type=int, default=32)
    ap.add_argument("--model", choices=sorted(MODELS), default="tiny")
    ap.add_argument("--latent", type=int, default=16)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--fixtures", type=Path, default=FIXTURES)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    doc: dict = {
        "load_before": _load(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "lorakernels": lorakernels.__version__,
    }
    if args.part in ("scan", "all"):
        doc["scan"] = bench_scan(args.files)
        print(f"scan: {doc['scan']}", flush=True)
    if args.part in ("switch", "all"):
        doc["switch"] = bench_switch(args.repeats, args.fixtures)
        print(f"switch: {doc['switch']}", flush=True)
    if args.part in ("many", "all"):
        doc["many"] = bench_many(args.steps, args.adapters, args.slots, args.model, args.latent)
        print(f"many: {doc['many']}", flush=True)
    doc["load_after"] = _load()
    print(f"{doc['load_before']} -> {doc['load_after']}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(doc, indent=1))


if __name__ == "__main__":
    main()
