"""Results: provenance, the ratio tables (text and Markdown), JSON, PNG plots, ``--compare``.

A results document (what ``lorakernels bench`` writes as JSON)::

    {"schema": "lorakernels-bench/1",
     "provenance": {cpu, device, threads, versions, git sha, date, load average, command},
     "mode": "quick" | "default" | "full", "notes": [...],
     "layer": [record, ...],   # lorakernels.bench.runner.run_layer records
     "model": [record, ...]}   # lorakernels.bench.unet.run_unet records

Every ratio in a table divides two medians measured side by side in the same run. ``ours``
is the automatic backend; ``ideal`` is the FLOP-ideal ``time(ours) / time(base)``.
"""

from __future__ import annotations

import datetime
import importlib
import json
import math
import os
import platform
import subprocess
import sys
import textwrap
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from .timing import NOISY_SPREAD

SCHEMA = "lorakernels-bench/1"
BEGIN = "<!-- BEGIN GENERATED: lorakernels bench (do not edit by hand; regenerate) -->"
END = "<!-- END GENERATED -->"
LAYER_BASELINES = ("merge", "fuse", "peft", "loop")
MODEL_BASELINES = ("peft", "fused")
_MARGIN = 0.05  # the layer target: ours/base <= ideal + 0.05
_MODEL_MARGIN = 1.05  # the model target: ours/base <= 1.05 x ideal


# ---------------------------------------------------------------------- provenance
def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_sha() -> str | None:
    here = Path(__file__).resolve().parent
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10
        )
        if sha.returncode != 0:
            return None
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=here,
            capture_output=True,
            text=True,
            timeout=10,
        )
        return sha.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def _version(mod: str) -> str | None:
    try:
        return getattr(importlib.import_module(mod), "__version__", "?")
    except ImportError:
        return None


def provenance(device: torch.device, dtypes: Sequence[str], argv: Sequence[str]) -> dict:
    """Where and with what the numbers were measured."""
    from .. import __version__

    dev_name = _cpu_model()
    if device.type == "cuda":
        dev_name = torch.cuda.get_device_name(device)
    return {
        "device": str(device),
        "device_name": dev_name,
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "dtypes": list(dtypes),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": {
            "lorakernels": __version__,
            "torch": torch.__version__,
            "triton": _version("triton"),
            "peft": _version("peft"),
            "diffusers": _version("diffusers"),
        },
        "git_sha": _git_sha(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "loadavg_start": _loadavg(),
        "command": "lorakernels bench " + " ".join(argv),
    }


def _loadavg() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (OSError, AttributeError):
        return None


def finish_provenance(doc: dict) -> None:
    """Stamp the end of the run (load average: was the machine quiet?)."""
    doc["provenance"]["loadavg_end"] = _loadavg()


# ---------------------------------------------------------------------- ratios
def median(rec: dict, name: str) -> float | None:
    p = rec["providers"].get(name)
    return None if p is None or "median_ms" not in p else p["median_ms"]


def ratio(rec: dict, num: str, den: str) -> float | None:
    a, b = median(rec, num), median(rec, den)
    return None if a is None or b is None or b == 0 else a / b


def _fmt(v: float | None, digits: int = 2) -> str:
    return "—" if v is None else f"{v:.{digits}f}"


def _config(w: dict) -> str:
    ranks = w["ranks"]
    r = str(ranks[0]) if len(set(ranks)) == 1 else "/".join(map(str, ranks))
    out = f"S{w['samples']} L{w['adapters']} r{r} mix{w['mixture']} {w['popularity']}"
    if w["frac_empty"]:
        out += f" {round(100 * w['frac_empty'])}% none"
    return out


def _target(ratio_: float | None, line: float | None) -> str:
    """``met`` when ``ratio_ <= line``, else how far above the line (never a bare "NO")."""
    if ratio_ is None or line is None:
        return "—"
    return "met" if ratio_ <= line else f"+{ratio_ - line:.2f} over"


