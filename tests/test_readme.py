"""Every code block of README.md runs as written.

Conventions (a README block that breaks one fails here):

* Every fenced block names its language: ``python``, ``bash`` or ``text``.
* ``python`` blocks are executed, each in a fresh namespace pre-filled with :func:`standins`:
  the names a block uses without defining them (``model``, ``x``, ``A_ink``, ``K``, ...) are
  tiny tensors and models of matching shapes. Paths that stand for the user's files are
  provided for real in a scratch folder: ``loras/`` holds small ``ink``/``cyber``/``tarot``
  LoRA files for the tiny pipeline that ``from_pretrained("path/to/sd15")`` returns here.
  After a block runs, :data:`POSTCONDITIONS` check what its comments promise.
* ``bash`` blocks: every line must be ``make <target>`` (comments allowed). They are checked
  with ``make -n`` (what would run, nothing runs), and the command each target promises must
  appear in that plan (:data:`MAKE_PROMISES`). The one exception: a block of ``curl`` lines
  talks to the demo server (``make serve-demo``), so it runs for real against
  ``lorakernels serve --demo`` started by the test on 127.0.0.1:7860; every line must succeed
  and answer JSON (txt2img: with one base64 PNG per image).
* ``text`` blocks are prose (formulas) and are not run.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import diffusers  # noqa: F401  ([dev] installs it: a broken install fails, not skips)
import pytest
import torch
from lora_files import kohya_state_dict, lora_targets, make_layers, save
from tiny_pipelines import tiny_sd_pipeline
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.MULTILINE | re.DOTALL)
LANGUAGES = {"python", "bash", "text"}
MAKE_PROMISES = {
    "bench": "lorakernels bench --quick",
    "test": "pytest",
    "serve-demo": "lorakernels serve --demo",
    "serve-demo-ray": "lorakernels serve --demo --ray --replicas 2",
}


def blocks() -> list[tuple[str, str, int]]:
    """``(language, code, line)`` of every fenced block in the README."""
    text = README.read_text()
    return [(m[1], m[2], text[: m.start()].count("\n") + 1) for m in FENCE.finditer(text)]


def _ids(b: tuple[str, str, int]) -> str:
    return f"{b[0] or 'untagged'}-line{b[2]}"


class TinyModel(nn.Module):
    """``blocks.0.attn2.to_{q,k,v}`` over a [S, T, 16] input."""

    def __init__(self, dim: int = 16) -> None:
        super().__init__()
        attn = nn.Module()
        for name in ("to_q", "to_k", "to_v"):
            setattr(attn, name, nn.Linear(dim, dim))
        block = nn.Module()
        block.attn2 = attn
        self.blocks = nn.ModuleList([block])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.blocks[0].attn2
        return a.to_q(x) + a.to_k(x) * a.to_v(x)


def standins() -> dict:
    """Placeholder names of the README's examples, as tiny real objects."""
    g = torch.Generator().manual_seed(0)
    d, k, n, t = 16, 32, 24, 5

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g)

    return {
        # manager example: a model with blocks.0.attn2.to_*, 3 samples of 5 rows
        "model": TinyModel(d),
        "x_manager": rand(3, t, d),
        "A_ink": rand(4, d),
        "B_ink": rand(d, 4),
        "A_cyber": rand(8, d),
        "B_cyber": rand(d, 8),
        # functional op: one layer K -> N, two adapters of ranks 4 and 16, 3 samples x 5 rows
        "K": k,
        "N": n,
        "W": rand(n, k),
        "b": rand(n),
        "x_op": rand(3 * t, k),
        "A0": rand(4, k),
        "B0": rand(n, 4),
        "alpha0": 4.0,
        "r0": 4,
        "A1": rand(16, k),
        "B1": rand(n, 16),
        "alpha1": 8.0,
        "r1": 16,
    }


def _x_for(code: str, names: dict) -> torch.Tensor | None:
    if "MultiLoRA(" in code:
        return names["x_manager"]
    if "multi_lora_linear(" in code:
        return names["x_op"]
    return None


def _check_images(ns: dict) -> None:
    assert len(ns["images"]) == 8  # 4 prompts x 2 images


def _check_manager(ns: dict) -> None:
    y, mlora, model, x = ns["y"], ns["mlora"], ns["model"], ns["x"]
    assert y.shape == (3, 5, 16) and torch.isfinite(y).all()
    assert set(mlora.slots) == {"ink", "cyber"}  # both adapters the mixtures name are loaded
    assert torch.equal(model(x)[2], y[2])  # the empty mixture is the base model, exactly


def _check_op(ns: dict) -> None:
    y = ns["y"]
    assert y.shape == (15, 24) and torch.isfinite(y).all()
    base = ns["x"] @ ns["W"].T + ns["b"]
    assert not torch.allclose(y[:5], base[:5])  # sample 0's adapter changed its rows
    torch.testing.assert_close(y[10:], base[10:])  # sample 2: no adapter


def _check_library(ns: dict) -> None:
    assert len(ns["images"]) == 2
    st = ns["lora"].stats()
    assert {"resident", "resident_bytes", "hits", "misses", "evictions", "prefetched"} <= set(st)
    assert "tarot" in st["resident"]  # pinned: resident whatever the prompts used


