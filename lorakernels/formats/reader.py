"""``read_lora_file``: one file → a checked :class:`LoRAFile`, keys still in the file's naming.

Policy (strict by default; nothing is ever dropped silently):

- keys of algorithms that are not additive LoRA (:mod:`lorakernels.formats.algorithms`) raise
  :class:`UnsupportedLoRAAlgorithm` naming the algorithm, keys and file; with ``strict=False``
  they are skipped with a :class:`LoRAFormatWarning`, together with every other key of the
  same modules (a DoRA module's LoRA factors alone would give wrong outputs);
- keys in no supported spelling raise :class:`LoRAFormatError` the same way (``strict=False``:
  warned and skipped, with the rest of their module when the module is known);
- factors holding NaN or inf raise naming the file, the layer's keys and how many values
  (``strict=False``: warned and the layer skipped);
- malformed modules (missing down or up, rank mismatch, bad alpha, two keys for one factor)
  and files that end up with no LoRA module raise in either mode.
"""

from __future__ import annotations

import os
import re
import warnings
from pathlib import Path

import torch
from torch import Tensor

from .assemble import assemble_layer
from .detect import Group, classify_keys, format_name
from .errors import LoRAFormatError, LoRAFormatWarning, UnsupportedLoRAAlgorithm, summarize_keys
from .file_info import aliases, base_model
from .kohya import split_kohya_key
from .peft_config import peft_configs
from .records import LoRAFile, LoRALayer
from .tensor_io import read_tensors


def read_lora_file(path: str | os.PathLike[str], *, strict: bool = True) -> LoRAFile:
    """Read and check a LoRA file (``.safetensors``, ``.pt``, ``.pth``, ``.bin``, ``.ckpt``).

    Args:
        path: the file.
        strict: raise on foreign-algorithm and unknown keys (default); False warns and skips.

    Returns:
        The file's layers grouped per module, in the file's naming; match them to a model with
        :func:`lorakernels.formats.resolve_modules`.

    Raises:
        UnsupportedLoRAAlgorithm: (strict) keys of LoHa, LoKr, DoRA, (IA)³, … modules.
        LoRAFormatError: unreadable or malformed file, unknown keys (strict), no LoRA module.
    """
    where = str(path)
    tensors, metadata = read_tensors(path)
    if not tensors:
        raise LoRAFormatError(f"{where}: the file holds no tensors")
    infos = classify_keys(list(tensors))
    configs = peft_configs(metadata, where)

    algorithm_keys: dict[str, list[str]] = {}
    unknown: list[str] = []
    tainted: set[Group] = set()
    groups: dict[Group, dict[str, tuple[str, Tensor]]] = {}
    for info in infos:
        group = info.group
        if info.algorithm is not None or info.part is None or group is None:
            if info.algorithm is not None:
                algorithm_keys.setdefault(info.algorithm, []).append(info.key)
            else:
                unknown.append(info.key)
            if group is not None:
                tainted.add(group)
            continue
        parts = groups.setdefault(group, {})
        if info.part in parts:
            raise LoRAFormatError(
                f"{where}: two keys hold the {info.part} weight of module {info.module!r}: "
                f"{parts[info.part][0]!r} and {info.key!r}"
            )
        parts[info.part] = (info.key, tensors[info.key])

    dropped = [k for g in tainted if g in groups for k, _ in groups[g].values()]
    skipped = _refuse_or_skip(where, algorithm_keys, unknown, dropped, strict)

    finite = _all_finite(tensors)
    layers = []
    for (component, naming, module), parts in groups.items():
        if (component, naming, module) in tainted:
            continue
        if not finite and not _finite(parts, where, strict):
            continue
        config = configs.get(component, configs.get(None)) if naming == "dotted" else None
        alpha = config.alpha_for(module) if config is not None else None
        weights = assemble_layer(parts, _stem(next(iter(parts.values()))[0]), where, alpha)
        if config is not None and weights.rank != config.rank_for(module):
            raise LoRAFormatError(
                f"{where}: module {module!r} has rank {weights.rank} but the header's LoRA "
                f"config says r={config.rank_for(module)}"
            )
        layers.append(LoRALayer(component, module, naming, weights))
    if not layers:
        why = " after skipping the keys above" if skipped else ""
        raise LoRAFormatError(f"{where}: no LoRA module found{why}")

    stem = Path(path).stem
    return LoRAFile(
        path=where,
        name=stem,
        aliases=aliases(stem, metadata),
        format=format_name(infos),
        metadata=metadata,
        base_model=base_model(layers, metadata),
        layers=tuple(layers),
        skipped=tuple(skipped),
    )


