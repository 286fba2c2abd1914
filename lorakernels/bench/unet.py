"""Model level: one UNet denoising step with 8 adapters, ours against the grouped baselines.

The model is diffusers' ``UNet2DConditionModel`` built from the real SD1.5 configuration dict
(:data:`SD15_UNET`, random weights, nothing downloaded); ``sd15-small`` keeps the topology with
every block 5x narrower (quick mode), ``tiny`` is for smoke tests. A step runs ``prompts``
prompts with classifier-free guidance: the UNet batch is ``2 * prompts`` in diffusers' order
``[uncond p0..p{P-1}, cond p0..p{P-1}]``; prompt ``i`` uses adapter ``a{i % L}`` at its
strength in both halves (what A1111 does when it merges a LoRA).

Adapter configurations: ``attn-r16``: rank 16 on every attention projection (``to_q``,
``to_k``, ``to_v``, ``to_out.0``), alpha 16, as diffusers/PEFT train it; ``kohya-r32``: rank
32, alpha 16, on every linear and 1x1 conv of the transformer blocks (attention, feed-forward,
``proj_in``/``proj_out``), kohya's LoRA target set.

Providers (all on the same inputs and weights; two copies of the model, because PEFT wraps
layers in place):

* ``base``: the step without LoRA; ``base_grouped``: the same, run as one sub-batch per
  adapter (what grouping costs by itself);
* ``ours``: ``MultiLoRA`` over the first copy, one forward of the whole batch under
  ``mlora.use(mixtures)`` (the batch is built inside the timed call);
* ``peft``: diffusers + PEFT on the second copy: per adapter, ``set_adapters`` and a forward of
  that adapter's sub-batch (gathered and scattered back);
* ``fused``: per adapter, ``set_adapters`` + ``fuse_lora`` + sub-batch forward + ``unfuse_lora``.

Correctness: ``ours`` and ``fused`` must match ``peft`` (an independent implementation) and
``base_grouped`` must match ``base``, to ``MODEL_RTOL`` of the largest LoRA effect on the output.

FLOP-ideal: ``1 + LoRA FLOPs / UNet FLOPs``, with UNet FLOPs counted by
``torch.utils.flop_counter.FlopCounterMode`` over the base step and LoRA FLOPs
``2 * rows * r * (K + N)`` per patched layer (rows recorded by hooks in the same step).
Peak memory: growth of the resident set during one step (Linux ``VmHWM`` after resetting it),
or of ``torch.cuda.max_memory_allocated`` on CUDA.
"""

from __future__ import annotations

import copy
import ctypes
import math
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from .. import MultiLoRA
from .. import plan as _plan
from .timing import TimingConfig, time_side_by_side

_DOWN = ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D")
_UP = ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")

SD15_UNET: dict = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "center_input_sample": False,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "down_block_types": _DOWN,
    "up_block_types": _UP,
    "block_out_channels": (320, 640, 1280, 1280),
    "layers_per_block": 2,
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "act_fn": "silu",
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
}
"""The SD1.5 UNet configuration (``unet/config.json`` of Stable Diffusion 1.5)."""

MODELS: dict[str, dict] = {
    "sd15": SD15_UNET,
    "sd15-small": {**SD15_UNET, "block_out_channels": (64, 128, 256, 256)},
    "tiny": {
        **SD15_UNET,
        "block_out_channels": (32, 64),
        "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
        "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
        "layers_per_block": 1,
        "cross_attention_dim": 32,
        "norm_num_groups": 8,
        "attention_head_dim": 4,
    },
}

_ATTN = ("to_q", "to_k", "to_v", "to_out.0")
ADAPTER_CONFIGS: dict[str, tuple[int, float, tuple[str, ...]]] = {
    # name: (rank, alpha, target suffixes inside the transformer blocks)
    "attn-r16": (16, 16.0, _ATTN),
    "kohya-r32": (32, 16.0, (*_ATTN, "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out")),
}

