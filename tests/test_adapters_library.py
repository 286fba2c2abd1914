"""AdapterLibrary: header-only scans, names and aliases, staleness, the host cache bound, and
files holding NaN/inf refused with the file, layer and count named."""

from __future__ import annotations

import os
import shutil
import struct
import time
import warnings

import pytest
import torch
from adapter_files import kohya_dict, make_adapter, write_files
from safetensors.torch import save_file

import lorakernels.formats.reader as reader
from lorakernels import AdapterLibrary
from lorakernels.formats import LoRAFormatError, LoRAFormatWarning, read_lora_file


@pytest.fixture
def counted_reads(monkeypatch):
    """Count every read of tensor data (the formats' only way to tensors)."""
    calls: list[str] = []
    real = reader.read_tensors

    def counting(path):
        calls.append(str(path))
        return real(path)

    monkeypatch.setattr(reader, "read_tensors", counting)
    return calls


def _garbage_data(path):
    """Overwrite every tensor byte after the header with garbage (the header stays valid)."""
    raw = bytearray(path.read_bytes())
    (n,) = struct.unpack("<Q", raw[:8])
    raw[8 + n :] = os.urandom(len(raw) - 8 - n)
    path.write_bytes(bytes(raw))


def test_add_dir_reads_headers_only(tmp_path, counted_reads):
    write_files(tmp_path, 40)
    for i in range(0, 40, 4):
        _garbage_data(tmp_path / f"lora_{i:03d}.safetensors")
    torch.save(kohya_dict(make_adapter(5)), tmp_path / "pickled.pt")
    lib = AdapterLibrary()
    names = lib.add_dir(tmp_path)
    assert len(names) == 41 and "pickled" in names
    assert counted_reads == []  # no tensor data read, garbage data registered fine
    assert lib.resolve("out_007") == "lora_007"  # ss_output_name alias from the header
    info = lib.info("lora_007")
    assert info.metadata["ss_output_name"] == "out_007" and info.max_rank >= 1
    assert lib.info("pickled").path.endswith("pickled.pt") and lib.info("pickled").max_rank is None
    lib.get("lora_001")
    assert len(counted_reads) == 1  # read on first use
    lib.get("pickled")
    assert len(counted_reads) == 2


def test_resolve_unknown_lists_close_names(tmp_path):
    write_files(tmp_path, 3)
    lib = AdapterLibrary()
    lib.add_dir(tmp_path)
    with pytest.raises(KeyError, match=r"unknown adapter 'lora_01'.*did you mean 'lora_001'"):
        lib.resolve("lora_01")
    with pytest.raises(ValueError, match="taken by 'lora_000'"):
        lib.add("x", {"unet": make_adapter(1)}, aliases=("out_000",))


def test_changed_file_is_reread_never_stale_and_refresh(tmp_path):
    write_files(tmp_path, 3)
    lib = AdapterLibrary()
    lib.add_dir(tmp_path)
    first, _ = lib.get("lora_001")
    assert lib.get("lora_001")[0] is first  # cached
    new = make_adapter(999)
    time.sleep(0.01)
    save_file(kohya_dict(new), str(tmp_path / "lora_001.safetensors"))
    second, _ = lib.get("lora_001")  # no refresh() needed: the stamp is checked on every get
    assert second is not first
    got = {lay.name: lay.weights.down for lay in second.layers}
    want = {k.replace(".", "_"): v[0] for k, v in new.items()}
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in got)
    save_file(kohya_dict(make_adapter(4)), str(tmp_path / "lora_777.safetensors"))
    (tmp_path / "lora_000.safetensors").unlink()
    out = lib.refresh()
    assert out["added"] == ["lora_777"] and out["removed"] == ["lora_000"]
    assert "lora_000" not in lib and "out_000" not in lib and "lora_777" in lib
    (tmp_path / "lora_002.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="lora_002.safetensors"):
        lib.get("lora_002")


def test_host_cache_is_bounded_in_bytes_lru(tmp_path):
    write_files(tmp_path, 12)
    sizes = {}
    for i in range(12):
        lora = read_lora_file(tmp_path / f"lora_{i:03d}.safetensors")
        sizes[f"lora_{i:03d}"] = sum(
            lay.weights.down.nbytes + lay.weights.up.nbytes for lay in lora.layers
        )
    bound = sizes["lora_000"] + sizes["lora_001"] + sizes["lora_002"]
    lib = AdapterLibrary(cache_bytes=bound)
    lib.add_dir(tmp_path)
    for i in range(12):
        lib.get(f"lora_{i:03d}")
        assert lib.cached_bytes <= bound
        assert lib.cached_bytes == sum(sizes[n] for n in lib.cached())
    lib.get("lora_011")
    assert lib.stats()["hits"] == 1 and lib.cached()[-1] == "lora_011"


def test_nan_and_inf_files_are_refused_naming_file_layer_count(tmp_path):
    factors = make_adapter(3, ["blocks.0.attn.to_q", "blocks.1.attn.to_v"])
    sd = kohya_dict(factors)
    sd["lora_unet_blocks_1_attn_to_v.lora_up.weight"][0, :3] = torch.tensor(
        [float("nan"), float("inf"), -float("inf")]
    )
    path = tmp_path / "poisoned.safetensors"
    save_file(sd, str(path))
    with pytest.raises(LoRAFormatError, match=r"poisoned.safetensors.*blocks_1_attn_to_v.*3 NaN"):
        read_lora_file(path)
    with pytest.warns(LoRAFormatWarning, match="layer skipped"):
        lora = read_lora_file(path, strict=False)
    assert [lay.name for lay in lora.layers] == ["blocks_0_attn_to_q"]
    lib = AdapterLibrary()
    with pytest.raises(ValueError, match=r"'bad'.*to_q holds 1 NaN"):
        a, b, alpha = factors["blocks.0.attn.to_q"]
        a = a.clone()
        a[0, 0] = float("nan")
        lib.add("bad", {"unet": {"blocks.0.attn.to_q": (a, b, alpha)}})
    assert "bad" not in lib


def test_nan_written_into_a_real_fixture_is_refused(tmp_path, fixtures_dir):
    src = fixtures_dir / "sd15_unet_lora_timo.safetensors"
    path = tmp_path / "timo_nan.safetensors"
    shutil.copy(src, path)
    path.chmod(0o644)
    raw = bytearray(path.read_bytes())
    (n,) = struct.unpack("<Q", raw[:8])
    # the first tensor's first 4 values become NaN (fp32 files: 4 bytes each)
    nan = struct.pack("<f", float("nan"))
    for k in range(4):
        raw[8 + n + 4 * k : 8 + n + 4 * k + 4] = nan
    path.write_bytes(bytes(raw))
    with pytest.raises(LoRAFormatError, match=r"timo_nan.safetensors.*holds 4 NaN"):
        read_lora_file(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LoRAFormatWarning)
        lora = read_lora_file(path, strict=False)
    assert len(lora.layers) == len(read_lora_file(src).layers) - 1