def spread(rec: dict, names: Sequence[str] = ("base", "ours")) -> float | None:
    """The larger repeat spread ((max - min) / median) of ``names`` in ``rec``; ``None``
    when fewer than 2 repeats were taken (nothing to spread)."""
    vals = []
    for n in names:
        p = rec["providers"].get(n, {})
        if p.get("spread") is not None and len(p.get("times_ms", ())) >= 2:
            vals.append(p["spread"])
    return max(vals) if vals else None


def _spread_cell(v: float | None) -> str:
    if v is None:
        return "—"
    return f"{100 * v:.0f}%" + (" !" if v > NOISY_SPREAD else "")


def _noisy_mark(rec: dict) -> str:
    v = spread(rec)
    return f" ! spread {100 * v:.0f}%" if v is not None and v > NOISY_SPREAD else ""


def noisy_rows(doc: dict) -> tuple[int, int]:
    """(rows whose base/ours repeats spread above NOISY_SPREAD, rows with a spread)."""
    vals = [spread(r) for r in doc.get("layer", []) + doc.get("model", [])]
    vals = [v for v in vals if v is not None]
    return sum(v > NOISY_SPREAD for v in vals), len(vals)


def _table(
    head: list[str], records: Sequence[dict], cells: Callable[[dict, dict, float | None], list]
) -> tuple[list[str], list[list[str]]]:
    """``head`` and a row per record, both ending in the spread column: ``cells(record,
    workload, ours/base ratio)`` gives the rest of a row."""
    rows = []
    for rec in records:
        row = cells(rec, rec["workload"], ratio(rec, "ours", "base"))
        rows.append([*row, _spread_cell(spread(rec))])
    return [*head, "spread"], rows