# ours/fused vs peft: 1e-3 of the largest LoRA effect. Measured errors are ~1e-5 of it in fp32;
# dropping the adapter of a single layer moves the output by ~1e-2 of it.
MODEL_RTOL = {torch.float32: 1e-3, torch.float16: 3e-2, torch.bfloat16: 3e-2}


@dataclass(frozen=True)
class UNetWorkload:
    model: str = "sd15"
    latent: int = 16
    adapter_config: str = "attn-r16"
    prompts: int = 8
    adapters: int = 8
    dtype: str = "fp32"
    repeats: int = 3
    seed: int = 0

    def __post_init__(self) -> None:
        if self.model not in MODELS:
            raise ValueError(f"model must be one of {sorted(MODELS)}, got {self.model!r}")
        if self.adapter_config not in ADAPTER_CONFIGS:
            raise ValueError(
                f"adapter_config must be one of {sorted(ADAPTER_CONFIGS)}, "
                f"got {self.adapter_config!r}"
            )
        if self.latent < 8 or self.latent % 8:
            raise ValueError(f"latent must be a multiple of 8, got {self.latent}")

    @property
    def key(self) -> str:
        return (
            f"unet|{self.model}|latent{self.latent}|{self.adapter_config}|P{self.prompts} "
            f"L{self.adapters}|{self.dtype}|seed{self.seed}"
        )

    @property
    def label(self) -> str:
        return f"{self.model} {self.latent}² {self.adapter_config}"

    def as_dict(self) -> dict:
        d = asdict(self)
        d.update(key=self.key, label=self.label, batch=2 * self.prompts)
        return d


# ---------------------------------------------------------------------- building
_MODEL_CACHE: dict[tuple[str, str, str], nn.Module] = {}


def build_unet(model: str, dtype: torch.dtype, device: torch.device, seed: int = 0) -> nn.Module:
    """A random-weight UNet2DConditionModel from :data:`MODELS` (cached per process)."""
    key = (model, str(dtype), str(device))
    if key not in _MODEL_CACHE:
        from diffusers import UNet2DConditionModel

        _MODEL_CACHE.clear()  # one pristine model at a time: an SD1.5 UNet is 3.4 GB in fp32
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**MODELS[model]).eval()
        if dtype != torch.float32:  # (diffusers warns about casting even when it is a no-op)
            unet = unet.to(dtype=dtype)
        _MODEL_CACHE[key] = unet.to(device=device).requires_grad_(False)
    return _MODEL_CACHE[key]


def target_paths(unet: nn.Module, adapter_config: str) -> list[str]:
    """Module paths an adapter of ``adapter_config`` touches (inside transformer blocks)."""
    suffixes = ADAPTER_CONFIGS[adapter_config][2]
    return [
        name
        for name, mod in unet.named_modules()
        if ".attentions." in f".{name}"
        and any(name.endswith("." + s) for s in suffixes)
        and isinstance(mod, nn.Linear | nn.Conv2d)
    ]


def _adapter_weights(
    unet: nn.Module, paths: list[str], rank: int, gen: torch.Generator
) -> dict[str, tuple[Tensor, Tensor]]:
    """Random ``(A, B)`` per path, shaped like PEFT's weights (conv: ``[r, C, 1, 1]``)."""
    out = {}
    for p in paths:
        mod = unet.get_submodule(p)
        w = mod.weight
        n, k = w.shape[0], w[0].numel()
        a = torch.randn(rank, k, generator=gen) / math.sqrt(k)
        b = torch.randn(n, rank, generator=gen) * (0.5 / math.sqrt(rank))
        if isinstance(mod, nn.Conv2d):
            a, b = a.view(rank, k, 1, 1), b.view(n, rank, 1, 1)
        out[p] = (a.to(w), b.to(w))
    return out


