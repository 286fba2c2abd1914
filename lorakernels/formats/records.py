"""What a LoRA file holds once read: per-module factor pairs, still in the file's naming.

Semantics of one :class:`LoRALayerWeights` (``A = down``, ``B = up``, ``r = A.shape[0]``)::

    # linear module, weight [N, K]:  A [r, K], B [N, r]
    y = x @ W.T + b + strength * scale * (x @ A.T) @ B.T
    # conv module, weight [C_out, C_in, kh, kw]:  A [r, C_in, kh, kw], B [C_out, r, 1, 1]
    y = conv(x, W) + b + strength * scale * conv1x1(conv(x, A), B)   # A shares W's stride/padding
    scale = alpha / r   (alpha missing → scale 1)

Tensors keep the dtype they had in the file (bf16 stays bf16); converting them is the consumer's
job. A LyCORIS Tucker ``lora_mid`` is folded into ``down`` when the file is read (exact, see
:func:`lorakernels.formats.assemble.fold_tucker`), so consumers only ever see two factors.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

from torch import Tensor

#: How a layer's name is spelled: a dotted diffusers module path (component prefix removed), or
#: a kohya underscore body (``down_blocks_0_attentions_0_…_to_k``, prefix ``lora_unet_`` removed)
#: that only the target model's module list can map back.
Naming = Literal["dotted", "kohya"]


@dataclass(frozen=True, eq=False)
class LoRALayerWeights:
    """The factors of one adapted module.

    Attributes:
        down: ``A``: ``[r, K]`` (linear) or ``[r, C_in, kh, kw]`` (conv).
        up: ``B``: ``[N, r]`` (linear) or ``[C_out, r, 1, 1]`` (conv).
        alpha: the file's alpha for this module, or ``None`` (scale 1).
        key: the key stem in the file the factors came from (for messages).
    """

    down: Tensor
    up: Tensor
    alpha: float | None
    key: str = ""

    @property
    def rank(self) -> int:
        """``r``: rows of ``down``."""
        return int(self.down.shape[0])

    @property
    def scale(self) -> float:
        """``alpha / r``, or 1.0 when the file stores no alpha."""
        return 1.0 if self.alpha is None else self.alpha / self.rank

    @property
    def is_conv(self) -> bool:
        """True when the factors are 4-D (a conv LoRA, 1×1 included)."""
        return self.down.dim() == 4

    def linear_factors(self) -> tuple[Tensor, Tensor]:
        """``(A [r, K], B [N, r])``; 1×1 conv factors are viewed as 2-D.

        Raises:
            ValueError: the factors belong to a k×k conv (k > 1), which has no linear form.
        """
        if not self.is_conv:
            return self.down, self.up
        if tuple(self.down.shape[2:]) != (1, 1):
            raise ValueError(
                f"LoRA {self.key!r}: down has kernel {tuple(self.down.shape[2:])}, "
                "only 1x1 conv factors have a linear form"
            )
        return self.down.flatten(1), self.up.flatten(1)


@dataclass(frozen=True, eq=False)
class LoRALayer:
    """One adapted module as the file names it.

    Attributes:
        component: ``"unet"``, ``"text_encoder"`` or ``"text_encoder_2"``.
        name: the module in the file's naming (see :data:`Naming`).
        naming: ``"dotted"`` or ``"kohya"``.
        weights: the factors and alpha.
    """

    component: str
    name: str
    naming: Naming
    weights: LoRALayerWeights


@dataclass(frozen=True, eq=False)
class LoRAFile:
    """A LoRA file, read and validated, not yet matched to a model.

    Attributes:
        path: the file as given.
        name: the file stem (``"foo"`` for ``…/foo.safetensors``).
        aliases: names a prompt may use for it: the stem, then ``ss_output_name`` if different.
        format: the key spellings found, e.g. ``"kohya"``, ``"kohya_sgm"``,
            ``"diffusers_attnprocs"``, ``"diffusers_lora"``, ``"peft"``; several joined by ``+``.
        metadata: the safetensors header metadata (all strings; empty for pickles).
        base_model: ``"sd1"``, ``"sd2"``, ``"sdxl"``, another hint from the metadata, or None.
        layers: every adapted module.
        skipped: keys left out because ``strict=False`` (each was warned about).
    """

    path: str
    name: str
    aliases: tuple[str, ...]
    format: str
    metadata: Mapping[str, str]
    base_model: str | None
    layers: tuple[LoRALayer, ...]
    skipped: tuple[str, ...] = field(default=())

    @property
    def num_params(self) -> int:
        """Number of LoRA parameters (down and up elements) in :attr:`layers`."""
        return sum(lay.weights.down.numel() + lay.weights.up.numel() for lay in self.layers)
