"""Residency pool: many adapters from a library through a bounded set of bank slots.

Every output is compared with a float64 per-sample merged oracle; the pool's bookkeeping
(bound, evictions, bytes, pointers) is asserted alongside.
"""

from __future__ import annotations

import random
import threading

import pytest
import torch
from adapter_files import LAYERS, make_adapter, merged_oracle, tiny_model, write_files

from lorakernels import AdapterLibrary, MultiLoRA
from lorakernels.formats import LoRAFormatError

TOL = {"rtol": 2e-5, "atol": 2e-5}  # fp32 layers of width 16-24 vs float64: ~1e-6 observed


@pytest.fixture(scope="module")
def many(tmp_path_factory):
    folder = tmp_path_factory.mktemp("many")
    return folder, write_files(folder, 300)


def _x(samples: int, seed: int) -> torch.Tensor:
    return torch.randn(samples, 5, 16, generator=torch.Generator().manual_seed(seed))


def _bank_ptrs(mgr: MultiLoRA) -> dict:
    return {n: [t.data_ptr() for t in ly.lora_bank.tensors()] for n, ly in mgr.layers.items()}


def test_300_files_bound_8_random_batches_match_oracle(many):
    folder, adapters = many
    lib = AdapterLibrary()
    assert len(lib.add_dir(folder)) == 300
    model = tiny_model()
    base = tiny_model()
    mgr = MultiLoRA(model, targets=["*attn.*"], library=lib, max_resident_adapters=8)
    ptrs = _bank_ptrs(mgr)
    rng = random.Random(7)
    names = sorted(adapters)
    for step in range(24):
        mixtures = []
        for _ in range(4):
            kind = rng.random()
            if kind < 0.2:
                mixtures.append({})  # base model
            elif kind < 0.6:
                a, b = rng.sample(names, 2)  # a mix of 2, strengths of either sign
                mixtures.append({a: rng.uniform(-1.5, 1.5), b: rng.choice([-0.7, 0.5, 1.0])})
            else:
                mixtures.append({rng.choice(names): rng.uniform(-1.0, 1.5)})
        # spell some by their ss_output_name alias
        spelled = [
            {(k.replace("lora_", "out_") if rng.random() < 0.3 else k): w for k, w in m.items()}
            for m in mixtures
        ]
        x = _x(4, step)
        with mgr.use(spelled):
            got = model(x)
        torch.testing.assert_close(got.double(), merged_oracle(base, x, mixtures, adapters), **TOL)
        st = mgr.stats()
        assert len(st["resident"]) <= 8
    st = mgr.stats()
    assert st["evictions"] > 20 and st["misses"] > 30
    assert _bank_ptrs(mgr) == ptrs or mgr.reallocations > 0  # row growth is counted
    assert max(len(ly.lora_bank.slots()) for ly in mgr.layers.values()) <= 8
    assert all(ly.lora_bank.capacity_slots == 8 for ly in mgr.layers.values())


def test_byte_budget_preallocates_never_reallocates_and_counts_real_ranks(many):
    folder, adapters = many
    lib = AdapterLibrary()
    lib.add_dir(folder)
    model = tiny_model()
    per_row = MultiLoRA.bytes_per_row(model, ["*attn.*"])
    assert per_row == 4 * sum(
        model.get_submodule(p).in_features + model.get_submodule(p).out_features for p in LAYERS
    )
    budget = 20 * per_row  # 20 rank rows in every layer
    mgr = MultiLoRA(model, targets=["*attn.*"], library=lib, resident_bytes=budget)
    assert all(ly.lora_bank.capacity_rows == 20 for ly in mgr.layers.values())
    assert mgr.stats()["capacity_bytes"] == budget
    ptrs = _bank_ptrs(mgr)
    rng = random.Random(3)
    names = sorted(adapters)
    base = tiny_model()
    for step in range(12):
        mixtures = [{n: rng.uniform(-1, 1)} for n in rng.sample(names, 2)] + [{}]
        x = _x(3, 100 + step)
        with mgr.use(mixtures):
            got = model(x)
        torch.testing.assert_close(got.double(), merged_oracle(base, x, mixtures, adapters), **TOL)
        # memory: exactly the real ranks of the resident adapters, no page slack
        expected = 0
        for name in mgr.stats()["resident"]:
            for path, (a, _, _) in adapters[name].items():
                lin = model.get_submodule(path)
                expected += a.shape[0] * (lin.in_features + lin.out_features) * 4
        assert mgr.stats()["resident_bytes"] == expected
    assert _bank_ptrs(mgr) == ptrs and mgr.reallocations == 0
    assert mgr.stats()["evictions"] > 0


