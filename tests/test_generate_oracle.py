"""``lorakernels.diffusers.generate`` against an oracle that shares none of its machinery.

The oracle is diffusers alone: for every prompt, its own copy of the text encoder(s) and the
UNet with that prompt's LoRAs merged into the weights (``W + strength * alpha / r * up @ down``,
computed here from the factors written to the files, in float64), run through the stock
pipeline one prompt at a time with classifier-free guidance and the prompt's negative prompt.
``uncond_lora=False`` is modelled by a UNet that runs the unconditional half of the guidance
batch on the base weights and the conditional half on the merged ones.

What it catches (each shown by breaking the code on purpose): the text-encoder LoRA never
applied, text-encoder and UNet strengths swapped, ``uncond_lora`` ignored. Guards check that
each of those would move the result far beyond the tolerance, so the comparison has power.
"""

from __future__ import annotations

import copy
from dataclasses import replace

import diffusers  # noqa: F401  ([dev] installs it: a broken install fails, not skips)
import pytest
import torch
from lora_files import SDXL_KOHYA_PREFIX, kohya_state_dict, lora_targets, make_layers, save
from tiny_pipelines import tiny_sd_pipeline, tiny_sdxl_pipeline
from torch import Tensor

from lorakernels.integrations.diffusers import generate, patch

NAMES = ("ink", "cyber", "tarot")
STEPS = 2
GUIDANCE = 7.5

# (prompt with tags, text without tags, negative prompt, {name: te}, {name: unet})
SD_CASES = [
    ("<lora:ink:0.8> a cat", "a cat", "blurry", {"ink": 0.8}, {"ink": 0.8}),
    (
        "<lora:cyber:1> <lora:tarot:-0.5> a city",
        "a city",
        "",
        {"cyber": 1.0, "tarot": -0.5},
        {"cyber": 1.0, "tarot": -0.5},
    ),
    ("<lora:tarot:0.3:1.2> a fox", "a fox", "dark", {"tarot": 0.3}, {"tarot": 1.2}),
    ("<lora:ink:1:0> a dog", "a dog", "ugly", {"ink": 1.0}, {}),  # text encoder only
    ("a tree", "a tree", "noise", {}, {}),
]
SDXL_CASES = [
    ("<lora:ink:0.2:1> a cat", "a cat", "blurry", {"ink": 0.2}, {"ink": 1.0}),
    ("<lora:cyber:1:0> a dog", "a dog", "", {"cyber": 1.0}, {}),  # text encoders only
    (
        "<lora:ink:-0.6> <lora:cyber:0.5> a fox",
        "a fox",
        "dark",
        {"ink": -0.6, "cyber": 0.5},
        {"ink": -0.6, "cyber": 0.5},
    ),
]
MODELS = {
    "sd15": (tiny_sd_pipeline, ("text_encoder",), SD_CASES, 2),
    "sdxl": (tiny_sdxl_pipeline, ("text_encoder", "text_encoder_2"), SDXL_CASES, 1),
}


def _write_loras(folder, pipe, encoders, sdxl):
    """Three kohya files (UNet transformer blocks + every text encoder); returns their factors."""
    targets = {"unet": lora_targets(pipe.unet, "kohya")}
    targets.update({c: lora_targets(getattr(pipe, c), "text") for c in encoders})
    factors = {}
    for i, name in enumerate(NAMES):
        layers = make_layers(targets, rank=4, alpha=2.0, seed=300 + i)
        # smaller factors keep 2 denoising steps well-conditioned while the LoRA stays visible
        layers = {
            c: {p: replace(f, down=0.4 * f.down, up=0.4 * f.up) for p, f in mods.items()}
            for c, mods in layers.items()
        }
        sd = kohya_state_dict(layers, SDXL_KOHYA_PREFIX, pipe.unet) if sdxl else None
        save(folder / f"{name}.safetensors", sd or kohya_state_dict(layers))
        factors[name] = layers
    return factors


def _merged(module, component, strengths, factors):
    """A copy of ``module`` with ``sum strength * alpha / r * up @ down`` added to its weights."""
    out = copy.deepcopy(module)
    with torch.no_grad():
        for name, w in strengths.items():
            for path, f in factors[name].get(component, {}).items():
                layer = out.get_submodule(path)
                scale = 1.0 if f.alpha is None else f.alpha / f.down.shape[0]
                delta = f.up.flatten(1).double() @ f.down.flatten(1).double()
                layer.weight += (w * scale * delta).reshape(layer.weight.shape).float()
    return out


def _half(v, rows: slice, n: int):
    if isinstance(v, Tensor) and v.dim() > 0 and v.shape[0] == n:
        return v[rows]
    if isinstance(v, dict):
        return {k: _half(x, rows, n) for k, x in v.items()}
    return v