def _check_schedules(ns: dict) -> None:
    assert len(ns["images"]) == 3


POSTCONDITIONS = {
    "num_images_per_prompt=2": _check_images,
    "lora_schedules=": _check_schedules,
    "MultiLoRA(": _check_manager,
    "multi_lora_linear(": _check_op,
    "AdapterLibrary(": _check_library,
}


@pytest.fixture
def user_files(tmp_path, monkeypatch):
    """A scratch working folder with ``loras/`` and a ``from_pretrained`` that knows the
    README's placeholder path."""
    from diffusers import StableDiffusionPipeline

    pipe = tiny_sd_pipeline()
    folder = tmp_path / "loras"
    folder.mkdir()
    targets = {
        "unet": lora_targets(pipe.unet, "kohya"),
        "text_encoder": lora_targets(pipe.text_encoder, "text"),
    }
    for i, file in enumerate(["ink.safetensors", "cyber.safetensors", "tarot.pt"]):
        layers = make_layers(targets, rank=4, alpha=1.0, seed=40 + i)
        save(folder / file, {k: 0.5 * v for k, v in kohya_state_dict(layers).items()})

    def from_pretrained(path, *args, **kwargs):
        assert path == "path/to/sd15", f"README names an unexpected checkpoint {path!r}"
        return pipe

    monkeypatch.setattr(StableDiffusionPipeline, "from_pretrained", from_pretrained)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_every_block_names_a_known_language():
    found = blocks()
    assert found, "no code blocks found in the README"
    untagged = [line for lang, _, line in found if lang not in LANGUAGES]
    assert not untagged, f"README blocks at lines {untagged} need a language: {LANGUAGES}"


@pytest.mark.parametrize("block", [b for b in blocks() if b[0] == "python"], ids=_ids)
def test_python_block_runs(block, user_files):
    _, code, line = block
    names = standins()
    x = _x_for(code, names)
    ns = {k: v for k, v in names.items() if not k.startswith("x_")}
    if x is not None:
        ns["x"] = x
    exec(compile(code, f"README.md:{line}", "exec"), ns)  # noqa: S102
    checks = [fn for marker, fn in POSTCONDITIONS.items() if marker in code]
    assert checks, f"README.md:{line}: add a postcondition for this block"
    for fn in checks:
        fn(ns)


def _is_curl(code: str) -> bool:
    lines = [c.split("#", 1)[0].strip() for c in code.splitlines()]
    return any(lines) and all(c.startswith("curl ") for c in lines if c)


@pytest.fixture(scope="module")
def demo_server(tmp_path_factory):
    """``lorakernels serve --demo`` on 127.0.0.1:7860 (the README's address), stopped after."""
    import sys
    import time
    import urllib.request

    folder = tmp_path_factory.mktemp("demo")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "lorakernels",
            "serve",
            "--demo",
            "--demo-dir",
            str(folder),
            "--host",
            "127.0.0.1",
            "--port",
            "7860",
        ],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, f"serve --demo exited: {proc.stderr.read()}"
            try:
                with urllib.request.urlopen("http://127.0.0.1:7860/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, "serve --demo did not answer /health in 180 s"
            time.sleep(0.5)
        yield
    finally:
        proc.terminate()
        proc.wait(timeout=60)


@pytest.mark.parametrize(
    "block", [b for b in blocks() if b[0] == "bash" and _is_curl(b[1])], ids=_ids
)
def test_curl_block_answers(block, demo_server):
    import base64
    import json

    _, code, line = block
    for cmd in code.splitlines():
        cmd = cmd.split("#", 1)[0].strip()
        if not cmd:
            continue
        out = subprocess.run(
            ["bash", "-c", cmd + " --fail --max-time 120"],
            capture_output=True,
            text=True,
            timeout=150,
        )
        assert out.returncode == 0, f"README.md:{line}: {cmd} -> {out.returncode} {out.stderr}"
        body = json.loads(out.stdout)
        if "txt2img" in cmd:
            assert len(body["images"]) >= 1
            for image in body["images"]:
                assert base64.b64decode(image)[:8] == b"\x89PNG\r\n\x1a\n"
            assert "seed" in json.loads(body["info"])


@pytest.mark.parametrize(
    "block", [b for b in blocks() if b[0] == "bash" and not _is_curl(b[1])], ids=_ids
)
def test_bash_block_is_a_valid_make_plan(block):
    _, code, line = block
    make = shutil.which("make")
    assert make, "make is not installed"
    for cmd in code.splitlines():
        cmd = cmd.split("#", 1)[0].strip()
        if not cmd:
            continue
        words = cmd.split()
        assert words[0] == "make" and len(words) == 2, f"README.md:{line}: run {cmd!r}?"
        target = words[1]
        # a scratch venv path: the plan must not depend on (or touch) an existing .venv
        plan = subprocess.run(
            [make, "-n", target, "VENV=/nonexistent/readme-check-venv"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert plan.returncode == 0, f"make -n {target}: {plan.stderr}"
        assert MAKE_PROMISES[target] in plan.stdout, plan.stdout