def test_fragmented_rows_are_compacted_in_place():
    model = tiny_model()
    per_row = MultiLoRA.bytes_per_row(model, ["*attn.*"])
    path = LAYERS[0]
    n_out = model.get_submodule(path).out_features
    lib = AdapterLibrary()
    factors = {}
    for i, r in enumerate([3, 3, 3, 4]):
        g = torch.Generator().manual_seed(i)
        factors[f"a{i}"] = {
            path: (torch.randn(r, 16, generator=g), torch.randn(n_out, r, generator=g), None)
        }
        lib.add(f"a{i}", {"model": factors[f"a{i}"]})
    mgr = MultiLoRA(model, targets=["*attn.*"], library=lib, resident_bytes=10 * per_row)
    bank = mgr.layers[path].lora_bank
    for n in ("a0", "a1", "a2"):
        mgr.load_from_library(n)
    mgr.pin("a1")
    mgr.pin("a2")
    mgr.unload("a0")  # free rows: [0, 3) and [9, 10): 4 free, no run of 4
    assert not bank.fits(4, compact=False) and bank.fits(4, compact=True)
    ptr = bank.lora_a.data_ptr()
    version = bank.version
    mgr.load_from_library("a3")  # needs compaction: the pinned a1, a2 cannot go
    assert bank.lora_a.data_ptr() == ptr and bank.version > version
    assert sorted(s for s, _, _ in bank.slots().values()) == [0, 3, 6]
    mix = [{"a3": 1.0}, {"a2": -0.5, "a1": 0.25}]
    x = _x(2, 5)
    with mgr.use(mix):
        got = model(x)
    torch.testing.assert_close(got.double(), merged_oracle(tiny_model(), x, mix, factors), **TOL)


def test_budget_errors():
    model = tiny_model()
    per_row = MultiLoRA.bytes_per_row(model, ["*attn.*"])
    with pytest.raises(ValueError, match="smaller than one adapter"):
        MultiLoRA(model, targets=["*attn.*"], resident_bytes=per_row - 1)
    lib = AdapterLibrary()
    lib.add("wide", {"model": make_adapter(1, [LAYERS[0]])})
    rank = lib.info("wide").max_rank
    with pytest.raises(ValueError, match="wide"):
        MultiLoRA(model, targets=["*attn.*"], library=lib, resident_bytes=(rank - 1) * per_row)
    with pytest.raises(ValueError, match="max_resident_adapters"):
        MultiLoRA(model, max_resident_adapters=0)


def test_batch_over_budget_names_budget_and_adapters():
    model = tiny_model()
    lib = AdapterLibrary()
    for i in range(3):
        lib.add(f"n{i}", {"model": make_adapter(i)})
    mgr = MultiLoRA(model, targets=["*attn.*"], library=lib, max_resident_adapters=2)
    with mgr.use([{"n0": 1.0}]):
        pass
    before = mgr.stats()["resident"]
    with pytest.raises(ValueError, match=r"max_resident_adapters=2.*|n0.*n1.*n2"):
        with mgr.use([{"n0": 1.0, "n1": 1.0}, {"n2": 1.0}]):
            pass
    assert mgr.stats()["resident"] == before
    # two adapters in use in another open block cannot be evicted for a third
    with mgr.use([{"n0": 1.0}, {"n1": 1.0}]):
        with pytest.raises(ValueError, match="in use or pinned"):
            with mgr.use([{"n2": 1.0}]):
                pass


def test_unknown_names_raise_with_close_matches():
    lib = AdapterLibrary()
    lib.add("watercolor", {"model": make_adapter(1)})
    mgr = MultiLoRA(tiny_model(), targets=["*attn.*"], library=lib, max_resident_adapters=2)
    with pytest.raises(KeyError, match=r"unknown adapter 'watercolour'.*did you mean 'watercolor'"):
        with mgr.use([{"watercolour": 1.0}]):
            pass


def test_pin_keeps_an_adapter_resident():
    lib = AdapterLibrary()
    for i in range(5):
        lib.add(f"p{i}", {"model": make_adapter(10 + i)})
    mgr = MultiLoRA(tiny_model(), targets=["*attn.*"], library=lib, max_resident_adapters=2)
    mgr.pin("p0")
    for i in range(1, 5):
        with mgr.use([{f"p{i}": 1.0}]):
            pass
        assert "p0" in mgr.stats()["resident"]
    assert mgr.stats()["pinned"] == ["p0"]
    mgr.unpin("p0")
    for i in range(1, 3):
        with mgr.use([{f"p{i}": 1.0}]):
            pass
    assert "p0" not in mgr.stats()["resident"]


