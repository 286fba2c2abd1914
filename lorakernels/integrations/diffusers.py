"""diffusers wiring: per-prompt LoRAs for Stable Diffusion 1.x/2.x/XL pipelines in one batch.

The only module that knows diffusers' layer names. It patches a pipeline's UNet and text
encoders (or a bare ``UNet2DConditionModel``) with one :class:`~lorakernels.MultiLoRA` per
component, loads LoRA files through :mod:`lorakernels.formats`, and runs a pipeline where
every prompt carries its own ``<lora:name:weight>`` tags::

    lora = lorakernels.diffusers.patch(pipe, max_resident_adapters=32)
    lora.load_dir("loras/")      # headers only: registered by file stem and ss_output_name
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
* Strength schedules (``<lora:ink:0.2@0,1@0.5>`` or ``lora_schedules=``): the UNet strengths
  change per denoising step inside the one batch, see :mod:`.step_strengths`.
* Cross-attention K/V cache (``cache_cross_attention=True``): ``attn2.to_k``/``to_v`` see only
  the prompt embedding, identical at every step, so their outputs (base + LoRA) are computed at
  the first step and reused; the result equals the uncached run exactly.
"""

from __future__ import annotations

import fnmatch
import warnings
from collections.abc import Mapping, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any, Literal

from torch import nn

from ..adapters import AdapterLibrary
from ..batch import LoRABatch
from ..manager import MultiLoRA
from ..prompt import parse_prompts
from ..schedule import Schedule, check_schedule
from .step_strengths import StepStrengths

COMPONENTS = ("unet", "text_encoder", "text_encoder_2")