def layer_rows(records: Sequence[dict], wide: bool = True) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the layer table (one row per workload and dtype).

    ``wide=False``: the columns a first reader needs (see :func:`legend`)."""
    half = any(r["workload"]["dtype"] != "fp32" for r in records)
    onednn = any(median(r, "onednn") is not None for r in records)
    head = ["layer (T,K,N)", "config", "dtype", "base ms", "ours/base", "ideal", "target"]
    if onednn:
        head += ["onednn/base", "ours/onednn"]
    if wide:
        if half:
            head += ["ours/base32", "target vs base32"]
        head += [f"{b}/base" for b in LAYER_BASELINES] + [f"ours/{b}" for b in LAYER_BASELINES]
    else:
        head += ["ours/merge", "ours/peft"]

    def cells(rec: dict, w: dict, ob: float | None) -> list[str]:
        row = [
            w["label"],
            _config(w),
            w["dtype"],
            _fmt(median(rec, "base"), 1),
            _fmt(ob),
            _fmt(w["ideal"]),
            _target(ob, w["ideal"] + _MARGIN),
        ]
        if onednn:
            row += [_fmt(ratio(rec, "onednn", "base")), _fmt(ratio(rec, "ours", "onednn"))]
        if wide:
            if half:
                o32 = ratio(rec, "ours", "base32")
                row += [_fmt(o32), _target(o32, w["ideal"] + _MARGIN)]
            row += [_fmt(ratio(rec, b, "base")) for b in LAYER_BASELINES]
            row += [_fmt(ratio(rec, "ours", b)) for b in LAYER_BASELINES]
        else:
            row += [_fmt(ratio(rec, "ours", "merge")), _fmt(ratio(rec, "ours", "peft"))]
        return row

    return _table(head, records, cells)


def model_rows(records: Sequence[dict], wide: bool = True) -> tuple[list[str], list[list[str]]]:
    head = ["UNet", "latent", "adapters", "base s", "ours/base", "ideal", "target"]
    if wide:
        head += [
            "grouped base/base",
            "peft/base",
            "fused/base",
            "ours/peft",
            "ours/fused",
            "peak MB base/ours/peft/fused",
        ]
    else:
        head += ["ours/peft", "ours/fused"]

    def cells(rec: dict, w: dict, ob: float | None) -> list[str]:
        ideal = rec.get("ideal")
        base = median(rec, "base")
        row = [
            w["model"],
            f"{w['latent']}²",
            w["adapter_config"],
            _fmt(None if base is None else base / 1e3, 2),
            _fmt(ob),
            _fmt(ideal, 3),
            _target(ob, None if ideal is None else _MODEL_MARGIN * ideal),
        ]
        if wide:
            peaks = []
            for name in ("base", "ours", "peft", "fused"):
                p = rec["providers"].get(name, {})
                peaks.append("—" if p.get("peak_mb") is None else f"{p['peak_mb']:.0f}")
            row += [
                _fmt(ratio(rec, "base_grouped", "base")),
                _fmt(ratio(rec, "peft", "base")),
                _fmt(ratio(rec, "fused", "base")),
                _fmt(ratio(rec, "ours", "peft")),
                _fmt(ratio(rec, "ours", "fused")),
                "/".join(peaks),
            ]
        else:
            row += [_fmt(ratio(rec, "ours", "peft")), _fmt(ratio(rec, "ours", "fused"))]
        return row

    return _table(head, records, cells)


def legend(doc: dict, wide: bool = False) -> str:
    """What the columns mean (printed under the terminal tables and in RESULTS.md)."""
    has_model = bool(doc.get("model"))
    entries = [
        ("layer (T,K,N)", "T rows per sample, K in-features, N out-features"),
        (
            "config",
            "S samples, L adapters, r rank(s), mixN adapters per sample, popularity, "
            "% of samples without an adapter",
        ),
        ("base ms, base s", "the layer (or UNet step) without any LoRA: the floor"),
        ("ours/base", "our time / base time; 1.00 would be LoRA for free"),
        ("ideal", "ours/base if time grew with FLOPs: (base + LoRA FLOPs) / base FLOPs"),
        (
            "target",
            f"'met' when ours/base <= ideal + {_MARGIN}"
            + (f" (UNet: <= {_MODEL_MARGIN} x ideal)" if has_model else "")
            + "; otherwise how far above that line",
        ),
        (
            "ours/merge",
            "vs merged weights precomputed per mixture, one GEMM per group (merging's best case)",
        ),
        (
            "onednn/base",
            "(CPU) the base layer through oneDNN with a prepacked weight, the GEMM ours runs "
            "where it measured faster; ours/onednn: the LoRA's cost on that GEMM",
        ),
    ]
    if wide:
        entries += [
            ("ours/fuse", "vs W += delta, GEMM, W restored, per group (switch cost counted)"),
            ("ours/loop", "vs a per-adapter loop of plain torch ops"),
            ("X/base", "a baseline's own time / base time"),
            (
                "ours/base32",
                "(fp16/bf16) vs the base GEMM in float32: the floor on a CPU "
                "without native half-precision GEMMs",
            ),
        ]
    entries.append(
        (
            "ours/peft",
            "vs PEFT's mixed batch (layer: adapter_names; UNet: set_adapters per sub-batch)",
        )
    )
    if has_model:
        entries.append(("ours/fused", "vs fuse_lora / unfuse_lora around each sub-batch"))
    entries += [
        (
            "spread",
            "(max - min) / median of the repeats of base and ours, the larger; "
            f"! above {100 * NOISY_SPREAD:.0f} %: noisy, rerun on a quiet machine",
        ),
        ("—", "not measured (not applicable, unavailable, failed its check, or 1 repeat)"),
    ]
    width = max(len(k) for k, _ in entries) + 2
    lines = ["legend (ratios divide two medians measured side by side; < 1: left is faster):"]
    for key, text in entries:
        wrapped = textwrap.wrap(text, 98 - width)
        lines.append(f"  {key:<{width}}{wrapped[0]}")
        lines += [" " * (width + 2) + w for w in wrapped[1:]]
    return "\n".join(lines)


def _text_table(head: list[str], rows: list[list[str]]) -> str:
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(head)]

    def line(cells: list[str]) -> str:
        padded = [
            c.ljust(w) if i == 0 else c.rjust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ]
        return "  ".join(padded)

    return "\n".join([line(head), line(["-" * w for w in widths]), *(line(r) for r in rows)])


def _md_table(head: list[str], rows: list[list[str]]) -> str:
    out = [
        "| " + " | ".join(head) + " |",
        "|" + "|".join(["---"] + ["--:"] * (len(head) - 1)) + "|",
    ]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


def _suites(doc: dict) -> list[tuple[str, list[dict]]]:
    out: dict[str, list[dict]] = {}
    for rec in doc.get("layer", []):
        out.setdefault(rec["workload"]["suite"], []).append(rec)
    return list(out.items())


SUITE_TITLES = {
    "layer": "Layer level: SD1.5 shapes, 16 samples over 8 distinct rank-16 adapters",
    "shapes": "Layer level: more shapes (SD1.5 feed-forward, SD2, SDXL), default adapters",
    "sweep": "Layer level: one parameter at a time around SD1.5 (1024, 640, 640)",
    "smoke": "Layer level: smoke workloads (tiny, not representative)",
}


def problems(doc: dict) -> list[str]:
    out = []
    for rec in doc.get("layer", []) + doc.get("model", []):
        for name, p in rec["providers"].items():
            if str(p.get("skipped", "")).startswith("WRONG"):
                out.append(f"{rec['workload']['key']}: {name}: {p['skipped']}")
    return out


def _noisy_note(doc: dict) -> list[str]:
    noisy, total = noisy_rows(doc)
    if not noisy:
        return []
    return [
        f"{noisy} of {total} rows spread by more than {100 * NOISY_SPREAD:.0f} % between "
        "repeats (marked !): their ratios are not trustworthy; rerun on a quiet machine"
    ]


def text_report(doc: dict, wide: bool = False) -> str:
    """The terminal report: one table per suite, then the model level, the legend, notes.

    ``wide=False`` shows the main columns only (fits ~130 columns); ``wide=True`` all."""
    parts = []
    for suite, recs in _suites(doc):
        head, rows = layer_rows(recs, wide)
        parts.append(f"{SUITE_TITLES.get(suite, suite)}\n{_text_table(head, rows)}")
    if doc.get("model"):
        head, rows = model_rows(doc["model"], wide)
        parts.append(f"Model level: UNet denoising step\n{_text_table(head, rows)}")
    if parts:
        parts.append(legend(doc, wide) + ("" if wide else "\n(--wide: every column)"))
    parts += [f"note: {n}" for n in doc.get("notes", []) + _noisy_note(doc)]
    parts += [f"FAILED CHECK: {p}" for p in problems(doc)]
    return "\n\n".join(parts)


def _provenance_md(p: dict) -> str:
    v = p["versions"]
    vers = ", ".join(f"{k} {val}" for k, val in v.items() if val)
    return "\n".join(
        [
            f"- device: {p['device']} ({p['device_name']}); {p['cpu_count']} CPUs, "
            f"torch threads {p['threads']}, capability {p['cpu_capability']}",
            f"- versions: {vers}; python {p['python']}",
            f"- git: {p['git_sha']}; date: {p['date']}",
            f"- load average at start / end: {p.get('loadavg_start')} / {p.get('loadavg_end')}; "
            f"before timing: {p.get('load')}",
            f"- command: `{p['command']}`",
        ]
    )


def markdown_report(doc: dict, plots: Sequence[Path], relative_to: Path) -> str:
    """The generated block of RESULTS.md (provenance, tables, plots, notes)."""
    parts = [BEGIN, "", f"### Run ({doc['mode']} mode)", "", _provenance_md(doc["provenance"])]
    for note in doc.get("notes", []) + _noisy_note(doc):
        parts += ["", f"> {note}"]
    for suite, recs in _suites(doc):
        head, rows = layer_rows(recs)
        parts += ["", f"### {SUITE_TITLES.get(suite, suite)}", "", _md_table(head, rows)]
    if doc.get("model"):
        head, rows = model_rows(doc["model"])
        parts += ["", "### Model level: UNet denoising step", "", _md_table(head, rows)]
    parts += ["", "```", legend(doc, wide=True), "```"]
    failed = problems(doc)
    if failed:
        parts += ["", "### Failed correctness checks", ""] + [f"- {p}" for p in failed]
    if plots:
        parts += ["", "### Plots", ""]
        for p in plots:
            rel = os.path.relpath(p, relative_to)
            parts.append(f"![{p.stem}]({rel})")
    parts += ["", END]
    return "\n".join(parts)


def write_markdown(path: Path, block: str, command: str) -> None:
    """Replace the generated block of ``path`` (keeping the prose around it), or create it."""
    if path.exists():
        text = path.read_text()
        if BEGIN in text and END in text:
            head, rest = text.split(BEGIN, 1)
            _, tail = rest.split(END, 1)
            path.write_text(head + block + tail)
            return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        f"# Benchmark results\n\nRegenerate with:\n\n```\n{command}\n```\n\n" + block + "\n"
    )


def write_json(doc: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=1, sort_keys=False) + "\n")


def load_json(path: str | Path) -> dict:
    try:
        doc = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"cannot read results file {path}: {exc}") from None
    if not isinstance(doc, dict) or doc.get("schema") != SCHEMA:
        raise ValueError(f"{path} is not a lorakernels bench results file (schema {SCHEMA})")
    return doc


# ---------------------------------------------------------------------- plots
def plot(doc: dict, out_dir: Path) -> list[Path]:
    """PNG bar charts (provider time / base time, log scale, FLOP-ideal marked).

    Returns the files written; an empty list when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    colors = {
        "ours": "#1b7837",
        "merge": "#2166ac",
        "fuse": "#67a9cf",
        "peft": "#d6604d",
        "loop": "#b2182b",
        "fused": "#67a9cf",
        "base_grouped": "#999999",
    }
    shrunk = {
        "quick": " — QUICK MODE: shrunk sizes, indicative only",
        "smoke": " — SMOKE MODE: tiny shapes, not representative",
    }.get(doc.get("mode"), "")
    groups: dict[tuple[str, str], list[dict]] = {}
    for rec in doc.get("layer", []):
        w = rec["workload"]
        groups.setdefault((w["suite"], w["dtype"]), []).append(rec)
    for (suite, dtype), recs in groups.items():
        names = ["ours", *LAYER_BASELINES]
        labels = [
            f"{r['workload']['label']}\n{_config(r['workload'])}{_noisy_mark(r)}" for r in recs
        ]
        path = out_dir / f"layer_{suite}_{dtype}.png"
        _bars(
            plt,
            recs,
            names,
            labels,
            colors,
            path,
            f"{SUITE_TITLES.get(suite, suite)} — {dtype}{shrunk}\n"
            f"{doc['provenance']['device_name']}, {doc['provenance']['threads']} threads",
            ideal=[r["workload"]["ideal"] for r in recs],
        )
        written.append(path)
    if doc.get("model"):
        recs = doc["model"]
        labels = [
            f"{r['workload']['label']}\nbatch {r['workload']['batch']}{_noisy_mark(r)}"
            for r in recs
        ]
        path = out_dir / "model_unet.png"
        _bars(
            plt,
            recs,
            ["ours", "base_grouped", "peft", "fused"],
            labels,
            colors,
            path,
            f"UNet step time / base step time{shrunk}\n{doc['provenance']['device_name']}",
            ideal=[r.get("ideal") for r in recs],
        )
        written.append(path)
    return written