def test_corrupt_and_vanished_files_fail_alone(tmp_path):
    adapters = write_files(tmp_path, 4)
    truncated = tmp_path / "lora_002.safetensors"
    truncated.write_bytes(truncated.read_bytes()[:-40])
    lib = AdapterLibrary()
    with pytest.warns(Warning, match="truncated"):
        names = lib.add_dir(tmp_path)
    assert "lora_002" in names  # registered; fails when used
    model = tiny_model()
    mgr = MultiLoRA(model, targets=["*attn.*"], library=lib, max_resident_adapters=2)
    with mgr.use([{"lora_000": 1.0}, {"lora_001": 0.5}]):
        pass
    before = (
        mgr.stats()["resident"],
        {n: ly.lora_bank.lora_a.clone() for n, ly in mgr.layers.items()},
    )
    with pytest.raises(LoRAFormatError, match="lora_002.safetensors"):
        with mgr.use([{"lora_002": 1.0}]):
            pass
    assert mgr.stats()["resident"] == before[0]
    for n, ly in mgr.layers.items():
        assert torch.equal(ly.lora_bank.lora_a, before[1][n])
    x = _x(2, 9)
    with mgr.use([{"lora_003": 1.0}, {}]):  # the next batch without it runs
        got = model(x)
    torch.testing.assert_close(
        got.double(), merged_oracle(tiny_model(), x, [{"lora_003": 1.0}, {}], adapters), **TOL
    )
    (tmp_path / "lora_001.safetensors").unlink()
    mgr.unload("lora_001")
    with pytest.raises(FileNotFoundError, match="lora_001.safetensors"):
        with mgr.use([{"lora_001": 1.0}]):
            pass


def test_prefetch_runs_while_other_threads_forward(many):
    folder, adapters = many
    lib = AdapterLibrary()
    lib.add_dir(folder)
    model = tiny_model()
    mgr = MultiLoRA(model, targets=["*attn.*"], library=lib, max_resident_adapters=6)
    mix = [{"lora_000": 1.0}, {"lora_001": -0.5}]
    x = _x(2, 11)
    want = merged_oracle(tiny_model(), x, mix, adapters)
    mgr.pin("lora_000")
    mgr.pin("lora_001")
    stop = threading.Event()
    errors: list[BaseException] = []
    runs = [0]

    def forwards():
        try:
            while not stop.is_set() or runs[0] < 20:
                with mgr.use(mix):
                    got = model(x)
                torch.testing.assert_close(got.double(), want, **TOL)
                runs[0] += 1
        except BaseException as exc:  # noqa: BLE001 (reported by the main thread)
            errors.append(exc)

    t = threading.Thread(target=forwards)
    t.start()
    for k in range(10):
        mgr.prefetch([f"lora_{i:03d}" for i in range(10 + 4 * k, 14 + 4 * k)])
    mgr.wait_prefetch()
    stop.set()
    t.join(60)
    assert not errors, errors[0]
    st = mgr.stats()
    assert st["prefetched"] >= 10 and len(st["resident"]) <= 6
    # a prefetched adapter is a hit for the next use, and correct
    last = st["resident"][-1]
    hits = st["hits"]
    x2 = _x(1, 12)
    with mgr.use([{last: 0.8}]):
        got = model(x2)
    assert mgr.stats()["hits"] == hits + 1
    torch.testing.assert_close(
        got.double(), merged_oracle(tiny_model(), x2, [{last: 0.8}], adapters), **TOL
    )


def test_loads_and_evictions_do_not_recompile():
    from torch._dynamo.utils import counters

    lib = AdapterLibrary()
    factors = {f"c{i}": make_adapter(40 + i, LAYERS) for i in range(5)}
    for name, f in factors.items():
        lib.add(name, {"model": f})
    model = tiny_model()
    mgr = MultiLoRA(model, targets=["*attn.*"], library=lib, max_resident_adapters=2)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    counters.clear()
    x = _x(2, 21)
    for i in range(8):  # every step loads one adapter and evicts another
        mix = [{f"c{i % 5}": 1.0}, {f"c{(i + 1) % 5}": -0.5}]
        with mgr.use(mix):
            got = compiled(x)
        torch.testing.assert_close(
            got.double(), merged_oracle(tiny_model(), x, mix, factors), **TOL
        )
    assert mgr.stats()["evictions"] >= 5
    assert counters["stats"]["unique_graphs"] == 1


def test_a_resident_adapter_whose_file_changed_is_reloaded(tmp_path):
    import time

    from adapter_files import kohya_dict
    from safetensors.torch import save_file

    adapters = write_files(tmp_path, 2)
    lib = AdapterLibrary()
    lib.add_dir(tmp_path)
    model = tiny_model()
    mgr = MultiLoRA(model, targets=["*attn.*"], library=lib, max_resident_adapters=2)
    x = _x(1, 31)
    with mgr.use([{"lora_000": 1.0}]):
        first = model(x)
    torch.testing.assert_close(
        first.double(), merged_oracle(tiny_model(), x, [{"lora_000": 1.0}], adapters), **TOL
    )
    time.sleep(0.01)
    adapters["lora_000"] = make_adapter(4242, LAYERS)
    save_file(kohya_dict(adapters["lora_000"]), str(tmp_path / "lora_000.safetensors"))
    with mgr.use([{"lora_000": 1.0}]):  # still resident, but its file changed on disk
        second = model(x)
    torch.testing.assert_close(
        second.double(), merged_oracle(tiny_model(), x, [{"lora_000": 1.0}], adapters), **TOL
    )
