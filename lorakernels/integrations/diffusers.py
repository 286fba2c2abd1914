"""diffusers wiring: per-prompt LoRAs for Stable Diffusion 1.x/2.x/XL pipelines in one batch.

The only module that knows diffusers' layer names. It patches a pipeline's UNet and text
encoders (or a bare ``UNet2DConditionModel``) with one :class:`~lorakernels.MultiLoRA` per
component, loads LoRA files through :mod:`lorakernels.formats`, and runs a pipeline where
every prompt carries its own ``<lora:name:weight>`` tags::

    lora = lorakernels.diffusers.patch(pipe)
    lora.load_dir("loras/")                        # registered by file stem and ss_output_name
    images = lorakernels.diffusers.generate(
        pipe, ["<lora:ink:0.8> a cat", "<lora:cyber:1> <lora:tarot:0.5> a city", "a dog"],
        num_images_per_prompt=2, guidance_scale=7.5,
    ).images

Batch semantics (documented choices):

* Text encoders run once per prompt batch (``P`` rows); prompt ``p``'s text-encoder strengths
  apply to its positive *and* its negative prompt (A1111 merges the LoRA into the encoder, so
  both see it).
* The UNet batch is ``[uncond (P x images), cond (P x images)]`` (diffusers' order); each prompt's
  UNet strengths apply to all its images and to both guidance halves (as A1111 does);
  ``uncond_lora=False`` gives the unconditional half the base UNet instead.
* Cross-attention K/V cache (``cache_cross_attention=True``): ``attn2.to_k``/``to_v`` see only
  the prompt embedding, identical at every step, so their outputs (base + LoRA) are computed at
  the first step and reused; the result equals the uncached run exactly.
"""

from __future__ import annotations

import fnmatch
import warnings
from collections.abc import Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any, Literal

from torch import nn

from ..batch import LoRABatch
from ..formats import load_lora, read_lora_file
from ..manager import MultiLoRA
from ..prompt import parse_prompts

COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
LORA_SUFFIXES = (".safetensors", ".pt", ".bin", ".ckpt")

# Target sets by name: glob patterns on module paths, per component.
_UNET_ATTN2 = ["*attn2.to_q", "*attn2.to_k", "*attn2.to_v", "*attn2.to_out.0"]
_UNET_ATTN = _UNET_ATTN2 + [p.replace("attn2", "attn1") for p in _UNET_ATTN2]
_TE_ATTN = ["*self_attn.q_proj", "*self_attn.k_proj", "*self_attn.v_proj", "*self_attn.out_proj"]
TARGETS: dict[str, dict[str, list[str]]] = {
    "cross_attention": {"unet": _UNET_ATTN2, "text_encoder": _TE_ATTN},
    "attention": {"unet": _UNET_ATTN, "text_encoder": _TE_ATTN},
    # kohya's default network: every Linear / 1x1 conv inside the transformer blocks
    "transformer": {
        "unet": _UNET_ATTN
        + ["*ff.net.0.proj", "*ff.net.2", "*attentions.*.proj_in", "*attentions.*.proj_out"],
        "text_encoder": _TE_ATTN + ["*mlp.fc1", "*mlp.fc2"],
    },
}
TargetName = Literal["cross_attention", "attention", "transformer"]


def _components(obj: Any) -> dict[str, nn.Module]:
    """``{component: module}`` of a pipeline (unet + text encoders) or a bare UNet."""
    if isinstance(obj, nn.Module):
        return {"unet": obj}
    found = {c: getattr(obj, c, None) for c in COMPONENTS}
    found = {c: m for c, m in found.items() if isinstance(m, nn.Module)}
    if "unet" not in found:
        raise TypeError(
            f"expected a diffusers pipeline with a .unet or a UNet2DConditionModel, got "
            f"{type(obj).__name__}"
        )
    return found