def _uncond_on_base(base, lora_unet):
    """``lora_unet`` whose forward runs the guidance batch's first (unconditional) half on
    ``base`` and its second half on its own weights."""
    lora_forward = lora_unet.forward

    def forward(sample, timestep, encoder_hidden_states, *args, **kwargs):
        n, h = sample.shape[0], sample.shape[0] // 2
        kwargs["return_dict"] = False
        halves = []
        for fn, rows in ((base, slice(0, h)), (lora_forward, slice(h, n))):
            a = [_half(v, rows, n) for v in (sample, timestep, encoder_hidden_states, *args)]
            kw = {k: _half(v, rows, n) for k, v in kwargs.items()}
            halves.append(fn(*a, **kw)[0])
        return (torch.cat(halves),)

    lora_unet.forward = forward
    return lora_unet


def _oracle(pristine, encoders, case, factors, latents, n_img, uncond_lora=True):
    """One prompt through the stock pipeline with its LoRAs merged into private copies."""
    _, text, negative, te, unet = case
    parts = dict(pristine.components)
    for c in encoders:
        parts[c] = _merged(getattr(pristine, c), c, te, factors)
    parts["unet"] = _merged(pristine.unet, "unet", unet, factors)
    if not uncond_lora:
        parts["unet"] = _uncond_on_base(pristine.unet, parts["unet"])
    pipe = type(pristine)(**parts)
    pipe.set_progress_bar_config(disable=True)
    return pipe(
        prompt=text,
        negative_prompt=negative,
        latents=latents,
        num_images_per_prompt=n_img,
        guidance_scale=GUIDANCE,
        num_inference_steps=STEPS,
        output_type="latent",
        height=8,
        width=8,
    ).images


class Oracle:
    """:func:`_oracle` per prompt, memoised (the guards reuse many of the same runs)."""

    def __init__(self, pristine, encoders, factors, latents, n_img):
        self.args = (pristine, encoders, factors, latents, n_img)
        self.memo: dict = {}

    def __call__(self, i, case, *, uncond_lora=True, te=None, unet=None):
        pristine, encoders, factors, latents, n_img = self.args
        te = case[3] if te is None else te
        unet = case[4] if unet is None else unet
        uncond_lora = uncond_lora or not unet  # without a UNet LoRA both halves are base
        key = (i, tuple(sorted(te.items())), tuple(sorted(unet.items())), uncond_lora)
        if key not in self.memo:
            rows = slice(i * n_img, (i + 1) * n_img)
            run = (*case[:3], te, unet)
            self.memo[key] = _oracle(
                pristine, encoders, run, factors, latents[rows], n_img, uncond_lora
            )
        return self.memo[key]


@pytest.mark.parametrize("model", list(MODELS))
def test_generate_matches_per_prompt_merged_diffusers(tmp_path, model):
    build, encoders, cases, n_img = MODELS[model]
    pristine = build()
    factors = _write_loras(tmp_path, pristine, encoders, sdxl=model == "sdxl")
    pipe = build()
    patch(pipe).load_dir(tmp_path)
    g = torch.Generator().manual_seed(11)
    latents = torch.randn(len(cases) * n_img, 4, 8, 8, generator=g)
    oracle = Oracle(pristine, encoders, factors, latents, n_img)
    for uncond_lora in (True, False):
        got = generate(
            pipe,
            [c[0] for c in cases],
            negative_prompt=[c[2] for c in cases],
            uncond_lora=uncond_lora,
            latents=latents,
            num_images_per_prompt=n_img,
            guidance_scale=GUIDANCE,
            num_inference_steps=STEPS,
            output_type="latent",
            height=8,
            width=8,
        ).images
        atol = 2e-5 * float(got.abs().max())  # Euler latents are scaled by sigma (~15)
        for i, case in enumerate(cases):
            want = oracle(i, case, uncond_lora=uncond_lora)
            err = float((got[i * n_img : (i + 1) * n_img] - want).abs().max())
            tol = atol + 1e-4 * float(want.abs().max())
            assert err <= tol, f"uncond_lora={uncond_lora} {case[0]!r}: max error {err:.3g}"
            # guards: each defect this test exists for would move prompt i far beyond tol
            _, _, _, te, unet = case
            alternatives = []
            if te:  # the text-encoder LoRA never applied
                alternatives.append(oracle(i, case, uncond_lora=uncond_lora, te={}))
            if te != unet:  # strengths swapped between text encoder and UNet
                alternatives.append(oracle(i, case, uncond_lora=uncond_lora, te=unet, unet=te))
            if unet and not uncond_lora:  # uncond_lora=False ignored
                alternatives.append(oracle(i, case, uncond_lora=True))
            for alt in alternatives:
                assert float((alt - want).abs().max()) > 50 * tol, f"{case[0]!r}: guard too weak"