_EXPONENT_MASK = {torch.bfloat16: (torch.int16, 0x7F80)}


def _all_finite(tensors: dict[str, Tensor]) -> bool:
    """Whether every float value of the file is finite, checked with numpy (single-threaded):
    torch's intra-op threads made one ``isfinite`` over a 3 MB file take 56 ms on a busy
    2-core machine, and per-tensor torch calls cost ~10 ms of a 50 ms cold SD1.5 load."""
    try:
        import numpy as np
    except ImportError:  # numpy is optional: check per tensor with torch
        return all(bool(torch.isfinite(t).all()) for t in tensors.values() if t.is_floating_point())
    for t in tensors.values():
        if not t.is_floating_point() or t.device.type != "cpu":
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                return False
            continue
        flat = t.detach().contiguous().reshape(-1)
        if t.dtype in _EXPONENT_MASK:  # numpy has no bf16: all exponent bits set = inf/NaN
            itype, mask = _EXPONENT_MASK[t.dtype]
            bits = flat.view(itype).numpy()
            if ((bits & mask) == mask).any():
                return False
        elif not np.isfinite(flat.numpy()).all():
            return False
    return True


def _finite(parts: dict[str, tuple[str, Tensor]], where: str, strict: bool) -> bool:
    """False (after a warning) or raise when a module's factors hold NaN or inf values."""
    bad = {
        key: int(t.numel() - torch.isfinite(t).sum())
        for part, (key, t) in parts.items()
        if part != "alpha" and t.is_floating_point() and not bool(torch.isfinite(t).all())
    }
    if not bad:
        return True
    count = sum(bad.values())
    keys = ", ".join(f"{k!r} ({n})" for k, n in bad.items())
    message = f"{where}: LoRA layer {keys} holds {count} NaN/inf value(s)"
    if strict:
        raise LoRAFormatError(message + " (strict=False skips the layer with a warning)")
    warnings.warn(message + "; layer skipped", LoRAFormatWarning, stacklevel=4)
    return False


def _refuse_or_skip(
    where: str,
    algorithm_keys: dict[str, list[str]],
    unknown: list[str],
    dropped: list[str],
    strict: bool,
) -> list[str]:
    """Raise (strict) or warn once about every key left out; return the keys left out."""
    messages = []
    if algorithm_keys:
        found = "; ".join(f"{a}: {summarize_keys(k)}" for a, k in sorted(algorithm_keys.items()))
        message = f"{where}: adapter algorithm(s) other than additive LoRA: {found}"
        if strict:
            every = tuple(k for keys in algorithm_keys.values() for k in keys)
            raise UnsupportedLoRAAlgorithm(
                message + " (strict=False skips these modules with a warning)",
                algorithms=tuple(sorted(algorithm_keys)),
                keys=every,
            )
        messages.append(message)
    if unknown:
        message = (
            f"{where}: keys that are no LoRA weight in any supported spelling: "
            f"{summarize_keys(unknown)}{_hint(unknown)}"
        )
        if strict:
            raise LoRAFormatError(message + " (strict=False skips them with a warning)")
        messages.append(message)
    if dropped:
        messages.append(f"the LoRA keys of the same modules: {summarize_keys(dropped)}")
    if messages:
        warnings.warn("; ".join(messages) + "; all skipped", LoRAFormatWarning, stacklevel=3)
    return [k for keys in algorithm_keys.values() for k in keys] + unknown + dropped


def _hint(keys: list[str]) -> str:
    if any(k.endswith(("_lora_down.weight", "_lora_up.weight")) for k in keys):
        return (
            " (they end in '_lora_down.weight'/'_lora_up.weight' where kohya writes "
            "'.lora_down.weight'/'.lora_up.weight': a broken conversion?)"
        )
    return ""


_SUFFIX = re.compile(
    r"(\.lora_[AB]\.weight|[._]lora(?:_linear_layer)?\.(?:down|up)\.weight|\.alpha)$"
)


def _stem(key: str) -> str:
    """A module's key without its part suffix (kohya: everything before the first dot)."""
    if split_kohya_key(key) is not None:
        return key.partition(".")[0]
    return _SUFFIX.sub("", key)