class DiffusersLoRA:
    """Multi-LoRA serving for one diffusers pipeline (or a bare UNet).

    Args:
        pipe: a ``StableDiffusionPipeline``/``StableDiffusionXLPipeline`` (anything with
            ``.unet`` and optionally ``.text_encoder``/``.text_encoder_2``) or a UNet.
        targets: ``"cross_attention"`` (attn2 q/k/v/out), ``"attention"`` (attn1 + attn2),
            ``"transformer"`` (kohya's default set), or ``None`` (default): patch exactly the
            layers the loaded files touch.
        backend: kernel backend for every patched layer (``None``: automatic).
    """

    def __init__(
        self, pipe: Any, targets: TargetName | None = None, *, backend: str | None = None
    ) -> None:
        if targets is not None and targets not in TARGETS:
            raise ValueError(f"targets must be one of {sorted(TARGETS)} or None, got {targets!r}")
        self.pipe = pipe
        self.components = _components(pipe)
        self.managers: dict[str, MultiLoRA] = {}
        for comp, module in self.components.items():
            pats = None
            if targets is not None:
                key = "unet" if comp == "unet" else "text_encoder"
                pats = TARGETS[targets][key]
            self.managers[comp] = MultiLoRA(module, targets=pats, backend=backend)
        self.registry: dict[str, Path] = {}  # canonical name -> file, loaded or not
        self.spellings: dict[str, str] = {}  # every accepted spelling -> canonical name
        self.loaded: list[str] = []

    # ------------------------------------------------------------------ files
    def _module_names(self) -> dict[str, list[str]]:
        return {c: [n for n, _ in m.named_modules() if n] for c, m in self.components.items()}

    def load(self, path: str | Path, name: str | None = None, *, strict: bool = True) -> str:
        """Load a LoRA file under ``name`` (default: its file stem); returns the name.

        All-or-nothing across components: if any component rejects it, none keeps it.
        """
        path = Path(path)
        info, layers = load_lora(path, self._module_names(), strict=strict)
        name = name or info.name
        if name in self.loaded:
            raise ValueError(f"adapter {name!r} is already loaded (from {self.registry[name]})")
        extra = sorted(set(layers) - set(self.managers))
        if extra and strict:
            raise KeyError(f"{path}: has weights for {extra}, which this pipeline lacks")
        done: list[str] = []
        try:
            for comp, weights in layers.items():
                if comp in self.managers and weights:
                    self.managers[comp].load(name, weights, strict=strict)
                    done.append(comp)
        except BaseException:
            for comp in done:
                self.managers[comp].unload(name)
            raise
        if not done:
            raise ValueError(f"{path}: no layer of this pipeline takes its weights")
        self._register(name, path, info.aliases)
        self.loaded.append(name)
        return name

    def _register(self, name: str, path: Path, aliases: Sequence[str] = ()) -> None:
        self.registry[name] = path
        for spelling in (name, *aliases):
            self.spellings.setdefault(spelling, name)

    def load_dir(self, folder: str | Path, *, lazy: bool = True) -> list[str]:
        """Register every LoRA file in ``folder`` by stem and ``ss_output_name`` alias.

        ``lazy=True`` reads only headers now and loads a file the first time a prompt uses it.
        """
        folder = Path(folder)
        if not folder.is_dir():
            raise NotADirectoryError(f"load_dir: {folder} is not a directory")
        names = []
        for path in sorted(folder.iterdir()):
            if path.suffix.lower() not in LORA_SUFFIXES or not path.is_file():
                continue
            if lazy:
                info = read_lora_file(path, strict=False)
                self._register(info.name, path, info.aliases)
                names.append(info.name)
            else:
                names.append(self.load(path))
        return names

    def unload(self, name: str) -> None:
        """Remove adapter ``name`` from every component (it stays registered by file)."""
        if name not in self.loaded:
            raise KeyError(f"adapter {name!r} is not loaded; loaded: {self.loaded}")
        for mgr in self.managers.values():
            if name in mgr.slots:
                mgr.unload(name)
        self.loaded.remove(name)

    def ensure_loaded(self, names: Sequence[str]) -> None:
        for name in names:
            if name not in self.loaded:
                if name not in self.registry:
                    raise KeyError(f"unknown adapter {name!r}; known: {sorted(self.registry)}")
                self.load(self.registry[name], name)

    # ------------------------------------------------------------------ batches
    def _mixtures_for(self, comp: str, mixtures: Sequence[dict[str, float]]) -> list[dict]:
        """Drop adapters that have no weights in this component (e.g. UNet-only files)."""
        slots = self.managers[comp].slots
        return [{k: v for k, v in mix.items() if k in slots} for mix in mixtures]

    @contextmanager
    def use(
        self,
        unet: Sequence[dict[str, float]] | LoRABatch | None = None,
        text_encoder: Sequence[dict[str, float]] | None = None,
    ):
        """Activate UNet mixtures (one per UNet sample, or a ready batch) and text-encoder
        mixtures (one per prompt) inside the block."""
        with ExitStack() as stack:
            if unet is not None:
                if not isinstance(unet, LoRABatch):
                    unet = self._mixtures_for("unet", unet)
                stack.enter_context(self.managers["unet"].use(unet))
            if text_encoder is not None:
                for comp in ("text_encoder", "text_encoder_2"):
                    if comp in self.managers:
                        mixes = self._mixtures_for(comp, text_encoder)
                        stack.enter_context(self.managers[comp].use(mixes))
            yield self

    @contextmanager
    def cross_attention_cache(self):
        """Cache ``attn2.to_k``/``to_v`` outputs inside the block (see the module docstring)."""
        mgr = self.managers["unet"]
        unet = self.components["unet"]
        layers = []
        for name, _ in list(unet.named_modules()):
            if fnmatch.fnmatchcase(name, "*attn2.to_k") or fnmatch.fnmatchcase(name, "*attn2.to_v"):
                layer = mgr.patch(name)
                layer.enable_output_cache(True)
                layers.append(layer)
        try:
            yield
        finally:
            for layer in layers:
                layer.enable_output_cache(False)

    # ------------------------------------------------------------------ generation
    def generate(
        self,
        prompts: Sequence[str] | str,
        *,
        negative_prompt: str | Sequence[str] | None = None,
        num_images_per_prompt: int = 1,
        guidance_scale: float = 7.5,
        uncond_lora: bool = True,
        cache_cross_attention: bool = True,
        on_unknown: Literal["raise", "warn", "ignore"] = "raise",
        **pipe_kwargs: Any,
    ) -> Any:
        """Run the pipeline on ``prompts``, each with its own ``<lora:…>`` tags, in one batch.

        Tags are parsed with A1111's grammar (``te``/``unet`` strengths), removed from the
        text, adapters are loaded on first use from :meth:`load_dir` registrations, and the
        pipeline runs with per-prompt text-encoder mixtures and per-sample UNet mixtures.
        Extra keyword arguments go to the pipeline (``num_inference_steps``, ``generator``,
        ``height``, ``width``, ``output_type``, …). Returns the pipeline's output.
        """
        if isinstance(prompts, str):
            prompts = [prompts]
        parsed = parse_prompts(list(prompts), known=self.spellings, on_unknown=on_unknown)
        dyn = sorted({t.name for p in parsed for t in p.tags if t.dyn is not None})
        if dyn:
            warnings.warn(
                f"DyLoRA rank truncation (dyn=) is parsed but not applied; full rank used for "
                f"{dyn}",
                stacklevel=2,
            )
        self.ensure_loaded(sorted({n for p in parsed for n in (*p.unet, *p.text_encoder)}))
        te_mixes = [p.text_encoder for p in parsed]
        unet_mixes = [p.unet for p in parsed]
        texts = [p.text for p in parsed]
        pipe = self.pipe
        do_cfg = (
            guidance_scale > 1.0
            and getattr(getattr(pipe.unet, "config", None), "time_cond_proj_dim", None) is None
        )
        mgr = self.managers["unet"]
        base = LoRABatch.from_mixtures(
            self._mixtures_for("unet", unet_mixes), mgr.slots, device=mgr._device()
        )
        unet_batch = base.expand(
            images_per_prompt=num_images_per_prompt,
            guidance=do_cfg,
            uncond_mixtures="same" if uncond_lora else "empty",
        )
        embeds = self._encode(texts, negative_prompt, te_mixes, do_cfg)
        with ExitStack() as stack:
            stack.enter_context(self.use(unet=unet_batch))
            if cache_cross_attention:
                stack.enter_context(self.cross_attention_cache())
            return pipe(
                **embeds,
                num_images_per_prompt=num_images_per_prompt,
                guidance_scale=guidance_scale,
                **pipe_kwargs,
            )

    def _encode(self, texts, negative_prompt, te_mixes, do_cfg) -> dict[str, Any]:
        """Prompt embeddings with per-prompt text-encoder LoRAs (one row per prompt)."""
        pipe = self.pipe
        if not hasattr(pipe, "encode_prompt"):
            raise TypeError(
                f"{type(pipe).__name__} has no encode_prompt; pass a diffusers pipeline"
            )
        if isinstance(negative_prompt, str):
            negative_prompt = [negative_prompt] * len(texts)
        device = next(self.components["unet"].parameters()).device
        with self.use(text_encoder=te_mixes):
            if "text_encoder_2" in self.components or hasattr(pipe, "text_encoder_2"):
                out = pipe.encode_prompt(
                    prompt=texts, device=device, num_images_per_prompt=1,
                    do_classifier_free_guidance=do_cfg, negative_prompt=negative_prompt,
                )  # fmt: skip
                names = (
                    "prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds",
                    "negative_pooled_prompt_embeds",
                )  # fmt: skip
                return {k: v for k, v in zip(names, out, strict=True) if v is not None}
            pos, neg = pipe.encode_prompt(texts, device, 1, do_cfg, negative_prompt)
        out = {"prompt_embeds": pos}
        if neg is not None:
            out["negative_prompt_embeds"] = neg
        return out


def patch(pipe: Any, targets: TargetName | None = None, *, backend: str | None = None):
    """Patch ``pipe`` (or a UNet) for multi-LoRA serving; the handle is kept on the pipeline
    so :func:`generate` finds it. Patching twice returns the existing handle."""
    existing = getattr(pipe, "_lorakernels", None)
    if isinstance(existing, DiffusersLoRA):
        return existing
    handle = DiffusersLoRA(pipe, targets, backend=backend)
    try:
        pipe._lorakernels = handle
    except (AttributeError, TypeError):
        object.__setattr__(pipe, "_lorakernels", handle)
    return handle


def generate(pipe: Any, prompts: Sequence[str] | str, **kwargs: Any) -> Any:
    """:meth:`DiffusersLoRA.generate` on a pipeline patched with :func:`patch`."""
    handle = getattr(pipe, "_lorakernels", None)
    if not isinstance(handle, DiffusersLoRA):
        raise ValueError("pipe is not patched: call lorakernels.diffusers.patch(pipe) first")
    return handle.generate(prompts, **kwargs)
