"""The active batch belongs to its caller: threads and asyncio tasks entering ``use()`` on one
model at once each get their own adapters (issue 10, A4)."""

from __future__ import annotations

import asyncio
import threading
import time

import torch
from adapter_files import make_adapter, merged_oracle, tiny_model

from lorakernels import AdapterLibrary, MultiLoRA

TOL = {"rtol": 2e-5, "atol": 2e-5}


def _setup(bound: int | None = None):
    lib = AdapterLibrary()
    adapters = {name: make_adapter(seed) for name, seed in (("red", 1), ("blue", 2), ("green", 3))}
    for name, factors in adapters.items():
        lib.add(name, {"model": factors})
    model = tiny_model()
    mgr = MultiLoRA(model, targets=["*attn.*"], library=lib, max_resident_adapters=bound)
    x = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(0))
    return model, mgr, adapters, x


def test_two_threads_in_use_each_see_their_own_mixtures():
    model, mgr, adapters, x = _setup()
    mixes = {"red": [{"red": 1.0}, {"red": -0.5}], "blue": [{"blue": 0.8}, {}]}
    want = {k: merged_oracle(tiny_model(), x, m, adapters) for k, m in mixes.items()}
    assert (want["red"] - want["blue"]).abs().max() > 1e-2  # a swap would be visible
    barrier = threading.Barrier(2)
    wrong: list[str] = []

    def worker(key: str) -> None:
        for _ in range(30):
            with mgr.use(mixes[key]):
                barrier.wait()  # both callers are inside use() now
                got = model(x)
                barrier.wait()
            if not torch.allclose(got.double(), want[key], **TOL):
                wrong.append(key)

    threads = [threading.Thread(target=worker, args=(k,)) for k in mixes]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert wrong == [], f"{len(wrong)} of 60 forwards saw another thread's adapters"
    assert mgr.context.callers == 0 and mgr.context.batch is None


def test_asyncio_tasks_in_use_each_see_their_own_mixtures():
    model, mgr, adapters, x = _setup()
    mixes = {"red": [{"red": 1.0}, {}], "green": [{"green": 0.7}, {"red": 0.2}]}
    want = {k: merged_oracle(tiny_model(), x, m, adapters) for k, m in mixes.items()}

    async def task(key: str) -> int:
        bad = 0
        for _ in range(20):
            with mgr.use(mixes[key]):
                await asyncio.sleep(0)  # the other task enters its own use() here
                got = model(x)
                await asyncio.sleep(0)
            bad += not torch.allclose(got.double(), want[key], **TOL)
        return bad

    async def main() -> list[int]:
        return await asyncio.gather(*(task(k) for k in mixes))

    assert asyncio.run(main()) == [0, 0]


def test_threads_with_a_bound_smaller_than_their_union_stay_correct():
    # bound 2, three adapters: loading one for a caller must never evict another's in use
    model, mgr, adapters, x = _setup(bound=2)
    keys = ["red", "blue", "green"]
    want = {k: merged_oracle(tiny_model(), x, [{k: 1.0}, {}], adapters) for k in keys}
    errors: list[BaseException] = []
    wrong: list[str] = []

    def worker(key: str) -> None:
        for _ in range(15):
            try:
                with mgr.use([{key: 1.0}, {}]):
                    got = model(x)
            except ValueError as exc:  # both slots held by the other callers right now
                if "in use or pinned" not in str(exc):
                    errors.append(exc)
                continue
            if not torch.allclose(got.double(), want[key], **TOL):
                wrong.append(key)

    threads = [threading.Thread(target=worker, args=(k,)) for k in keys]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors and not wrong
    assert len(mgr.stats()["resident"]) <= 2


def test_callers_entering_together_never_share_a_batch_object(monkeypatch):
    # widen the gap between building a batch and entering the block: a batch object must be
    # claimed in the same locked step that (re)fills it, or a second caller could refill it
    model, mgr, adapters, x = _setup()
    real = MultiLoRA._wait_events

    def slow(self, names):
        time.sleep(0.02)
        return real(self, names)

    monkeypatch.setattr(MultiLoRA, "_wait_events", slow)
    mixes = {"red": [{"red": 1.0}, {}], "blue": [{}, {"blue": -0.6}]}
    want = {k: merged_oracle(tiny_model(), x, m, adapters) for k, m in mixes.items()}
    barrier = threading.Barrier(2)
    wrong: list[str] = []

    def worker(key: str) -> None:
        for _ in range(5):
            barrier.wait()
            with mgr.use(mixes[key]):
                got = model(x)
            if not torch.allclose(got.double(), want[key], **TOL):
                wrong.append(key)

    threads = [threading.Thread(target=worker, args=(k,)) for k in mixes]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert wrong == []
