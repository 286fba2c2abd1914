"""diffusers is the oracle: per-sample outputs of our patched UNet equal diffusers' own
``load_lora_into_unet`` + ``set_adapters`` run one sample at a time; per-prompt generation in one
batch equals one-prompt runs; the cross-attention K/V cache changes nothing."""

from __future__ import annotations

import copy

import diffusers  # noqa: F401  ([dev] installs it: a broken install fails, not skips)
import peft  # noqa: F401  ([dev] installs it: a broken install fails, not skips)
import pytest
import torch
from lora_files import (
    CROSS_DIM,
    attnprocs_state_dict,
    diffusers_lora_state_dict,
    kohya_state_dict,
    lora_targets,
    make_layers,
    peft_state_dict,
    save,
    tiny_clip,
    tiny_sd15_unet,
    tiny_sdxl_unet,
)

from lorakernels.integrations.diffusers import DiffusersLoRA, generate, patch
from lorakernels.plan import use_plan

SPELLINGS = {
    "kohya": lambda layers, unet: kohya_state_dict(layers),
    "kohya_sgm": lambda layers, unet: kohya_state_dict(layers, sgm_unet=unet),
    "attnprocs": lambda layers, unet: attnprocs_state_dict(layers, prefix=False),
    "attnprocs_unet_prefix": lambda layers, unet: attnprocs_state_dict(layers, prefix=True),
    "diffusers_lora": lambda layers, unet: diffusers_lora_state_dict(layers),
    "peft": lambda layers, unet: peft_state_dict(layers),
}


