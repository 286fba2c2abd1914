"""CUDA-graph capture and ``torch.compile`` on a GPU (``pytest -m gpu``; issue 9).

* a launch plan captured in a CUDA graph with one set of adapters, replayed after the batch
  tensors (rows, mixtures, strengths, scales, bank contents, x) were rewritten in place with
  others: the output must follow the new batch (fused and pair paths);
* the same through ``MultiLoRA``: a model captured once, ``batch.fill_`` with new mixtures,
  replay, against an eager run of the new mixtures;
* ``torch.compile(fullgraph=True, mode="reduce-overhead")`` on a small diffusers UNet with
  changing mixtures: no recompiles (``torch._dynamo.config.error_on_recompile``), outputs
  equal to eager.
"""

from __future__ import annotations

import pytest
import torch
from gpu_common import NO_CUDA, to_device
from test_triton_interpret import assert_close, bundled, forced_plan, make_case

from lorakernels import MultiLoRA
from lorakernels.kernels.triton import launch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_CUDA)]


@pytest.mark.parametrize("path", ["fused", "pair"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
def test_graph_replay_follows_in_place_batch_update(path, dtype):
    rows, k, n, ranks = [64, 64, 64, 64], 320, 640, [8, 24, 16, 4]
    fixed = {"max_rank": 24, "max_entries": 3, "entry_capacity": 8}
    case = make_case(dtype, rows, k, n, ranks, [[(0, 1.0)]] * 4, seed=4, **fixed)
    gpu = to_device(case.args)
    job = launch.plan_multi_lora_linear(*bundled(gpu, case.meta), plan=forced_plan(path, case))
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        job()  # warm-up: compiles the kernels outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        job()
    job.out.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    assert_close(job.out.cpu(), case)
    replays = [
        ([3, 90, 0, 163], [[(1, 1.0), (2, -0.5), (3, 2.0)], [(3, 0.7)], [(0, 1.0)], []]),
        ([1, 1, 120, 134], [[], [(2, 1.0), (1, 1.0)], [(1, -1.0), (0, 0.5), (2, 1.5)], [(3, 1)]]),
    ]
    for seed, (new_rows, new_mix) in enumerate(replays, start=5):
        new = make_case(dtype, new_rows, k, n, ranks, new_mix, seed=seed, **fixed)
        for name, tensor in new.args.items():
            if tensor is not None:
                gpu[name].copy_(tensor)
        job.out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        assert_close(job.out.cpu(), new)


def _model(dtype):
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(320, 640), torch.nn.GELU(), torch.nn.Linear(640, 320)
    ).to("cuda", dtype)


def _adapters(model, count: int, seed: int) -> dict[str, dict]:
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for i in range(count):
        r = (4, 16, 32)[i % 3]
        weights = {}
        for name, mod in model.named_modules():
            if isinstance(mod, torch.nn.Linear):
                n, k = mod.weight.shape
                a = torch.randn(r, k, generator=gen) / k**0.5
                b = torch.randn(n, r, generator=gen) / r**0.5
                weights[name] = (a.to(mod.weight), b.to(mod.weight), float(r))
        out[f"a{i}"] = weights
    return out


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
def test_captured_model_replays_new_mixtures_after_fill(dtype):
    model = _model(dtype)
    mlora = MultiLoRA(model, targets="*")
    for name, weights in _adapters(model, 3, seed=1).items():
        mlora.load(name, weights)
    x = torch.randn(4 * 50, 320, device="cuda", dtype=dtype)
    first = [{"a0": 1.0}, {}, {"a1": -0.5}, {"a2": 1.0}]
    batch = mlora.batch(first)
    with mlora.use(batch):
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            model(x)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = model(x)
    later = [
        [{"a2": 0.7, "a0": -1.0}, {"a1": 1.0}, {}, {"a0": 1.0, "a1": 1.0}],
        [{}, {"a2": 2.0}, {"a0": 0.3, "a1": 0.3, "a2": 0.3}, {"a1": -1.0}],
    ]
    for mixtures in later:
        batch.fill_(mixtures, mlora.slots)
        with mlora.use(batch):
            graph.replay()
            torch.cuda.synchronize()
            replayed = out.clone()
            eager = model(x)
        tol = 4 * torch.finfo(dtype).eps * eager.abs().max().item()
        assert (replayed.double() - eager.double()).abs().max().item() <= tol


def test_compiled_unet_changes_mixtures_without_recompiling():
    import torch._dynamo
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = (
        UNet2DConditionModel(
            sample_size=16,
            block_out_channels=(32, 64),
            layers_per_block=1,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            norm_num_groups=8,
            cross_attention_dim=64,
            attention_head_dim=(2, 4),
        )
        .to("cuda", torch.float16)
        .eval()
    )
    mlora = MultiLoRA(unet, targets="*attn*.to_*")
    gen = torch.Generator().manual_seed(2)
    for i in range(3):
        weights = {}
        for name, layer in mlora.layers.items():
            n, k = layer.weight.shape[:2]
            r = (4, 8, 16)[i]
            a = (torch.randn(r, k, generator=gen) / k**0.5).to("cuda", torch.float16)
            b = (torch.randn(n, r, generator=gen) / r**0.5).to("cuda", torch.float16)
            weights[name] = (a, b, float(r))
        mlora.load(f"s{i}", weights)
    sample = torch.randn(4, 4, 16, 16, device="cuda", dtype=torch.float16)
    ctx = torch.randn(4, 7, 64, device="cuda", dtype=torch.float16)
    t = torch.tensor([10.0], device="cuda")

    def step(s, c):
        return unet(s, t, encoder_hidden_states=c).sample

    compiled = torch.compile(step, fullgraph=True, mode="reduce-overhead")
    mixes = [
        [{"s0": 1.0}, {}, {"s1": 0.5, "s2": -1.0}, {"s2": 1.0}],
        [{"s2": 1.0}, {"s0": 1.0, "s1": 1.0}, {}, {"s1": -0.3}],
        [{}, {}, {"s0": 2.0}, {"s0": 0.5, "s1": 0.5, "s2": 0.5}],
    ]
    batch = mlora.batch(mixes[0])
    torch._dynamo.reset()
    saved = torch._dynamo.config.error_on_recompile
    torch._dynamo.config.error_on_recompile = True
    try:
        for mix in mixes * 2:
            batch.fill_(mix, mlora.slots)
            with mlora.use(batch):
                got = compiled(sample, ctx).clone()
                want = step(sample, ctx)
            tol = 8 * torch.finfo(torch.float16).eps * want.abs().max().item()
            assert (got.double() - want.double()).abs().max().item() <= tol
    finally:
        torch._dynamo.config.error_on_recompile = saved
