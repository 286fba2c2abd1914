"""Layer-level benchmark workloads: one factory builds every case the CLI and pytest time.

A :class:`LayerWorkload` is a frozen description (shapes, samples, adapters, ranks, popularity,
mixtures, dtype); :func:`build_case` turns it into a :class:`LayerCase` of tensors on a device:

* ``x [S, T, K]``, ``weight [N, K]``, ``bias [N]`` in the workload dtype, ``S`` samples of ``T``
  rows each (the UNet batch, so classifier-free guidance is already counted in ``S``);
* ``L`` adapters named ``a0 .. a{L-1}``: ``A [r, K]``, ``B [N, r]`` in the workload dtype and
  ``alpha`` (scale ``alpha / r``); ranks cycle through ``ranks``;
* one mixture per sample ``{name: strength}``: the sample's main adapter is drawn with
  :func:`lorakernels.testing.draw_assignment` under the popularity, further entries (mixtures of
  2-3) are the next adapters in order, and ``round(frac_empty * S)`` samples use no adapter.
  Every adapter has one strength (drawn once, 0.5-1.0), the way a LoRA is used at its
  recommended weight; so distinct mixtures equal distinct adapter sets, which keeps the
  grouped baselines (merge, PEFT) at one group per adapter set as a user would run them.

Everything is seeded: the same workload builds bit-identical tensors on every run.

The FLOP-ideal time ratio to the base layer is ``1 + R (K + N) / (K N)`` where ``R`` is the
summed rank of a sample's mixture averaged over rows (rows without adapter count 0).
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace

import torch
from torch import Tensor

from ..testing import POPULARITIES, draw_assignment

DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
}


@dataclass(frozen=True)
class LayerShape:
    """One linear layer of a diffusion UNet: ``rows`` per sample (``T``), ``K`` in, ``N`` out."""

    model: str
    layer: str
    rows: int
    K: int
    N: int


# Rows per sample at the model's native resolution: SD1.5 at 512 px (latent 64), SD2 at 768 px
# (latent 96), SDXL at 1024 px (latent 128); text rows are the 77 CLIP tokens.
SD15_SHAPES = (
    LayerShape("sd15", "to_q 64x64", 4096, 320, 320),
    LayerShape("sd15", "to_k text", 77, 768, 320),
    LayerShape("sd15", "to_q 32x32", 1024, 640, 640),
    LayerShape("sd15", "to_q 16x16", 256, 1280, 1280),
)
EXTRA_SHAPES = (
    LayerShape("sd15", "ff.0 64x64", 4096, 320, 2560),
    LayerShape("sd15", "ff.2 64x64", 4096, 1280, 320),
    LayerShape("sd15", "to_k text 1280", 77, 768, 1280),
    LayerShape("sd2", "to_q 96x96", 9216, 320, 320),
    LayerShape("sd2", "to_k text", 77, 1024, 320),
    LayerShape("sd2", "to_q 48x48", 2304, 640, 640),
    LayerShape("sd2", "to_q 24x24", 576, 1280, 1280),
    LayerShape("sdxl", "to_q 64x64", 4096, 640, 640),
    LayerShape("sdxl", "to_k text", 77, 2048, 640),
    LayerShape("sdxl", "to_q 32x32", 1024, 1280, 1280),
    LayerShape("sdxl", "to_k text 1280", 77, 2048, 1280),
)
SWEEP_SHAPE = SD15_SHAPES[2]


@dataclass(frozen=True)
class LayerWorkload:
    """What to time. ``samples`` is the UNet batch (prompts x images x 2 with guidance)."""

    shape: LayerShape
    samples: int = 16
    adapters: int = 8
    ranks: tuple[int, ...] = (16,)
    mixture: int = 1
    popularity: str = "distinct"
    frac_empty: float = 0.0
    dtype: str = "fp32"
    suite: str = "layer"
    seed: int = 0
    note: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        if self.popularity not in POPULARITIES:
            raise ValueError(f"popularity must be one of {POPULARITIES}, got {self.popularity!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        if self.samples < 1 or self.adapters < 1 or self.shape.rows < 1:
            raise ValueError("samples, adapters and rows must be >= 1")
        if not 1 <= self.mixture <= self.adapters:
            raise ValueError(f"mixture must be in 1..adapters={self.adapters}, got {self.mixture}")
        if not self.ranks or min(self.ranks) < 1:
            raise ValueError(f"ranks must be a non-empty tuple of ranks >= 1, got {self.ranks}")
        if not 0.0 <= self.frac_empty < 1.0:
            raise ValueError(f"frac_empty must be in [0, 1), got {self.frac_empty}")

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def rank_label(self) -> str:
        return str(self.ranks[0]) if len(set(self.ranks)) == 1 else "/".join(map(str, self.ranks))

    @property
    def key(self) -> str:
        """Unique, stable id: used to match results across runs (``--compare``)."""
        s = self.shape
        return (
            f"{self.suite}|{s.model} {s.layer}|T{s.rows} K{s.K} N{s.N}|S{self.samples} "
            f"L{self.adapters} r{self.rank_label} mix{self.mixture} {self.popularity} "
            f"empty{self.frac_empty:g}|{self.dtype}|seed{self.seed}"
        )

    @property
    def label(self) -> str:
        """Short name for tables and plot axes."""
        s = self.shape
        return f"{s.model} {s.layer} ({s.rows},{s.K},{s.N})"

    def mixtures(self) -> list[dict[str, float]]:
        """One ``{adapter name: strength}`` per sample (deterministic in ``seed``)."""
        rng = random.Random(self.seed)
        strengths = [round(rng.uniform(0.5, 1.0), 3) for _ in range(self.adapters)]
        main = draw_assignment(self.samples, self.adapters, self.popularity, rng)
        n_empty = round(self.frac_empty * self.samples)
        empty = set(rng.sample(range(self.samples), n_empty)) if n_empty else set()
        out: list[dict[str, float]] = []
        for s in range(self.samples):
            if s in empty:
                out.append({})
                continue
            ids = [(main[s] + j) % self.adapters for j in range(self.mixture)]
            out.append({f"a{i}": strengths[i] for i in ids})
        return out

    def adapter_rank(self, i: int) -> int:
        return self.ranks[i % len(self.ranks)]

    def ideal(self) -> float:
        """FLOP-ideal ``time(ours) / time(base)``: ``1 + mean summed rank * (K + N) / (K N)``."""
        k, n = self.shape.K, self.shape.N
        summed = [sum(self.adapter_rank(int(name[1:])) for name in mix) for mix in self.mixtures()]
        mean_rank = sum(summed) / len(summed)
        return 1.0 + mean_rank * (k + n) / (k * n)

    def as_dict(self) -> dict:
        d = asdict(self)
        d["ranks"] = list(self.ranks)
        d["key"] = self.key
        d["label"] = self.label
        d["ideal"] = self.ideal()
        return d


@dataclass
class LayerCase:
    """The tensors of one workload on one device (inputs shared by every provider)."""

    workload: LayerWorkload
    x: Tensor  # [S, T, K]
    weight: Tensor  # [N, K]
    bias: Tensor  # [N]
    adapters: dict[str, tuple[Tensor, Tensor, float]]  # name -> (A [r,K], B [N,r], alpha)
    mixtures: list[dict[str, float]]
    slots: dict[str, int]  # name -> slot id used in LoRABank / LoRABatch

    @property
    def device(self) -> torch.device:
        return self.x.device

    def scale(self, name: str) -> float:
        a, _, alpha = self.adapters[name]
        return alpha / a.shape[0]


def build_case(workload: LayerWorkload, device: str | torch.device = "cpu") -> LayerCase:
    """Draw the tensors of ``workload`` (seeded) in its dtype on ``device``."""
    s, t = workload.samples, workload.shape.rows
    k, n = workload.shape.K, workload.shape.N
    dt = workload.torch_dtype
    gen = torch.Generator().manual_seed(workload.seed + 7919)

    def randn(*shape: int, std: float = 1.0) -> Tensor:
        return (torch.randn(*shape, generator=gen) * std).to(dtype=dt, device=device)

    x = randn(s, t, k)
    weight = randn(n, k, std=1 / math.sqrt(k))
    bias = randn(n, std=0.1)
    adapters = {}
    for i in range(workload.adapters):
        r = workload.adapter_rank(i)
        a = randn(r, k, std=1 / math.sqrt(k))
        b = randn(n, r, std=1 / math.sqrt(r))
        adapters[f"a{i}"] = (a, b, float(r) / 2)  # alpha = r/2: scale 0.5, not the trivial 1
    # slots are spread out (not 0..L-1) so that a provider cannot confuse them with indices
    slots = {f"a{i}": 2 * i + 1 for i in range(workload.adapters)}
    return LayerCase(workload, x, weight, bias, adapters, workload.mixtures(), slots)


# ---------------------------------------------------------------------- suites
def _with(ws: Sequence[LayerWorkload], **kw) -> list[LayerWorkload]:
    return [replace(w, **kw) for w in ws]


def shrink(shape: LayerShape, factor: int) -> LayerShape:
    """Image rows divided by ``factor`` (text rows, <= 77, are kept)."""
    if shape.rows <= 77 or factor == 1:
        return shape
    return replace(shape, rows=max(16, shape.rows // factor))


def layer_suite(dtypes: Sequence[str], row_factor: int = 1) -> list[LayerWorkload]:
    """The default table: SD1.5 shapes, 16 samples over 8 distinct rank-16 adapters, mixtures
    of 1 and 2, per dtype (issue 2 item 5)."""
    note = f"image rows / {row_factor}" if row_factor > 1 else ""
    out = []
    for dt in dtypes:
        for mix in (1, 2):
            for shape in SD15_SHAPES:
                out.append(
                    LayerWorkload(
                        shrink(shape, row_factor), mixture=mix, dtype=dt, suite="layer", note=note
                    )
                )
    return out


def shapes_suite(dtypes: Sequence[str], row_factor: int = 1) -> list[LayerWorkload]:
    """SD1.5 feed-forward, SD2 and SDXL layer shapes, default adapters (first dtype only)."""
    return [
        LayerWorkload(shrink(s, row_factor), dtype=dtypes[0], suite="shapes") for s in EXTRA_SHAPES
    ]


def sweep_suite(dtypes: Sequence[str], row_factor: int = 1) -> list[LayerWorkload]:
    """One parameter at a time around the default, on SD1.5 ``(1024, 640, 640)``."""
    base = LayerWorkload(shrink(SWEEP_SHAPE, row_factor), dtype=dtypes[0], suite="sweep")
    out: list[LayerWorkload] = []
    out += [replace(base, samples=s, adapters=min(8, s)) for s in (2, 4, 8, 32)]
    out += [replace(base, adapters=a) for a in (1, 2, 4, 16)]
    out += [replace(base, popularity=p) for p in POPULARITIES if p != "distinct"]
    out += [replace(base, ranks=(r,)) for r in (4, 8, 32, 64, 128)]
    out += [replace(base, ranks=(4, 16, 128))]
    out += [replace(base, mixture=3)]
    out += [replace(base, popularity="uniform", frac_empty=0.25)]
    out += [replace(base, popularity="zipf", frac_empty=0.25, mixture=2, ranks=(4, 16, 64))]
    return out


def smoke_suite(dtypes: Sequence[str]) -> list[LayerWorkload]:
    """Tiny workloads for CI smoke runs: every provider path, in well under a second each."""
    tiny = (LayerShape("tiny", "img", 64, 40, 48), LayerShape("tiny", "text", 7, 56, 40))
    out = []
    for dt in dtypes:
        out.append(LayerWorkload(tiny[0], samples=4, adapters=2, ranks=(4,), dtype=dt))
        out.append(
            LayerWorkload(
                tiny[1],
                samples=6,
                adapters=3,
                ranks=(2, 5),
                mixture=2,
                popularity="uniform",
                frac_empty=0.25,
                dtype=dt,
            )
        )
    return _with(out, suite="smoke")