_TICKS = (
    0.01,
    0.02,
    0.05,
    0.1,
    0.2,
    0.25,
    0.5,
    0.75,
    1,
    1.25,
    1.5,
    2,
    3,
    5,
    10,
    20,
    50,
    100,
    200,
    500,
    1000,
)


def _log_ticks(lo: float, hi: float, max_ticks: int = 9) -> list[float]:
    """Readable ticks on a log axis from ``lo`` to ``hi``, at least 1/``max_ticks`` of the
    axis apart (0.25/0.5/0.75/1/1.25 crowd into one blur on a 0.01-50 bf16 axis)."""
    lo, hi = max(lo, 1e-3), max(hi, 2e-3)
    gap = math.log10(hi / lo) / max_ticks
    out: list[float] = []
    # 1 first: the line every ratio is read against
    for t in sorted((t for t in _TICKS if lo <= t <= hi), key=lambda t: (t != 1, t)):
        if all(abs(math.log10(t / u)) >= gap for u in out):
            out.append(t)
    return sorted(out)


def _bars(plt, recs, names, labels, colors, path, title, ideal) -> None:  # noqa: ANN001
    n = len(recs)
    fig, ax = plt.subplots(figsize=(10, 1.2 + 0.75 * n * max(1, len(names)) / 4))
    height = 0.8 / len(names)
    for j, name in enumerate(names):
        vals = [ratio(r, name, "base") for r in recs]
        ys = [i + (j - (len(names) - 1) / 2) * height for i in range(n)]
        xs = [v if v is not None else 0 for v in vals]
        ax.barh(ys, xs, height=height, color=colors.get(name, "#777777"), label=f"{name}/base")
        for y, v in zip(ys, vals, strict=True):
            if v is not None:
                ax.text(v, y, f" {v:.2f}", va="center", fontsize=6)
    for i, v in enumerate(ideal):
        if v is not None:
            ax.plot([v, v], [i - 0.45, i + 0.45], color="black", lw=1.5)
    ax.axvline(1.0, color="black", lw=0.6, ls=":")
    ax.set_xscale("log")
    # plain tick labels (not 2x10^0) at ratios people read
    from matplotlib.ticker import FixedLocator, NullLocator, ScalarFormatter

    lo, hi = ax.get_xlim()
    ax.xaxis.set_major_locator(FixedLocator(_log_ticks(lo, hi)))
    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_yticks(range(n))
    ax.set_yticklabels(labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("time / base time (log scale; black tick = FLOP-ideal for ours)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------- compare
def compare(old: dict, new: dict) -> tuple[str, list[str]]:
    """``new / old`` median per (workload, provider) present in both; plus warnings."""
    warnings = []
    po, pn = old["provenance"], new["provenance"]
    for field in ("device_name", "threads", "device"):
        if po.get(field) != pn.get(field):
            warnings.append(
                f"{field} differs ({po.get(field)!r} vs {pn.get(field)!r}): these numbers come "
                "from different machines or settings and should not be compared"
            )
    head = ["workload", "provider", "old ms", "new ms", "new/old"]
    rows = []
    for section in ("layer", "model"):
        olds = {r["workload"]["key"]: r for r in old.get(section, [])}
        for rec in new.get(section, []):
            key = rec["workload"]["key"]
            if key not in olds:
                continue
            for name in rec["providers"]:
                a, b = median(olds[key], name), median(rec, name)
                if a is None or b is None:
                    continue
                label = rec["workload"].get("label", key)
                if section == "layer":
                    label += f" {_config(rec['workload'])} {rec['workload']['dtype']}"
                rows.append([label, name, f"{a:.2f}", f"{b:.2f}", f"{b / a:.3f}"])
    if not rows:
        warnings.append("no workload appears in both files")
    return _text_table(head, rows), warnings


def print_err(msg: str) -> None:
    print(msg, file=sys.stderr)