def _unet_inputs(unet, n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    size = unet.config.sample_size
    x = torch.randn(n, unet.config.in_channels, size, size, generator=g)
    ctx = torch.randn(n, 7, CROSS_DIM, generator=g)
    kwargs = {}
    if unet.config.addition_embed_type == "text_time":
        kwargs["added_cond_kwargs"] = {
            "text_embeds": torch.randn(n, CROSS_DIM, generator=g),
            "time_ids": torch.randn(n, 6, generator=g),
        }
    return x, ctx, kwargs


def _diffusers_per_sample(unet, files, mixtures, pipeline_cls, inputs):
    """Run diffusers' own loading, one sample and one set_adapters call at a time.

    Returns the outputs and the set of module paths diffusers gave a LoRA."""
    ref = copy.deepcopy(unet)
    for name, path in files.items():
        sd, alphas = pipeline_cls.lora_state_dict(str(path))
        if any(k.startswith("unet.") for k in sd):
            pipeline_cls.load_lora_into_unet(sd, alphas, ref, adapter_name=name)
        else:  # diffusers' old unprefixed attn-procs spelling is UNet-only
            ref.load_lora_adapter(sd, prefix=None, network_alphas=alphas, adapter_name=name)
    x, ctx, kwargs = inputs
    outs = []
    for s, mix in enumerate(mixtures):
        if mix:
            ref.enable_adapters()
            ref.set_adapters(list(mix), weights=list(mix.values()))
        else:
            ref.disable_adapters()
        sub = {k: {kk: vv[s : s + 1] for kk, vv in v.items()} for k, v in kwargs.items()}
        with torch.no_grad():
            outs.append(ref(x[s : s + 1], 10, ctx[s : s + 1], **sub).sample)
    adapted = {n.removesuffix(".lora_A") for n, _ in ref.named_modules() if n.endswith(".lora_A")}
    return torch.cat(outs), adapted


@pytest.mark.parametrize(
    "model,spelling,kind",
    [
        ("sd15", "kohya", "kohya"),
        # LoCon: 3x3 resnet and sampler convs too (lora_down [r, C, 3, 3], lora_up [N, r, 1, 1])
        ("sd15", "kohya", "locon"),
        ("sd15", "attnprocs", "attn"),
        ("sd15", "attnprocs_unet_prefix", "attn"),
        ("sd15", "diffusers_lora", "attn"),
        ("sd15", "peft", "attn"),
        # kohya with SGM block names is checked against diffusers' key converter in the
        # formats tests; diffusers' own loader does not map the tiny SDXL layout's SGM names
        ("sdxl", "kohya", "kohya"),
        ("sdxl", "peft", "attn"),
    ],
)
def test_unet_mixed_batch_matches_diffusers(tmp_path, model, spelling, kind):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    unet = copy.deepcopy(tiny_sd15_unet() if model == "sd15" else tiny_sdxl_unet())
    pipeline_cls = StableDiffusionPipeline if model == "sd15" else StableDiffusionXLPipeline
    targets = {"unet": lora_targets(unet, kind)}
    files = {}
    for i, name in enumerate(["ink", "cyber", "tarot"]):
        # alpha only where the spelling can store it (kohya); rank varies per adapter
        alpha = (2.0 * (i + 1)) if spelling.startswith("kohya") else None
        # LoCon reaches conv_out (4 channels), where the bank refuses ranks above min(K, N)
        rank = 2 + i if kind == "locon" else 2 + 2 * i
        layers = make_layers(targets, rank=rank, alpha=alpha, seed=10 + i)
        sd = {k: v * 0.3 for k, v in SPELLINGS[spelling](layers, unet).items()}
        files[name] = save(tmp_path / f"{name}.safetensors", sd)
    mixtures = [{"ink": 1.0}, {}, {"cyber": 0.7, "tarot": -0.5}, {"tarot": 1.3}]
    inputs = _unet_inputs(unet, len(mixtures))
    expect, adapted = _diffusers_per_sample(unet, files, mixtures, pipeline_cls, inputs)
    # diffusers applied every layer of the files (a layer it dropped would hide in both)
    assert adapted == set(targets["unet"]), sorted(set(targets["unet"]) ^ adapted)[:5]

    lora = DiffusersLoRA(unet)
    for name, path in files.items():
        lora.load(path, name)
    x, ctx, kwargs = inputs
    with lora.use(unet=mixtures), torch.no_grad():
        got = unet(x, 10, ctx, **kwargs).sample
    torch.testing.assert_close(got, expect, rtol=2e-4, atol=2e-4)
    # and the base samples are the untouched UNet
    with torch.no_grad():
        base = tiny_sd15_unet() if model == "sd15" else tiny_sdxl_unet()
        torch.testing.assert_close(
            got[1:2],
            base(
                x[1:2],
                10,
                ctx[1:2],
                **{k: {kk: vv[1:2] for kk, vv in v.items()} for k, v in kwargs.items()},
            ).sample,
            rtol=1e-5,
            atol=1e-5,
        )


# ---------------------------------------------------------------------- pipelines
def _tokenizer():
    from transformers import CLIPTokenizer

    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in letters:
        vocab[ch] = len(vocab)
    for ch in letters:
        vocab[ch + "</w>"] = len(vocab)
    tok = CLIPTokenizer(vocab=vocab, merges=[])
    tok.model_max_length = 16
    return tok


def _tiny_sd_pipeline():
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline

    torch.manual_seed(0)
    vae = AutoencoderKL(
        block_out_channels=(8,),
        norm_num_groups=8,
        latent_channels=4,
        down_block_types=("DownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",),
    )
    pipe = StableDiffusionPipeline(
        vae=vae.eval(),
        text_encoder=copy.deepcopy(tiny_clip()),
        tokenizer=_tokenizer(),
        unet=copy.deepcopy(tiny_sd15_unet()),
        scheduler=DDIMScheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("loras")
    unet, te = tiny_sd15_unet(), tiny_clip()
    for i, name in enumerate(["ink", "cyber", "tarot"]):
        layers = make_layers(
            {"unet": lora_targets(unet, "kohya"), "text_encoder": lora_targets(te, "text")},
            rank=4,
            alpha=4.0,
            seed=100 + i,
        )
        sd = {k: v * 0.5 for k, v in kohya_state_dict(layers).items()}
        meta = {"ss_output_name": f"{name}_v1"}
        save(folder / f"{name}.safetensors", sd, meta)
    return folder


def _run(pipe, prompts, latents, **kw):
    return generate(
        pipe,
        prompts,
        latents=latents,
        num_inference_steps=2,
        output_type="latent",
        height=8,
        width=8,
        **kw,
    ).images


def test_generate_per_prompt_loras_in_one_batch_equals_single_runs(lora_dir):
    pipe = _tiny_sd_pipeline()
    lora = patch(pipe)
    assert lora.load_dir(lora_dir) == ["cyber", "ink", "tarot"]
    prompts = [
        "<lora:ink:0.8> a cat",
        "<lora:cyber_v1:1> <lora:tarot:0.5> a city",  # alias from ss_output_name
        "a dog",
        "<lora:tarot:0.3:1.2> a tree",  # te 0.3, unet 1.2
    ]
    n_img = 2
    g = torch.Generator().manual_seed(1)
    latents = torch.randn(len(prompts) * n_img, 4, 8, 8, generator=g)
    batched = _run(pipe, prompts, latents, num_images_per_prompt=n_img)
    assert lora.loaded == ["cyber", "ink", "tarot"]  # loaded lazily, on first use
    # fp32 batching noise: a prompt alone and in a batch may take different (equally valid)
    # plans, merged weights or the unmerged term; these differ by ~7e-6 x max|y| after two
    # steps of this pipeline (measured: 1.5e-4 at max|y| = 21.6), so allow 2e-5 x max|y|
    atol = 2e-5 * float(batched.abs().max())
    for i, p in enumerate(prompts):
        single = _run(pipe, [p], latents[i * n_img : (i + 1) * n_img], num_images_per_prompt=n_img)
        torch.testing.assert_close(
            batched[i * n_img : (i + 1) * n_img], single, rtol=1e-4, atol=atol
        )
    # the LoRAs matter: prompt 0 without its tag differs far beyond the tolerance
    plain = _run(pipe, ["a cat"], latents[:n_img], num_images_per_prompt=n_img)
    assert (plain - batched[:n_img]).abs().max() > 100 * atol


def test_cross_attention_cache_equals_uncached(lora_dir):
    pipe = _tiny_sd_pipeline()
    lora = patch(pipe)
    lora.load_dir(lora_dir, lazy=False)
    prompts = ["<lora:ink:1> a cat", "<lora:cyber:0.6> <lora:ink:-0.4> a dog", "a fox"]
    latents = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    # bit-exact under one fixed plan; under "auto" a later call may take merged weights where
    # an earlier one ran unmerged (the planner merges a mixture once it has paid off), which
    # is fp32 noise, not a cache effect
    with use_plan("unmerged"):
        cached = _run(pipe, prompts, latents, cache_cross_attention=True)
        uncached = _run(pipe, prompts, latents, cache_cross_attention=False)
    torch.testing.assert_close(cached, uncached, rtol=0, atol=0)
    # and the cache really was used: to_k saw one call per generation with caching on
    layer = pipe.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn2.to_k
    calls = []
    orig = layer._compute
    layer._compute = lambda x, b: calls.append(1) or orig(x, b)
    _run(pipe, prompts, latents, cache_cross_attention=True)
    assert len(calls) == 1
    del layer._compute


def test_unknown_tag_lists_known_names(lora_dir):
    pipe = _tiny_sd_pipeline()
    lora = patch(pipe)
    lora.load_dir(lora_dir)
    with pytest.raises(KeyError, match="cyber"):
        _run(pipe, ["<lora:nope:1> a cat"], torch.randn(1, 4, 8, 8))
    assert lora.loaded == []


def test_failed_file_load_leaves_pipeline_unchanged(tmp_path, lora_dir):
    pipe = _tiny_sd_pipeline()
    lora = patch(pipe)
    lora.load(lora_dir / "ink.safetensors")
    bad = kohya_state_dict(
        make_layers({"unet": lora_targets(tiny_sd15_unet(), "attn")}, rank=4, seed=5)
    )
    bad["lora_unet_not_a_module.lora_down.weight"] = torch.randn(4, 8)
    bad["lora_unet_not_a_module.lora_up.weight"] = torch.randn(8, 4)
    path = save(tmp_path / "bad.safetensors", bad)
    state = {c: dict(m.slots) for c, m in lora.managers.items()}
    with pytest.raises(Exception, match="not_a_module"):
        lora.load(path)
    assert {c: dict(m.slots) for c, m in lora.managers.items()} == state
    assert lora.loaded == ["ink"]


def _tiny_sdxl_pipeline():
    from diffusers import (
        AutoencoderKL,
        EulerDiscreteScheduler,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )

    torch.manual_seed(0)
    # the two encoders' hidden states are concatenated: 16 + 16 = the UNet's 32
    te1, te2 = tiny_clip(hidden=16), tiny_clip(projection=True, hidden=16)
    unet = UNet2DConditionModel(
        sample_size=8,
        block_out_channels=(16, 32),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2),
        norm_num_groups=8,
        cross_attention_dim=32,
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=4,
        projection_class_embeddings_input_dim=4 * 6 + 16,
    ).eval()
    vae = AutoencoderKL(
        block_out_channels=(8,),
        norm_num_groups=8,
        latent_channels=4,
        down_block_types=("DownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",),
    )
    pipe = StableDiffusionXLPipeline(
        vae=vae.eval(),
        text_encoder=copy.deepcopy(te1),
        text_encoder_2=copy.deepcopy(te2),
        tokenizer=_tokenizer(),
        tokenizer_2=_tokenizer(),
        unet=unet,
        scheduler=EulerDiscreteScheduler(),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_sdxl_generate_with_both_text_encoders(tmp_path):
    from lora_files import SDXL_KOHYA_PREFIX

    pipe = _tiny_sdxl_pipeline()
    layers = make_layers(
        {
            "unet": lora_targets(pipe.unet, "kohya"),
            "text_encoder": lora_targets(pipe.text_encoder, "text"),
            "text_encoder_2": lora_targets(pipe.text_encoder_2, "text"),
        },
        rank=4,
        alpha=2.0,
        seed=7,
    )
    sd = {k: v * 0.5 for k, v in kohya_state_dict(layers, SDXL_KOHYA_PREFIX, pipe.unet).items()}
    save(tmp_path / "xl_style.safetensors", sd)
    lora = patch(pipe)
    lora.load_dir(tmp_path)
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    prompts = ["<lora:xl_style:1> a cat", "a cat"]
    batched = _run(pipe, prompts, latents)
    assert set(lora.managers) == {"unet", "text_encoder", "text_encoder_2"}
    assert all("xl_style" in m.slots for m in lora.managers.values())
    atol = 2e-5 * float(batched.abs().max())  # Euler latents are scaled by sigma (~15)
    single = _run(pipe, prompts[:1], latents[:1])
    torch.testing.assert_close(batched[:1], single, rtol=1e-4, atol=atol)
    base = _run(pipe, prompts[1:], latents[1:])
    torch.testing.assert_close(batched[1:], base, rtol=1e-4, atol=atol)
    assert (batched[0] - batched[1]).abs().max() > 1e-3
