"""``lorakernels serve``: argument parsing and main.

::

    lorakernels serve MODEL_DIR --loras DIR [--host 127.0.0.1 --port 7860 --max-batch-rows 16
                                             --max-queue 256 ...]
    lorakernels serve --demo                # tiny local pipeline + LoRAs, no download
    lorakernels serve --demo --ray --replicas 2
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="lorakernels serve",
        description="A1111-compatible txt2img server with per-request LoRAs, batched per step.",
    )
    p.add_argument("model_dir", nargs="?", help="a diffusers pipeline folder (local files only)")
    p.add_argument("--loras", action="append", default=[], metavar="DIR", help="LoRA folder")
    p.add_argument("--demo", action="store_true", help="serve the tiny built-in demo pipeline")
    p.add_argument("--demo-dir", default=None, help="where the demo is built (default: cache)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--max-batch-rows", type=int, default=16, help="UNet rows per call")
    p.add_argument("--max-active-rows", type=int, default=None, help="rows in flight")
    p.add_argument("--max-queue", type=int, default=256, help="queued requests before 503")
    p.add_argument("--max-size", type=int, default=1024, help="largest width/height")
    p.add_argument("--max-steps", type=int, default=150)
    p.add_argument("--max-images", type=int, default=16, help="batch_size * n_iter limit")
    p.add_argument(
        "--max-resident-adapters",
        type=int,
        default=None,
        help="adapters held in the banks at once (LRU eviction; default: no bound)",
    )
    p.add_argument("--drain-timeout", type=float, default=30.0, help="seconds, on SIGTERM")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default=None)
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 … (default: cuda if any)")
    p.add_argument("--log-level", default="info")
    p.add_argument("--ray", action="store_true", help="serve through Ray Serve replicas")
    p.add_argument("--replicas", type=int, default=1, help="Ray Serve replicas (with --ray)")
    p.add_argument("--max-replicas", type=int, default=None, help="autoscale up to this many")
    return p


def resolve_model(args: argparse.Namespace) -> tuple[Path, list[Path], str]:
    """(model_dir, lora_dirs, model name) from the arguments (building the demo if asked)."""
    if args.demo:
        from .demo import build

        model_dir, lora_dir = build(args.demo_dir)
        return model_dir, [lora_dir, *map(Path, args.loras)], "lorakernels-demo"
    if not args.model_dir:
        raise SystemExit("lorakernels serve: give MODEL_DIR (a diffusers folder) or --demo")
    model_dir = Path(args.model_dir)
    if not (model_dir / "model_index.json").is_file():
        raise SystemExit(f"lorakernels serve: {model_dir} has no model_index.json")
    for d in args.loras:
        if not Path(d).is_dir():
            raise SystemExit(f"lorakernels serve: --loras {d} is not a directory")
    return model_dir, [Path(d) for d in args.loras], model_dir.name


def server_kwargs(args: argparse.Namespace) -> dict:
    return {
        "max_batch_rows": args.max_batch_rows,
        "max_active_rows": args.max_active_rows,
        "max_queue": args.max_queue,
        "max_size": args.max_size,
        "max_steps": args.max_steps,
        "max_images": args.max_images,
        "max_resident_adapters": args.max_resident_adapters,
    }


def load(model_dir: Path, dtype: str | None, device: str | None):
    import torch

    from .demo import load_pipeline

    pipe = load_pipeline(model_dir, getattr(torch, dtype) if dtype else None)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return pipe.to(device)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.max_batch_rows < 2:
        raise SystemExit("lorakernels serve: --max-batch-rows must be >= 2")
    model_dir, lora_dirs, name = resolve_model(args)
    if args.ray:
        from .ray import run as ray_run

        return ray_run(args, model_dir, lora_dirs, name)
    from .http import run
    from .server import DiffusionServer

    pipe = load(model_dir, args.dtype, args.device)
    server = DiffusionServer(pipe, lora_dirs, **server_kwargs(args))
    print(
        f"lorakernels serve: {name} with LoRAs from {', '.join(map(str, lora_dirs)) or '(none)'}"
        f" on http://{args.host}:{args.port}",
        file=sys.stderr,
        flush=True,
    )
    run(
        server,
        host=args.host,
        port=args.port,
        model_name=name,
        drain_timeout=args.drain_timeout,
        log_level=args.log_level,
    )
    return 0
