"""Turning one module's keys (down, up, optional mid and alpha) into checked factors.

Checks, each failing with :class:`LoRAFormatError` naming the file and key:
down and up both present; float tensors; down 2-D ``[r, K]`` with up ``[N, r]``, or down 4-D
``[r, C_in, kh, kw]`` with up ``[C_out, r, 1, 1]``; ranks agree and are ≥ 1; alpha has one
element and is finite.

A LyCORIS Tucker (``lora_mid``) conv has ``down [r, C_in, 1, 1]``, ``mid [r, r, kh, kw]``,
``up [C_out, r, 1, 1]`` and computes ``up(mid(down(x)))``, ``mid`` carrying the base conv's
stride and padding. A 1×1 conv followed by a kh×kw conv is one kh×kw conv with kernel
``sum_j mid[:, j] * down[j, :]``, exactly (no bias, zero padding commutes with a pointwise map),
so :func:`fold_tucker` folds ``mid`` into ``down`` and the result is an ordinary LoCon pair. The
fold is computed in float32 (float64 for float64 inputs) and rounded once to ``down``'s dtype.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor

from .errors import LoRAFormatError
from .records import LoRALayerWeights


def assemble_layer(
    parts: Mapping[str, tuple[str, Tensor]], stem: str, path: str, alpha_override: float | None
) -> LoRALayerWeights:
    """Build and check one module's factors.

    Args:
        parts: ``"down"``/``"up"``/``"mid"``/``"alpha"`` → ``(key, tensor)``.
        stem: the module's name in the file, for messages.
        path: the file, for messages.
        alpha_override: alpha from elsewhere (a PEFT config) when the file has no alpha key.
    """
    where = f"{path}: LoRA module {stem!r}"
    for needed in ("down", "up"):
        if needed not in parts:
            have = ", ".join(repr(k) for k, _ in parts.values())
            raise LoRAFormatError(f"{where}: the {needed} weight is missing (found only {have})")
    down_key, down = parts["down"]
    up_key, up = parts["up"]
    for key, t in ((down_key, down), (up_key, up), *([parts["mid"]] if "mid" in parts else [])):
        if not t.is_floating_point():
            raise LoRAFormatError(f"{where}: key {key!r} has dtype {t.dtype}, expected a float")
    if "mid" in parts:
        down = fold_tucker(down, parts["mid"][1], where)
    if down.dim() not in (2, 4) or up.dim() != down.dim():
        raise LoRAFormatError(
            f"{where}: expected 2-D (linear) or 4-D (conv) factors of the same kind, got down "
            f"{tuple(down.shape)} ({down_key!r}) and up {tuple(up.shape)} ({up_key!r})"
        )
    if down.dim() == 4 and tuple(up.shape[2:]) != (1, 1):
        raise LoRAFormatError(
            f"{where}: conv up weight {up_key!r} must be [C_out, r, 1, 1], got {tuple(up.shape)}"
        )
    rank = down.shape[0]
    if rank < 1 or up.shape[1] != rank:
        raise LoRAFormatError(
            f"{where}: rank mismatch: down {down_key!r} has r={rank} (shape {tuple(down.shape)}), "
            f"up {up_key!r} has r={up.shape[1]} (shape {tuple(up.shape)})"
        )
    alpha = alpha_override
    if "alpha" in parts:
        alpha_key, a = parts["alpha"]
        if a.numel() != 1 or a.dim() > 1:
            raise LoRAFormatError(
                f"{where}: alpha {alpha_key!r} must be a scalar, got shape {tuple(a.shape)}"
            )
        value = float(a.reshape(()).item())
        if not math.isfinite(value):
            raise LoRAFormatError(f"{where}: alpha {alpha_key!r} is {value}")
        if alpha_override is not None and not math.isclose(value, alpha_override, rel_tol=1e-6):
            raise LoRAFormatError(
                f"{where}: alpha {alpha_key!r} = {value} contradicts the header's LoRA config "
                f"(alpha {alpha_override})"
            )
        alpha = value
    return LoRALayerWeights(down=down, up=up, alpha=alpha, key=stem)


def fold_tucker(down: Tensor, mid: Tensor, where: str = "Tucker LoRA") -> Tensor:
    """Fold a Tucker core into the down weight: ``[r, C_in, 1, 1]`` + ``[r, r, kh, kw]``.

    Returns:
        The equivalent down weight ``[r, C_in, kh, kw]`` in ``down``'s dtype.
    """
    if (
        down.dim() != 4
        or tuple(down.shape[2:]) != (1, 1)
        or mid.dim() != 4
        or mid.shape[1] != down.shape[0]
        or mid.shape[0] != mid.shape[1]
    ):
        raise LoRAFormatError(
            f"{where}: a lora_mid (Tucker) module needs down [r, C_in, 1, 1] and mid "
            f"[r, r, kh, kw], got down {tuple(down.shape)} and mid {tuple(mid.shape)}"
        )
    acc = torch.float64 if torch.float64 in (down.dtype, mid.dtype) else torch.float32
    folded = torch.einsum("ojhw,ji->oihw", mid.to(acc), down[:, :, 0, 0].to(acc))
    return folded.to(down.dtype).contiguous()