@dataclass
class UNetCase:
    workload: UNetWorkload
    unet_ours: nn.Module
    mlora: MultiLoRA
    unet_peft: nn.Module
    paths: list[str]
    names: list[str]
    strengths: dict[str, float]
    groups: list[tuple[str, Tensor]]  # adapter name -> sample indices of its sub-batch
    mixtures: list[dict[str, float]]
    inputs: tuple[Tensor, Tensor, Tensor]  # latents, timestep, encoder hidden states


def build_unet_case(workload: UNetWorkload, device: torch.device) -> UNetCase:
    """Two patched copies of the model (ours, PEFT), the adapters and the step's inputs."""
    from peft import LoraConfig

    from .workloads import DTYPES

    dtype = DTYPES[workload.dtype]
    pristine = build_unet(workload.model, dtype, device, workload.seed)
    cfg = MODELS[workload.model]
    rank, alpha, _ = ADAPTER_CONFIGS[workload.adapter_config]
    paths = target_paths(pristine, workload.adapter_config)
    gen = torch.Generator().manual_seed(workload.seed + 1)
    names = [f"a{i}" for i in range(workload.adapters)]
    weights = {n: _adapter_weights(pristine, paths, rank, gen) for n in names}
    strengths = {n: round(0.6 + 0.4 * i / max(1, len(names) - 1), 3) for i, n in enumerate(names)}

    unet_ours = copy.deepcopy(pristine)
    wanted = set(paths)
    mlora = MultiLoRA(unet_ours, targets=lambda name, mod: name in wanted)
    for n in names:
        mlora.load(n, {p: (a, b, alpha) for p, (a, b) in weights[n].items()})

    unet_peft = copy.deepcopy(pristine)
    for n in names:
        config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=paths, lora_dropout=0.0)
        with warnings.catch_warnings():  # "multiple adapters in the model": intended
            warnings.simplefilter("ignore", UserWarning)
            unet_peft.add_adapter(config, adapter_name=n)
        with torch.no_grad():
            for p, (a, b) in weights[n].items():
                layer = unet_peft.get_submodule(p)
                layer.lora_A[n].weight.copy_(a)
                layer.lora_B[n].weight.copy_(b)
    unet_peft.eval()

    p_count = workload.prompts
    per_prompt = [names[i % len(names)] for i in range(p_count)]
    # diffusers' guidance order: [uncond p0..pP-1, cond p0..pP-1], both halves with the LoRA
    sample_names = per_prompt + per_prompt
    mixtures = [{n: strengths[n]} for n in sample_names]
    groups = []
    for n in names:
        idx = [s for s, m in enumerate(sample_names) if m == n]
        if idx:
            groups.append((n, torch.tensor(idx, device=device)))
    g = torch.Generator().manual_seed(workload.seed + 2)
    batch = 2 * p_count
    lat = workload.latent
    latents = torch.randn(batch, cfg["in_channels"], lat, lat, generator=g).to(device, dtype)
    context = torch.randn(batch, 77, cfg["cross_attention_dim"], generator=g).to(device, dtype)
    timestep = torch.tensor(500, device=device)
    return UNetCase(
        workload,
        unet_ours,
        mlora,
        unet_peft,
        paths,
        names,
        strengths,
        groups,
        mixtures,
        (latents, timestep, context),
    )


# ---------------------------------------------------------------------- providers
def _grouped(
    unet: nn.Module,
    case: UNetCase,
    before: Callable[[str], None] | None,
    after: Callable[[], None] | None,
) -> Tensor:
    latents, t, ctx = case.inputs
    out = torch.empty_like(latents)
    for name, idx in case.groups:
        if before is not None:
            before(name)
        y = unet(latents.index_select(0, idx), t, ctx.index_select(0, idx)).sample
        out.index_copy_(0, idx, y)
        if after is not None:
            after()
    return out


