"""A tiny plain-torch model and many generated kohya-format LoRA files for it (pool tests).

The model's module paths (``blocks.0.attn.to_q`` …) have kohya spellings
(``lora_unet_blocks_0_attn_to_q``) that the formats resolve against the module list, as for
a UNet. Its forward is non-linear, so the oracle must merge each sample's mixture into its own
float64 copy of the weights.
"""

from __future__ import annotations

import copy
import math
import random
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

D = 16
LAYERS = [f"blocks.{i}.attn.{p}" for i in range(2) for p in ("to_q", "to_v", "to_out")]
RANKS = (1, 2, 3, 4, 6, 8)


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.Module()
        self.attn.to_q = nn.Linear(D, D)
        self.attn.to_v = nn.Linear(D, 24)
        self.attn.to_out = nn.Linear(24, D)

    def forward(self, x: Tensor) -> Tensor:
        a = self.attn
        q = torch.tanh(a.to_q(x)).repeat(1, 1, 2)[..., :24]
        return x + a.to_out(q * a.to_v(x))


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([Block(), Block()])

    def forward(self, x: Tensor) -> Tensor:
        for b in self.blocks:
            x = b(x)
        return x


def tiny_model(seed: int = 0) -> Tiny:
    torch.manual_seed(seed)
    return Tiny().eval()


def make_adapter(seed: int, layers: list[str] | None = None) -> dict[str, tuple]:
    """``{module_path: (A, B, alpha)}`` with random ranks, alphas and layer subsets."""
    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    model = tiny_model()
    chosen = layers or [p for p in LAYERS if rng.random() < 0.7] or [LAYERS[0]]
    out = {}
    for path in chosen:
        lin = model.get_submodule(path)
        r = rng.choice(RANKS)
        a = torch.randn(r, lin.in_features, generator=g) / math.sqrt(lin.in_features)
        b = torch.randn(lin.out_features, r, generator=g) / math.sqrt(r)
        out[path] = (a, b, rng.choice([None, float(r), 1.0, 4.0]))
    return out


def kohya_dict(adapter: dict[str, tuple]) -> dict[str, Tensor]:
    sd = {}
    for path, (a, b, alpha) in adapter.items():
        key = "lora_unet_" + path.replace(".", "_")
        sd[key + ".lora_down.weight"] = a.contiguous()
        sd[key + ".lora_up.weight"] = b.contiguous()
        if alpha is not None:
            sd[key + ".alpha"] = torch.tensor(alpha)
    return sd


def write_files(folder: Path, count: int, seed: int = 0) -> dict[str, dict[str, tuple]]:
    """``count`` kohya files ``lora_000.safetensors`` …; returns name -> factors."""
    folder.mkdir(parents=True, exist_ok=True)
    adapters = {}
    for i in range(count):
        name = f"lora_{i:03d}"
        adapters[name] = make_adapter(seed * 100_000 + i)
        save_file(
            kohya_dict(adapters[name]),
            str(folder / f"{name}.safetensors"),
            metadata={"ss_output_name": f"out_{i:03d}"},
        )
    return adapters


def merged_oracle(
    model: nn.Module, x: Tensor, mixtures: list[dict[str, float]], adapters: dict[str, dict]
) -> Tensor:
    """Float64: each sample through its own copy of the model with its mixture merged into W."""
    outs = []
    for s, mix in enumerate(mixtures):
        ref = copy.deepcopy(model).double()
        for name, w in mix.items():
            for path, (a, b, alpha) in adapters[name].items():
                r = a.shape[0]
                scale = 1.0 if alpha is None else alpha / r
                lin = ref.get_submodule(path)
                # strengths and scales reach the kernels as float32
                coef = float(torch.tensor(w, dtype=torch.float32)) * float(
                    torch.tensor(scale, dtype=torch.float32)
                )
                lin.weight.data += coef * (b.double() @ a.double())
        outs.append(ref(x[s : s + 1].double()))
    return torch.cat(outs)
