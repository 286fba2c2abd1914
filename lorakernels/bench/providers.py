"""Layer-level providers: ways to compute the same multi-LoRA linear layer, on identical inputs.

Every provider turns a :class:`~lorakernels.bench.workloads.LayerCase` into a zero-argument
callable returning ``y [S, T, N]`` in the case's dtype. Preparation (building banks, merged
weights, PEFT layers) happens in :meth:`Provider.prepare` and is not timed; the callable is one
forward pass of the layer.

* ``base``: ``F.linear(x, W, b)`` in the case's dtype, no LoRA: the floor.
* ``base32``: (half dtypes only) the same GEMM upcast to float32 and rounded once, the way the
  cpu backend computes; the floor our CPU path can reach on a CPU without native bf16 GEMMs.
* ``onednn``: (CPU) the base layer through oneDNN with its weight prepacked once, the GEMM
  the cpu backend runs where it measured faster than torch's (kernels/cpu_gemm.py): how much
  of ``ours/base`` is the GEMM's choice, not the LoRA (``ours/onednn`` is the LoRA's cost).
* ``ours`` / ``ours:<backend>``: :func:`lorakernels.multi_lora_linear` with automatic backend
  selection, or one explicit backend; ``ours@merged`` / ``ours@unmerged`` (also
  ``ours:<backend>@<plan>``) force the planner's choice (:mod:`lorakernels.plan`). The bank
  and the batch are built once (a model builds the batch once per forward for all of its
  layers). The planner merges a group once it has seen its mixture twice, so the timed calls
  (after the correctness check and the warm-up) run what a denoising loop runs from step 3.
* ``merge``: naive merging as A1111/diffusers serve mixed batches: per distinct mixture a
  merged weight ``W + sum strength * scale * B @ A`` (computed in float32, rounded once), then
  one GEMM per group of samples. Merged weights are precomputed, i.e. amortised over many
  denoising steps: the best case for merging. A group whose samples are not contiguous runs
  one GEMM per run of samples when runs are long, else gathers its rows (and scatters the
  result back), which is part of what grouping costs.
* ``fuse``: sequential fuse/unfuse with its switch cost counted: per group, ``W += delta``
  (delta recomputed from ``B @ A``), the group's GEMM, then ``W`` restored from a saved copy
  (PEFT recomputes the delta and subtracts; restoring is cheaper, so this is a lower bound).
* ``peft``: real PEFT LoRA layers, one PEFT adapter per distinct mixture (ranks stacked and the
  strengths folded into ``B``, as ``add_weighted_adapter(combination_type="cat")`` would build
  it, since PEFT has no per-sample strength), forward with ``adapter_names`` (PEFT's mixed
  batch: one sub-batch per adapter).
* ``loop``: a per-adapter Python loop with plain torch ops in the case's dtype.

Providers use the public API only.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import BACKENDS, LoRABank, LoRABatch, multi_lora_linear, resolve_backend
from .workloads import LayerCase

Forward = Callable[[], Tensor]

BASELINES = ("merge", "fuse", "peft", "loop")


def _groups(case: LayerCase) -> dict[tuple[tuple[str, float], ...], list[int]]:
    """Samples per distinct mixture, in order of first appearance (the empty mixture is ``()``)."""
    out: dict[tuple[tuple[str, float], ...], list[int]] = {}
    for s, mix in enumerate(case.mixtures):
        out.setdefault(tuple(sorted(mix.items())), []).append(s)
    return out


# A group whose samples are not contiguous runs one GEMM per contiguous run of samples when
# the runs are long (no copies), else gathers its rows into one GEMM (few, long GEMMs beat many
# short ones below ~256 rows); whichever is cheaper, so merging gets its best case.
_MIN_RUN_ROWS = 256


def _runs(idx: list[int]) -> list[tuple[int, int]]:
    """Sorted sample ids as ``[(first, last + 1), ...]`` contiguous runs."""
    out: list[tuple[int, int]] = []
    for s in sorted(idx):
        if out and out[-1][1] == s:
            out[-1] = (out[-1][0], s + 1)
        else:
            out.append((s, s + 1))
    return out


def _rows_or_index(
    idx: list[int], t: int, device: torch.device
) -> tuple[list[slice] | None, Tensor | None]:
    """Row slices of the sample runs of ``idx`` (each ``t`` rows per sample), or a sample index
    to gather them when the runs are short (see ``_MIN_RUN_ROWS``)."""
    runs = _runs(idx)
    if len(runs) == 1 or min(e - s for s, e in runs) * t >= _MIN_RUN_ROWS:
        return [slice(s * t, e * t) for s, e in runs], None
    return None, torch.tensor(idx, device=device)


def _delta_factors(case: LayerCase, mix: tuple[tuple[str, float], ...]) -> tuple[Tensor, Tensor]:
    """``(Bc [N, R], Ac [R, K])`` in float32 with ``Bc @ Ac = sum strength * scale * B @ A``."""
    bs, as_ = [], []
    for name, strength in mix:
        a, b, _ = case.adapters[name]
        bs.append(b.float() * (strength * case.scale(name)))
        as_.append(a.float())
    return torch.cat(bs, dim=1), torch.cat(as_, dim=0)


class Provider:
    """One way to compute the layer. Subclasses set ``name`` and implement :meth:`prepare`."""

    name = "?"

    def unavailable(self, case: LayerCase) -> str | None:
        """Why this provider cannot run on ``case`` (None when it can)."""
        return None

    def prepare(self, case: LayerCase) -> Forward:
        raise NotImplementedError


class Base(Provider):
    name = "base"

    def prepare(self, case: LayerCase) -> Forward:
        x, w, b = case.x, case.weight, case.bias
        return lambda: F.linear(x, w, b)


class Base32(Provider):
    name = "base32"

    def unavailable(self, case: LayerCase) -> str | None:
        if case.x.dtype == torch.float32:
            return "same as base for float32"
        if case.device.type != "cpu":
            return "the float32-upcast floor is a CPU reference only"
        return None

    def prepare(self, case: LayerCase) -> Forward:
        x, w, b, dt = case.x, case.weight, case.bias, case.x.dtype
        # the weight is converted per call, as the cpu backend does
        return lambda: F.linear(x.float(), w.float(), b.float()).to(dt)


class OneDNN(Provider):
    name = "onednn"

    def unavailable(self, case: LayerCase) -> str | None:
        from ..kernels import cpu_gemm

        if case.device.type != "cpu":
            return "a CPU GEMM"
        if not cpu_gemm.available():
            return "this torch build has no oneDNN prepacked linear"
        return None

    def prepare(self, case: LayerCase) -> Forward:
        from ..kernels import cpu_gemm

        x, b = case.x, case.bias
        packed = cpu_gemm.pack(case.weight)
        k = case.weight.shape[1]
        return lambda: cpu_gemm.linear(x.reshape(-1, k), packed, b).view(*x.shape[:-1], -1)


class Ours(Provider):
    """:func:`lorakernels.multi_lora_linear` with ``backend`` (None: automatic) and ``plan``
    (None: the planner's automatic choice; ``"merged"``/``"unmerged"``: forced, named
    ``ours@merged``/``ours@unmerged``)."""

    def __init__(self, backend: str | None = None, plan: str | None = None) -> None:
        self.backend = backend
        self.plan = plan
        self.name = "ours" if backend is None else f"ours:{backend}"
        if plan is not None:
            self.name += f"@{plan}"

    def unavailable(self, case: LayerCase) -> str | None:
        try:
            resolve_backend(case.device, self.backend)
        except RuntimeError as exc:
            return str(exc)
        return None

    def resolved(self, device: torch.device) -> str:
        return resolve_backend(device, self.backend)

    def prepare(self, case: LayerCase) -> Forward:
        w = case.workload
        bank = LoRABank(w.shape.K, w.shape.N, dtype=case.x.dtype, device=case.device)
        for name, (a, b, _) in case.adapters.items():
            bank.add(case.slots[name], a, b, case.scale(name))
        batch = LoRABatch.from_mixtures(case.mixtures, case.slots, device=case.device)
        x, weight, bias, backend, plan = case.x, case.weight, case.bias, self.backend, self.plan
        return lambda: multi_lora_linear(x, weight, bias, bank, batch, backend=backend, plan=plan)


def _grouped_linear(
    x: Tensor, b: Tensor | None, n: int, groups: Iterable[tuple[Tensor, list | None, Tensor | None]]
) -> Tensor:
    """``y [S, T, N]``, each group's samples ``x @ w.T + b``: per ``(w, rows, index)`` an
    ``addmm`` per contiguous run of rows (``rows``: slices of the flat rows), else one gathered
    ``linear`` over the samples in ``index`` (see :func:`_rows_or_index`)."""
    s, t, k = x.shape
    y = torch.empty(s, t, n, dtype=x.dtype, device=x.device)
    x2, y2 = x.view(s * t, k), y.view(s * t, n)
    for w, rows, index in groups:
        if rows is not None:
            for r in rows:
                torch.addmm(b, x2[r], w.T, out=y2[r])
        else:
            y.index_copy_(0, index, F.linear(x.index_select(0, index), w, b))
    return y


class Merge(Provider):
    name = "merge"

    def prepare(self, case: LayerCase) -> Forward:
        x, b, dt = case.x, case.bias, case.x.dtype
        n = case.weight.shape[0]
        plan = []
        for mix, idx in _groups(case).items():
            if mix:
                bc, ac = _delta_factors(case, mix)
                w = (case.weight.float() + bc @ ac).to(dt)
            else:
                w = case.weight
            plan.append((w, *_rows_or_index(idx, x.shape[1], case.device)))
        return lambda: _grouped_linear(x, b, n, plan)


class Fuse(Provider):
    name = "fuse"

    def prepare(self, case: LayerCase) -> Forward:
        saved = case.weight
        work = case.weight.clone()  # the "model weight" that gets fused and unfused
        x, b, dt = case.x, case.bias, case.x.dtype
        plan = []
        for mix, idx in _groups(case).items():
            factors = _delta_factors(case, mix) if mix else None
            plan.append((factors, *_rows_or_index(idx, x.shape[1], case.device)))

        def fused_groups() -> Iterator[tuple[Tensor, list | None, Tensor | None]]:
            # The loop in _grouped_linear runs each group between the fuse and the unfuse.
            for factors, rows, index in plan:
                if factors is not None:  # fuse
                    bc, ac = factors
                    work.add_((bc @ ac).to(dt))
                yield work, rows, index
                if factors is not None:  # unfuse
                    work.copy_(saved)

        return lambda: _grouped_linear(x, b, saved.shape[0], fused_groups())


class _Holder(nn.Module):
    """A one-layer model for PEFT to inject into."""

    def __init__(self, lin: nn.Linear) -> None:
        super().__init__()
        self.lin = lin


class Peft(Provider):
    name = "peft"

    def unavailable(self, case: LayerCase) -> str | None:
        try:
            import peft  # noqa: F401
        except ImportError as exc:
            return f"peft is not installed ({exc})"
        return None

    def prepare(self, case: LayerCase) -> Forward:
        from peft import LoraConfig, inject_adapter_in_model

        k, n = case.weight.shape[1], case.weight.shape[0]
        lin = nn.Linear(k, n, dtype=case.x.dtype, device=case.device)
        with torch.no_grad():
            lin.weight.copy_(case.weight)
            lin.bias.copy_(case.bias)
        holder = _Holder(lin)
        names: list[str] = ["__base__"] * len(case.mixtures)
        for g, (mix, idx) in enumerate(_groups(case).items()):
            if not mix:
                continue
            bc, ac = _delta_factors(case, mix)
            r = ac.shape[0]
            cfg = LoraConfig(r=r, lora_alpha=r, target_modules=["lin"], lora_dropout=0.0)
            with warnings.catch_warnings():  # "multiple adapters in the model": intended
                warnings.simplefilter("ignore", UserWarning)
                inject_adapter_in_model(cfg, holder, adapter_name=f"m{g}")
            layer = holder.lin
            with torch.no_grad():
                layer.lora_A[f"m{g}"].weight.copy_(ac)
                layer.lora_B[f"m{g}"].weight.copy_(bc)
            for s in idx:
                names[s] = f"m{g}"
        layer = holder.lin
        layer.eval()
        x = case.x
        return lambda: layer(x, adapter_names=names)


class Loop(Provider):
    name = "loop"

    def prepare(self, case: LayerCase) -> Forward:
        x, w, b, dt = case.x, case.weight, case.bias, case.x.dtype
        users: dict[str, list[tuple[int, float]]] = {}
        for s, mix in enumerate(case.mixtures):
            for name, strength in mix.items():
                users.setdefault(name, []).append((s, strength * case.scale(name)))
        plan = []
        for name, pairs in users.items():
            a, bm, _ = case.adapters[name]
            idx = [s for s, _ in pairs]
            coef = torch.tensor([c for _, c in pairs], dtype=dt, device=case.device).view(-1, 1, 1)
            runs = _runs(idx)
            sl = slice(*runs[0]) if len(runs) == 1 else None
            index = None if sl else torch.tensor(idx, device=case.device)
            plan.append((a, bm, coef, sl, index))

        def forward() -> Tensor:
            y = F.linear(x, w, b)
            for a, bm, coef, sl, index in plan:
                xs = x[sl] if sl is not None else x.index_select(0, index)
                d = ((xs @ a.T) * coef) @ bm.T
                if sl is not None:
                    y[sl] += d
                else:
                    y.index_add_(0, index, d)
            return y

        return forward


def layer_providers(
    device: torch.device, *, all_backends: bool = False, names: list[str] | None = None
) -> list[Provider]:
    """The providers to run: base, ours (auto, plus every explicit backend that can run on
    ``device`` when ``all_backends``), the baselines; ``names`` filters (``ours:*`` allowed)."""
    out: list[Provider] = [Base(), Base32(), OneDNN(), Ours()]
    if all_backends:
        auto = resolve_backend(device)
        for b in BACKENDS:
            if b == auto:
                continue
            try:
                resolve_backend(device, b)
            except RuntimeError:
                continue
            out.append(Ours(b))
    out += [Merge(), Fuse(), Peft(), Loop()]
    if names:
        unknown = [
            n for n in names if n not in PROVIDER_NAMES and not n.startswith(("ours:", "ours@"))
        ]
        if unknown:
            raise ValueError(f"providers: unknown {unknown}; choose from {PROVIDER_NAMES}")
        out = [p for p in out if p.name in names or p.name == "base"]
        for n in names:
            if n.startswith(("ours:", "ours@")) and all(p.name != n for p in out):
                rest, _, plan = n.partition("@")
                backend = rest.split(":", 1)[1] if ":" in rest else None
                out.append(Ours(backend, plan or None))
    return out


PROVIDER_NAMES = ("base", "base32", "onednn", "ours", "merge", "fuse", "peft", "loop")


def flop_ideal(K: int, N: int, summed_rank: float) -> float:
    """``1 + R (K + N) / (K N)``: LoRA FLOPs over base FLOPs, plus one."""
    return 1.0 + summed_rank * (K + N) / (K * N)


def oracle_error(y: Tensor, oracle: Tensor) -> float:
    """Max abs difference in float64 (NaN counts as infinitely wrong)."""
    d = (y.detach().double().cpu().reshape(oracle.shape) - oracle).abs()
    return math.inf if torch.isnan(d).any() else float(d.max())