def unet_providers(case: UNetCase) -> dict[str, Callable[[], Tensor]]:
    latents, t, ctx = case.inputs
    ours, peft_unet, mlora = case.unet_ours, case.unet_peft, case.mlora

    def base() -> Tensor:
        return ours(latents, t, ctx).sample  # no active batch: the original layers, exactly

    def run_ours() -> Tensor:
        with mlora.use(case.mixtures):
            return ours(latents, t, ctx).sample

    def base_grouped() -> Tensor:
        return _grouped(ours, case, None, None)

    def set_one(name: str) -> None:
        peft_unet.set_adapters([name], weights=[case.strengths[name]])

    def peft() -> Tensor:
        return _grouped(peft_unet, case, set_one, None)

    def fuse(name: str) -> None:
        set_one(name)
        peft_unet.fuse_lora(adapter_names=[name])

    def fused() -> Tensor:
        return _grouped(peft_unet, case, fuse, peft_unet.unfuse_lora)

    return {
        "base": base,
        "ours": run_ours,
        "peft": peft,
        "fused": fused,
        "base_grouped": base_grouped,
    }


# ---------------------------------------------------------------------- memory
_CLEAR_REFS = Path("/proc/self/clear_refs")


def _rss_kb(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def _trim() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # return freed heap pages, so growth is real
    except (OSError, AttributeError):
        pass


def peak_growth_mb(fn: Callable[[], Tensor], device: torch.device) -> tuple[Tensor, float | None]:
    """Run ``fn`` once; return its output and the peak memory growth during it (MB)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        y = fn()
        torch.cuda.synchronize(device)
        return y, (torch.cuda.max_memory_allocated(device) - before) / 2**20
    _trim()
    before = _rss_kb("VmRSS")
    try:
        _CLEAR_REFS.write_text("5")  # reset VmHWM to the current RSS
    except OSError:
        return fn(), None
    y = fn()
    peak = _rss_kb("VmHWM")
    if before is None or peak is None:
        return y, None
    return y, max(0, peak - before) / 1024


# ---------------------------------------------------------------------- flops
def count_flops(case: UNetCase) -> tuple[float, float]:
    """``(UNet FLOPs of the base step, LoRA FLOPs of the step)``."""
    from torch.utils.flop_counter import FlopCounterMode

    rank = ADAPTER_CONFIGS[case.workload.adapter_config][0]
    rows: dict[str, int] = {}
    handles = []
    for p in case.paths:
        mod = case.unet_ours.get_submodule(p)

        def hook(m: nn.Module, args: tuple, p: str = p) -> None:
            x = args[0]
            rows[p] = x.numel() // (x.shape[1] if x.dim() == 4 else x.shape[-1])

        handles.append(mod.register_forward_pre_hook(hook))
    latents, t, ctx = case.inputs
    try:
        with FlopCounterMode(display=False) as fc:
            case.unet_ours(latents, t, ctx)
    finally:
        for h in handles:
            h.remove()
    lora = 0.0
    for p in case.paths:
        w = case.unet_ours.get_submodule(p).weight
        n, k = w.shape[0], w[0].numel()
        lora += 2.0 * rows[p] * rank * (k + n)  # every sample uses one adapter here
    return float(fc.get_total_flops()), lora


# ---------------------------------------------------------------------- run
_REFS = {
    "ours": "peft",
    "fused": "peft",
    "peft": "peft",
    "base_grouped": "base",
    "base": "base",
}


def check_unet(name: str, out: Tensor, refs: dict[str, Tensor], workload: UNetWorkload) -> dict:
    """``{"max_err"}`` plus ``"skipped": "WRONG: ..."`` when ``out`` misses its reference.

    ``refs`` holds the ``base`` and ``peft`` outputs; the tolerance is ``MODEL_RTOL`` of the
    largest change the adapters make to the output (raises if that change is negligible)."""
    from .workloads import DTYPES

    delta = float((refs["peft"].double() - refs["base"].double()).abs().max())
    scale = float(refs["base"].double().abs().max())
    if not delta > 1e-3 * scale:
        raise RuntimeError(
            f"{workload.key}: the adapters change the output by only {delta:.3g} "
            f"(output scale {scale:.3g}); the correctness check would be meaningless"
        )
    rtol = MODEL_RTOL[DTYPES[workload.dtype]]
    err = float((out.double() - refs[_REFS[name]].double()).abs().max())
    entry: dict = {"max_err": err}
    if not (math.isfinite(err) and err <= rtol * delta):
        entry["skipped"] = f"WRONG: max error {err:.3g} > {rtol:g} x LoRA effect {delta:.3g}"
    return entry


def run_unet(workload: UNetWorkload, device: torch.device) -> dict:
    """Check and time one model-level workload; returns a JSON-ready record."""
    from .workloads import DTYPES

    case = build_unet_case(workload, device)
    fns = unet_providers(case)
    record: dict = {"workload": workload.as_dict(), "device": str(device), "providers": {}}
    with torch.no_grad():
        unet_flops, lora_flops = count_flops(case)
        outs, peaks = {}, {}
        for name, fn in fns.items():  # the first call of each is also its warm-up
            outs[name], peaks[name] = peak_growth_mb(fn, device)
        for name in fns:
            record["providers"][name] = check_unet(name, outs[name], outs, workload)
            record["providers"][name]["peak_mb"] = peaks[name]
        delta = float((outs["peft"].double() - outs["base"].double()).abs().max())
        del outs
        timed = {n: f for n, f in fns.items() if "skipped" not in record["providers"][n]}
        # one more untimed call each: ours merges a mixture's weights on its second sight
        # (lorakernels.plan, ski rental), so the timed repeats see the steady state of a
        # 20-50 step generation, not the one-time builds (~1 s at 32², built per request)
        cfg = TimingConfig(repeats=workload.repeats, warmup=1, min_sample_s=0.0)
        _plan.reset_summary()
        timings = time_side_by_side(timed, cfg, device=device)
    for name, tm in timings.items():
        record["providers"][name].update(tm.as_dict())
    # which plan ours ran per layer type (K x N) during the timed steps: merged / unmerged
    # groups, merged weights built, cache hits (lorakernels.plan)
    record["plan"] = _plan.last_summary()
    record["flops"] = {"unet": unet_flops, "lora": lora_flops}
    record["ideal"] = 1.0 + lora_flops / unet_flops
    record["check"] = {"lora_effect": delta, "rtol": MODEL_RTOL[DTYPES[workload.dtype]]}
    record["adapter_mb"] = {
        "ours": sum(
            (layer.lora_bank.lora_a.numel() + layer.lora_bank.lora_bt.numel())
            * layer.lora_bank.lora_a.element_size()
            for layer in case.mlora.layers.values()
        )
        / 2**20,
        "peft": sum(
            p.numel() * p.element_size()
            for n, p in case.unet_peft.named_parameters()
            if "lora_" in n
        )
        / 2**20,
    }
    return record


def default_unet_workloads(mode: str, latents: list[int] | None = None) -> list[UNetWorkload]:
    """Model-level workloads per mode (see the CLI's help for what each mode runs)."""
    if mode == "smoke":
        return [UNetWorkload(model="tiny", latent=8, prompts=2, adapters=2, repeats=1)]
    if mode == "quick":
        lat = latents or [16]
        return [UNetWorkload(model="sd15-small", latent=v, repeats=3) for v in lat]
    reps = {16: 3, 32: 2}
    if mode == "default":
        return [UNetWorkload(latent=v, repeats=reps.get(v, 1)) for v in (latents or [16])]
    out = []
    for v in latents or [16, 32, 64]:
        # kohya rank 32 at 64² doubles the longest step of the default full run; an explicit
        # --latent list runs both configurations at every size (issue 13: 32² and 64²)
        both = v <= 32 or latents is not None
        configs = ("attn-r16", "kohya-r32") if both else ("attn-r16",)
        out += [UNetWorkload(latent=v, adapter_config=c, repeats=reps.get(v, 1)) for c in configs]
    return out