# Target sets by name: glob patterns on module paths, per component.
_CROSS_KV = ["*attn2.to_k", "*attn2.to_v"]  # see only the prompt embedding: cacheable
_UNET_ATTN2 = ["*attn2.to_q", *_CROSS_KV, "*attn2.to_out.0"]
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
        library: the :class:`~lorakernels.AdapterLibrary` names come from (a private one by
            default); every component's manager shares it, so a file is read once.
        max_resident_adapters: at most this many adapters resident per component.
        resident_bytes: bank storage over all components, preallocated; every patched layer
            of every component gets the same number of rank rows (see
            :class:`~lorakernels.MultiLoRA`).
        backend: kernel backend for every patched layer (``None``: automatic).

    Adapters are loaded on first use by every entry point (:meth:`use`, :meth:`generate`,
    :meth:`encode`) and evicted least recently used first when a budget is set. Unknown names
    raise ``KeyError``; an adapter is left out of a component's batch only when it is known
    to have no weights there (a UNet-only file in the text encoder).

    Thread safety: as :class:`~lorakernels.MultiLoRA`: concurrent :meth:`generate` calls from
    several threads or asyncio tasks each see their own adapters.
    """

    def __init__(
        self,
        pipe: Any,
        targets: TargetName | None = None,
        *,
        library: AdapterLibrary | None = None,
        max_resident_adapters: int | None = None,
        resident_bytes: int | None = None,
        backend: str | None = None,
    ) -> None:
        if targets is not None and targets not in TARGETS:
            raise ValueError(f"targets must be one of {sorted(TARGETS)} or None, got {targets!r}")
        self.pipe = pipe
        self.components = _components(pipe)
        self.library = library if library is not None else AdapterLibrary()
        pats = {
            comp: None
            if targets is None
            else TARGETS[targets]["unet" if comp == "unet" else "text_encoder"]
            for comp in self.components
        }
        shares: dict[str, int | None] = dict.fromkeys(self.components)
        if resident_bytes is not None:
            per_row = {c: MultiLoRA.bytes_per_row(m, pats[c]) for c, m in self.components.items()}
            rows = resident_bytes // max(1, sum(per_row.values()))
            if rows < 1:
                raise ValueError(
                    f"resident_bytes={resident_bytes} is smaller than one adapter: a rank-1 "
                    f"adapter over every patchable layer takes {sum(per_row.values())} bytes"
                )
            shares = {c: rows * per_row[c] for c in self.components}
        self.managers: dict[str, MultiLoRA] = {}
        for comp, module in self.components.items():
            mgr = MultiLoRA(
                module,
                targets=pats[comp],
                library=self.library,
                backend=backend,
                max_resident_adapters=max_resident_adapters,
                resident_bytes=shares[comp],
                component=comp,
            )
            mgr.drop_empty = True
            self.managers[comp] = mgr

    # ------------------------------------------------------------------ names
    @property
    def spellings(self) -> dict[str, str]:
        """Every accepted spelling (stem, ``ss_output_name``, alias) → canonical name."""
        return self.library.spellings()

    @property
    def registry(self) -> dict[str, str | None]:
        """Canonical name → file (``None`` for in-memory adapters)."""
        return {n: self.library.info(n).path for n in self.library.names()}

    @property
    def loaded(self) -> list[str]:
        """Adapters resident in at least one component."""
        return sorted({n for mgr in self.managers.values() for n in mgr.slots})

    # ------------------------------------------------------------------ files
    def load(self, path: str | Path, name: str | None = None, *, strict: bool = True) -> str:
        """Register a LoRA file under ``name`` (default: its file stem) and make it resident
        now in every component it has weights for; returns the name.

        All-or-nothing across components: if any component rejects it, none keeps it and the
        library forgets it.
        """
        path = Path(path)
        name = name or path.stem
        if name in self.loaded:
            raise ValueError(f"adapter {name!r} is already loaded (from {self.registry[name]})")
        added = name not in self.library
        if added:
            self.library.add(name, path, strict=strict)  # stem + ss_output_name where free
        elif self.library.info(name).path != str(path):
            raise ValueError(
                f"adapter name {name!r} is taken by {self.library.info(name).path or 'in memory'}"
            )
        done: list[str] = []
        try:
            lora, _ = self.library.get(name)
            extra = sorted({lay.component for lay in lora.layers} - set(self.managers))
            if extra and strict:
                raise KeyError(f"{path}: has weights for {extra}, which this pipeline lacks")
            for comp, mgr in self.managers.items():
                if mgr.load_from_library(name, strict=strict):
                    done.append(comp)
            if not done:
                raise ValueError(f"{path}: no layer of this pipeline takes its weights")
        except BaseException:
            for comp in done:
                self.managers[comp].unload(name)
            if added:
                self.library.remove(name)
            raise
        return name

    def load_dir(self, folder: str | Path, *, lazy: bool = True) -> list[str]:
        """Register every LoRA file in ``folder`` by stem and ``ss_output_name`` alias through
        :attr:`library` (headers only); ``lazy=False`` also makes each resident now.

        Lazy: a broken file is found, and named, the first time a prompt uses it.
        """
        names = self.library.add_dir(folder)
        if not lazy:
            self.ensure_loaded(names)
        return names

    def unload(self, name: str) -> None:
        """Evict adapter ``name`` from every component (it stays in the library)."""
        canon = self.library.resolve(name)
        if canon not in self.loaded:
            raise KeyError(f"adapter {name!r} is not loaded; loaded: {self.loaded}")
        for mgr in self.managers.values():
            if canon in mgr.slots:
                mgr.unload(canon)

    def ensure_loaded(self, names: Sequence[str]) -> None:
        """Make ``names`` resident in every component they have weights for (``KeyError``
        for unknown names)."""
        for name in names:
            canon = self.library.resolve(name)
            for mgr in self.managers.values():
                mgr.load_from_library(canon)

    # ------------------------------------------------------------------ residency
    def prefetch(self, names: Sequence[str]) -> list[Any]:
        """Load ``names`` in the background in every component (see
        :meth:`lorakernels.MultiLoRA.prefetch`); returns one future per component."""
        return [mgr.prefetch(names) for mgr in self.managers.values()]

    def pin(self, name: str) -> None:
        """Load ``name`` where it has weights and keep it resident until :meth:`unpin`."""
        for mgr in self.managers.values():
            mgr.pin(name)

    def unpin(self, name: str) -> None:
        """Let ``name`` be evicted again."""
        for mgr in self.managers.values():
            mgr.unpin(name)

    def stats(self) -> dict[str, Any]:
        """Totals over the components (``resident``: names resident in any, ``resident_bytes``,
        ``hits``, ``misses``, ``evictions``, ``prefetched``), plus ``components``: each
        manager's own :meth:`~lorakernels.MultiLoRA.stats`, and ``library``."""
        per = {comp: mgr.stats() for comp, mgr in self.managers.items()}
        out: dict[str, Any] = {
            "resident": sorted({n for st in per.values() for n in st["resident"]}),
        }
        for key in (
            "resident_bytes",
            "capacity_bytes",
            "hits",
            "misses",
            "evictions",
            "prefetched",
        ):
            out[key] = sum(st[key] for st in per.values())
        out["components"] = per
        out["library"] = self.library.stats()
        return out

    # ------------------------------------------------------------------ batches
    @contextmanager
    def use(
        self,
        unet: Sequence[dict[str, float]] | LoRABatch | None = None,
        text_encoder: Sequence[dict[str, float]] | None = None,
    ):
        """Activate UNet mixtures (one per UNet sample, or a ready batch) and text-encoder
        mixtures (one per prompt) inside the block, for the calling thread or task. Adapters
        are loaded on first use; unknown names raise ``KeyError``."""
        with ExitStack() as stack:
            if unet is not None:
                stack.enter_context(self.managers["unet"].use(unet))
            if text_encoder is not None:
                for comp in ("text_encoder", "text_encoder_2"):
                    if comp in self.managers:
                        stack.enter_context(self.managers[comp].use(text_encoder))
            yield self

    @contextmanager
    def cross_attention_cache(self):
        """Cache ``attn2.to_k``/``to_v`` outputs inside the block (see the module docstring)."""
        mgr = self.managers["unet"]
        unet = self.components["unet"]
        layers = []
        for name, _ in list(unet.named_modules()):
            if any(fnmatch.fnmatchcase(name, pat) for pat in _CROSS_KV):
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
        lora_schedules: Sequence[Mapping[str, Schedule] | None] | None = None,
        **pipe_kwargs: Any,
    ) -> Any:
        """Run the pipeline on ``prompts``, each with its own ``<lora:…>`` tags, in one batch.

        Tags are parsed with A1111's grammar (``te``/``unet`` strengths), removed from the
        text, adapters are loaded on first use from :meth:`load_dir` registrations, and the
        pipeline runs with per-prompt text-encoder mixtures and per-sample UNet mixtures.
        Extra keyword arguments go to the pipeline (``num_inference_steps``, ``generator``,
        ``height``, ``width``, ``output_type``, …). Returns the pipeline's output.

        Strength schedules (UNet strength per denoising step, :mod:`lorakernels.schedule`):
        from the prompt syntax (``<lora:ink:0.2@0,1@0.5>``, ``<lora:ink:1:start=5:stop=15>``)
        or ``lora_schedules``, one ``{adapter: schedule}`` mapping (or ``None``) per prompt,
        where a schedule is a number, a list of per-step strengths or a callable
        ``(step, sigma) -> strength``; it replaces that prompt's UNet strength for the adapter
        (its text-encoder strength stays the tag's). The whole call is one batch whose
        strengths are rewritten in place before each UNet call (:mod:`.step_strengths`).
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
        te_mixes = [p.text_encoder for p in parsed]
        unet_mixes = [p.unet for p in parsed]
        texts = [p.text for p in parsed]
        pipe = self.pipe
        do_cfg = (
            guidance_scale > 1.0
            and getattr(getattr(pipe.unet, "config", None), "time_cond_proj_dim", None) is None
        )
        schedules = self._schedules(parsed, lora_schedules)
        steps = None
        if any(schedules):
            steps = StepStrengths(
                pipe,
                self.managers["unet"],
                unet_mixes,
                schedules,
                lambda m: _expand(m, num_images_per_prompt, do_cfg, uncond_lora),
            )
            unet_batch = steps.initial()
        else:
            unet_batch = _expand(unet_mixes, num_images_per_prompt, do_cfg, uncond_lora)
        embeds = self.encode(texts, negative_prompt, te_mixes, do_cfg)
        with ExitStack() as stack:
            batch = stack.enter_context(self.managers["unet"].use(unet_batch))
            if steps is not None:
                stack.enter_context(steps.running(batch, pipe_kwargs))
            if cache_cross_attention:
                stack.enter_context(self.cross_attention_cache())
            return pipe(
                **embeds,
                num_images_per_prompt=num_images_per_prompt,
                guidance_scale=guidance_scale,
                **pipe_kwargs,
            )

    def _schedules(
        self, parsed: Sequence[Any], given: Sequence[Mapping[str, Schedule] | None] | None
    ) -> list[dict[str, Schedule]]:
        """Per prompt ``{canonical adapter: schedule}``: the prompt's tag schedules, replaced
        per adapter by ``given`` (``lora_schedules``)."""
        out = [dict(p.unet_schedule) for p in parsed]
        if given is None:
            return out
        if isinstance(given, Mapping | str) or not isinstance(given, Sequence):
            raise TypeError("lora_schedules: expected one {adapter: schedule} mapping per prompt")
        if len(given) != len(parsed):
            raise ValueError(
                f"lora_schedules has {len(given)} entries for {len(parsed)} prompts (one "
                "mapping or None per prompt)"
            )
        for i, per_prompt in enumerate(given):
            if per_prompt is None:
                continue
            if not isinstance(per_prompt, Mapping):
                raise TypeError(f"lora_schedules[{i}]: expected a mapping adapter -> schedule")
            for name, sched in per_prompt.items():
                where = f"lora_schedules[{i}][{name!r}]"
                try:
                    canon = self.library.resolve(name)
                except KeyError as exc:
                    raise KeyError(f"{where}: {exc.args[0]}") from None
                out[i][canon] = check_schedule(sched, where)
        return out

    def encode(
        self,
        texts: Sequence[str],
        negative_prompt: str | Sequence[str] | None,
        te_mixtures: Sequence[dict[str, float]],
        do_cfg: bool,
    ) -> dict[str, Any]:
        """Prompt embeddings with per-prompt text-encoder LoRAs (one row per prompt).

        ``texts`` are prompts with their tags removed, ``te_mixtures`` one ``{adapter:
        strength}`` per prompt (applied to its negative prompt too); returns the keyword
        arguments diffusers' pipeline takes (``prompt_embeds``, ``negative_prompt_embeds``,
        and the pooled ones for SDXL)."""
        te_mixes = te_mixtures
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
                    prompt=texts,
                    device=device,
                    num_images_per_prompt=1,
                    do_classifier_free_guidance=do_cfg,
                    negative_prompt=negative_prompt,
                )
                names = (
                    "prompt_embeds",
                    "negative_prompt_embeds",
                    "pooled_prompt_embeds",
                    "negative_pooled_prompt_embeds",
                )
                return {k: v for k, v in zip(names, out, strict=True) if v is not None}
            pos, neg = pipe.encode_prompt(texts, device, 1, do_cfg, negative_prompt)
        out = {"prompt_embeds": pos}
        if neg is not None:
            out["negative_prompt_embeds"] = neg
        return out


def _expand(
    mixtures: Sequence[dict[str, float]], images_per_prompt: int, guidance: bool, uncond: bool
) -> list[dict[str, float]]:
    """Per-prompt mixtures → the UNet batch's, in diffusers' order (as
    :meth:`lorakernels.LoRABatch.expand`): each prompt's images consecutively, the
    unconditional half first (``uncond=False``: the base model there)."""
    if not isinstance(images_per_prompt, int) or images_per_prompt < 1:
        raise ValueError(f"num_images_per_prompt must be an int >= 1, got {images_per_prompt!r}")
    cond = [dict(m) for m in mixtures for _ in range(images_per_prompt)]
    if not guidance:
        return cond
    return ([dict(m) for m in cond] if uncond else [{} for _ in cond]) + cond


def patch(
    pipe: Any,
    targets: TargetName | None = None,
    *,
    library: AdapterLibrary | None = None,
    max_resident_adapters: int | None = None,
    resident_bytes: int | None = None,
    backend: str | None = None,
) -> DiffusersLoRA:
    """Patch ``pipe`` (or a UNet) for multi-LoRA serving; the handle is kept on the pipeline
    so :func:`generate` finds it. Patching twice returns the existing handle."""
    existing = getattr(pipe, "_lorakernels", None)
    if isinstance(existing, DiffusersLoRA):
        return existing
    handle = DiffusersLoRA(
        pipe,
        targets,
        library=library,
        max_resident_adapters=max_resident_adapters,
        resident_bytes=resident_bytes,
        backend=backend,
    )
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
