"""The benchmark suite's own correctness: workloads, baselines, checks, reports, the CLI.

No timing is asserted anywhere: these tests check that every provider the benchmark times
computes the same layer as the float64 oracle, that a wrong provider is caught, and that the
CLI writes what it promises.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import replace

import pytest
import torch

from lorakernels.bench import report
from lorakernels.bench.cli import main
from lorakernels.bench.providers import Base, Loop, Provider, flop_ideal, layer_providers
from lorakernels.bench.runner import check, check_providers, reference
from lorakernels.bench.timing import TimingConfig, time_side_by_side
from lorakernels.bench.workloads import (
    SD15_SHAPES,
    LayerShape,
    LayerWorkload,
    build_case,
    layer_suite,
    smoke_suite,
)

CPU = torch.device("cpu")
SMALL = LayerShape("test", "odd", 33, 40, 56)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"mixture": 2, "popularity": "uniform", "frac_empty": 0.25},
        {"ranks": (4, 16, 3), "mixture": 3, "popularity": "zipf", "adapters": 5},
        {"popularity": "skewed", "samples": 7, "adapters": 3, "ranks": (5,)},
        {"popularity": "identical", "frac_empty": 0.5},
        # long rows: merge/fuse run one GEMM per run of samples instead of gathering rows
        {"shape": LayerShape("test", "long", 260, 24, 40), "samples": 4, "adapters": 2},
    ],
)
def test_every_provider_matches_the_oracle(dtype, kw):
    args = {"shape": SMALL, "samples": 8, "adapters": 4, "ranks": (8,), **kw}
    w = LayerWorkload(dtype=dtype, seed=3, **args)
    case = build_case(w, CPU)
    checked, info = check_providers(case, layer_providers(CPU, all_backends=True))
    ran = [c.provider.name for c in checked if c.ok]
    assert {"base", "ours", "merge", "fuse", "peft", "loop"} <= set(ran)
    for c in checked:
        assert c.skipped is None or not c.skipped.startswith("WRONG"), (c.provider.name, c.skipped)
    # the check is meaningful: the LoRA term dwarfs the tolerance
    assert info["lora_term"] > 10 * info["tol"]


class _DropsOneAdapter(Provider):
    """A broken provider: the loop baseline that forgets the last adapter."""

    name = "broken"

    def prepare(self, case):
        last = sorted(case.adapters)[-1]
        broken = replace(
            case, mixtures=[{k: v for k, v in m.items() if k != last} for m in case.mixtures]
        )
        return Loop().prepare(broken)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_a_wrong_provider_is_caught(dtype):
    case = build_case(LayerWorkload(SMALL, samples=8, adapters=4, dtype=dtype), CPU)
    ref = reference(case)
    assert check(case, Base(), ref).ok
    bad = check(case, _DropsOneAdapter(), ref)
    assert not bad.ok and bad.skipped.startswith("WRONG")


def test_default_table_workloads():
    ws = layer_suite(["fp32", "bf16"])
    assert len(ws) == 16  # 4 SD1.5 shapes x mixtures of 1 and 2 x 2 dtypes
    assert {(w.shape.rows, w.shape.K, w.shape.N) for w in ws} == {
        (4096, 320, 320),
        (77, 768, 320),
        (1024, 640, 640),
        (256, 1280, 1280),
    }
    for w in ws:
        mixes = w.mixtures()
        assert len(mixes) == 16 and all(len(m) == w.mixture for m in mixes)
        # distinct popularity: 8 adapters, each the main adapter of exactly 2 samples
        mains = Counter(sorted(m)[0] if w.mixture == 1 else None for m in mixes)
        if w.mixture == 1:
            assert set(mains.values()) == {2} and len(mains) == 8
        k, n = w.shape.K, w.shape.N
        assert w.ideal() == pytest.approx(flop_ideal(k, n, 16 * w.mixture))
    quick = layer_suite(["fp32"], row_factor=4)
    assert [w.shape.rows for w in quick[:4]] == [1024, 77, 256, 64]


def test_frac_empty_and_determinism():
    w = LayerWorkload(SMALL, samples=12, adapters=3, popularity="uniform", frac_empty=0.25)
    assert sum(1 for m in w.mixtures() if not m) == 3
    a, b = build_case(w, CPU), build_case(w, CPU)
    assert torch.equal(a.x, b.x) and a.mixtures == b.mixtures
    # samples without adapter lower the ideal: rank is averaged over rows
    assert w.ideal() == pytest.approx(flop_ideal(40, 56, 16 * 9 / 12))
    with pytest.raises(ValueError, match="popularity"):
        LayerWorkload(SMALL, popularity="nope")
    with pytest.raises(ValueError, match="mixture"):
        LayerWorkload(SMALL, adapters=2, mixture=3)


def test_time_side_by_side_shapes_results():
    calls = Counter()
    fns = {n: (lambda n=n: calls.update([n])) for n in ("a", "b")}
    out = time_side_by_side(fns, TimingConfig(repeats=3, warmup=1, min_sample_s=0.0))
    assert set(out) == {"a", "b"}
    assert all(len(t.times) == 3 and t.number == 1 and t.median >= 0 for t in out.values())
    assert calls == {"a": 4, "b": 4}  # 1 warm-up call + 3 timed


def test_cli_smoke_writes_json_plots_and_compares(tmp_path, capsys):
    out = tmp_path / "res"
    md = tmp_path / "RESULTS.md"
    md.write_text(
        f"# Results\n\nprose before\n\n{report.BEGIN}\nold\n{report.END}\n\nprose after\n"
    )
    rc = main(
        [
            "--smoke",
            "--suite",
            "layer",
            "--dtype",
            "fp32",
            "--out",
            str(out),
            "--markdown",
            str(md),
            "--threads",
            "1",
        ]
    )
    assert rc == 0
    doc = json.loads((tmp_path / "results" / "results.json").read_text())
    assert doc["schema"] == report.SCHEMA
    prov = doc["provenance"]
    for field in ("cpu", "threads", "versions", "git_sha", "date", "command"):
        assert field in prov
    assert prov["versions"]["torch"] == torch.__version__
    assert len(doc["layer"]) == len(smoke_suite(["fp32"]))
    for rec in doc["layer"]:
        for name in ("base", "ours", "merge", "peft", "loop"):
            assert rec["providers"][name]["median_ms"] > 0
    assert (out / "results.json").exists()
    assert sorted(p.name for p in (tmp_path / "results").glob("*.png")) == ["layer_smoke_fp32.png"]
    text = md.read_text()
    assert "prose before" in text and "prose after" in text and "\nold\n" not in text
    assert "ours/base" in text and "layer_smoke_fp32.png" in text
    capsys.readouterr()
    rc = main(["--compare", str(out / "results.json"), str(out / "results.json")])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "1.000" in printed and "ours" in printed


def test_cli_rejects_bad_arguments(tmp_path, capsys):
    assert main(["--smoke", "--dtype", "fp8"]) == 2
    assert "fp8" in capsys.readouterr().err
    bogus = tmp_path / "x.json"
    bogus.write_text("{}")
    assert main(["--compare", str(bogus), str(bogus)]) == 2


def test_list_names_every_workload(capsys):
    assert main(["--list", "--suite", "layer"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 16 and all("layer|sd15" in ln for ln in lines)
    assert any(f"T{SD15_SHAPES[0].rows} " in ln for ln in lines)


@pytest.mark.slow
def test_unet_smoke_step():
    from lorakernels.bench.unet import UNetWorkload, run_unet

    rec = run_unet(UNetWorkload(model="tiny", latent=8, prompts=2, adapters=2, repeats=1), CPU)
    for name in ("base", "ours", "peft", "fused", "base_grouped"):
        assert "skipped" not in rec["providers"][name]
        assert rec["providers"][name]["median_ms"] > 0
    assert rec["ideal"] > 1.0


# ---------------------------------------------------------------------- report layout
def _fake_layer(dtype: str, ours_spread: float, ours_ms: float = 1.2) -> dict:
    def prov(ms: float, spread: float = 0.05) -> dict:
        return {"median_ms": ms, "spread": spread, "times_ms": [ms] * 5}

    w = {
        "suite": "layer",
        "key": f"k|{dtype}|{ours_spread}",
        "label": "down0 img (4096,320,320)",
        "ranks": [16],
        "samples": 16,
        "adapters": 8,
        "mixture": 1,
        "popularity": "distinct",
        "frac_empty": 0.0,
        "dtype": dtype,
        "ideal": 1.1,
    }
    provs = {
        "base": prov(1.0),
        "ours": prov(ours_ms, ours_spread),
        "merge": prov(1.5),
        "fuse": prov(2.0),
        "peft": prov(3.0),
        "loop": prov(4.0),
    }
    if dtype != "fp32":
        provs["base32"] = prov(2.0)
    return {"workload": w, "providers": provs}


def test_table_is_narrow_by_default_with_a_legend_and_wide_on_request():
    doc = {
        "mode": "quick",
        "notes": [],
        "model": [],
        "layer": [_fake_layer("fp32", 0.05), _fake_layer("bf16", 0.6, ours_ms=1.1)],
    }
    narrow = report.text_report(doc)
    wide = report.text_report(doc, wide=True)
    table = narrow.split("\n\n")[0].splitlines()
    assert max(map(len, table)) <= 130, "the default table must fit a terminal"
    assert "legend" in narrow and "--wide" in narrow
    for col in ("merge/base", "fuse/base", "ours/loop", "ours/base32", "target vs base32"):
        assert col not in table[1] and col in wide
    assert " NO" not in narrow and " NO" not in wide  # no cell that reads as a failure
    assert "+0.05 over" in table[3] and "met" in table[4]  # 1.2 vs 1.15; 1.1 <= 1.15
    assert table[3].endswith("5%") and table[4].endswith("60% !")  # the noisy row is marked
    assert "1 of 2 rows spread" in narrow


def test_plot_ticks_do_not_crowd_and_quick_plots_say_so(tmp_path, monkeypatch):
    ticks = report._log_ticks(0.008, 60.0)
    gaps = [b / a for a, b in zip(ticks, ticks[1:], strict=False)]
    assert 1 in ticks and min(gaps) >= (60 / 0.008) ** (1 / 9) * 0.999
    titles = []
    monkeypatch.setattr(report, "_bars", lambda *a, **k: titles.append(a[6]))
    doc = {
        "mode": "quick",
        "provenance": {"device_name": "cpu", "threads": 2},
        "layer": [_fake_layer("bf16", 0.1)],
        "model": [],
    }
    report.plot(doc, tmp_path)
    assert titles and all("QUICK MODE" in t for t in titles)


def test_settle_load_waits_then_picks_threads_and_warns_only_when_busy(monkeypatch):
    from lorakernels.bench import timing

    monkeypatch.setattr(timing.os, "cpu_count", lambda: 2)
    monkeypatch.setattr(timing.time, "sleep", lambda s: None)
    monkeypatch.setattr(timing, "busy_cpus", lambda: 0.3)  # an idle-ish 2-core machine
    quiet = timing.settle_load(5, verbose=False)
    assert quiet.threads is None and quiet.note is None
    readings = iter([1.9, 1.6, 1.6] + [1.6] * 10_000)
    monkeypatch.setattr(timing, "busy_cpus", lambda: next(readings))
    busy = timing.settle_load(0.0, verbose=False)
    assert busy.threads == 1 and "1.9 of 2 CPUs" in busy.note
    assert timing.settle_load(0.0, threads=2, verbose=False).threads == 2  # --threads wins


def test_bench_runs_without_triton(tmp_path):
    """``make bench`` installs ``.[bench]``, which has no triton: the suite must not need it."""
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['triton'] = None\n"  # any `import triton` now fails
        "from lorakernels.bench.cli import main\n"
        f"rc = main(['--smoke', '--suite', 'layer', '--dtype', 'fp32', '--no-plots', "
        f"'--out', {str(tmp_path)!r}])\n"
        "assert sys.modules.get('triton') is None\n"
        "sys.exit(rc)\n"
    )
    import os
    from pathlib import Path

    root = str(Path(__file__).resolve().parents[1])  # this tree's lorakernels, installed or not
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))
    res = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=600, env=env
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert "ours/base" in res.stdout
