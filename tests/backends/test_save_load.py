"""Save -> load in a fresh process; corrupted or mismatched files give clear errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from tests.backends.models import SmallCNN

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def saved(tvm_backend, tmp_path_factory):
    gm = torch.fx.symbolic_trace(SmallCNN())
    x = torch.rand(3, 3, 12, 12) * 4 - 2
    cm = tvm_backend.compile(gm, "host", example_inputs=[x])
    d = tmp_path_factory.mktemp("saved")
    lib = cm.save(d / "cnn")
    torch.save({"x": x, "y": cm(x)}, d / "io.pt")
    return d, lib, cm


def test_files_and_metadata(saved):
    d, lib, _ = saved
    assert lib == d / "cnn.so" and lib.exists()
    meta = json.loads((d / "cnn.json").read_text())
    assert meta["target"] == "host" and meta["target_spec"]["mcpu"] != "native"
    assert set(meta["versions"]) == {"tvm", "tvm_ffi", "torch"}
    assert meta["inputs"] == [{"shape": ["batch", 3, 12, 12], "dtype": "float32"}]
    assert meta["outputs"] == [{"shape": ["batch", 10], "dtype": "float32"}]
    assert len(meta["sha256"]) == 64


def test_load_in_fresh_process_is_identical(saved):
    d, _, _ = saved
    script = textwrap.dedent(f"""
        import torch, ptqpasses_backends.tvm as bt
        io = torch.load({str(d / 'io.pt')!r})
        cm = bt.load({str(d / 'cnn')!r})
        (y,) = cm(io["x"])
        assert torch.equal(y, io["y"][0]), "outputs differ after load"
        (y1,) = cm(io["x"][:1])
        assert torch.equal(y1, io["y"][0][:1])
        print("OK")
    """)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT)] + sys.path))
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0 and "OK" in out.stdout, out.stderr[-2000:]


def _copy(saved, tmp_path, name="m"):
    d, lib, _ = saved
    (tmp_path / f"{name}.so").write_bytes(lib.read_bytes())
    meta = json.loads((d / "cnn.json").read_text())
    meta["library"] = f"{name}.so"
    (tmp_path / f"{name}.json").write_text(json.dumps(meta))
    return tmp_path / name, meta


def test_corrupted_library(tvm_backend, saved, tmp_path):
    stem, _ = _copy(saved, tmp_path)
    data = bytearray(stem.with_suffix(".so").read_bytes())
    data[len(data) // 2] ^= 0xFF
    stem.with_suffix(".so").write_bytes(bytes(data))
    with pytest.raises(tvm_backend.LoadError, match="does not match its metadata"):
        tvm_backend.load(stem)


def test_truncated_library_and_missing_files(tvm_backend, saved, tmp_path):
    stem, _ = _copy(saved, tmp_path)
    stem.with_suffix(".so").write_bytes(b"\x7fELF")
    with pytest.raises(tvm_backend.LoadError, match="corrupted or from another build"):
        tvm_backend.load(stem)
    stem.with_suffix(".so").unlink()
    with pytest.raises(tvm_backend.LoadError, match="is missing"):
        tvm_backend.load(stem)
    with pytest.raises(tvm_backend.LoadError, match="no metadata file"):
        tvm_backend.load(tmp_path / "nothing")


def test_corrupted_or_mismatched_metadata(tvm_backend, saved, tmp_path):
    stem, meta = _copy(saved, tmp_path)
    stem.with_suffix(".json").write_text("{not json")
    with pytest.raises(tvm_backend.LoadError, match="corrupted metadata"):
        tvm_backend.load(stem)
    stem.with_suffix(".json").write_text(json.dumps(dict(meta, versions=dict(
        meta["versions"], tvm="0.1.0"))))
    with pytest.raises(tvm_backend.LoadError, match="built with tvm 0.1.0"):
        tvm_backend.load(stem)
    stem.with_suffix(".json").write_text(json.dumps({k: v for k, v in meta.items()
                                                     if k != "inputs"}))
    with pytest.raises(tvm_backend.LoadError, match="lacks 'inputs'"):
        tvm_backend.load(stem)
    stem.with_suffix(".json").write_text(json.dumps(dict(meta, format="other/9")))
    with pytest.raises(tvm_backend.LoadError, match="is not a ptqpasses-tvm-module/1"):
        tvm_backend.load(stem)


def test_module_for_a_cpu_this_host_lacks_is_refused(tvm_backend, saved, tmp_path):
    if _host_has_avx512():
        pytest.skip("host has AVX-512: a cascadelake module would run here")
    stem, meta = _copy(saved, tmp_path)
    spec = dict(meta["target_spec"], mcpu="cascadelake")
    stem.with_suffix(".json").write_text(json.dumps(dict(meta, target_spec=spec)))
    with pytest.raises(tvm_backend.LoadError, match="cannot be loaded for execution"):
        tvm_backend.load(stem)


def _host_has_avx512() -> bool:
    from tests.backends.conftest import host_has

    return host_has("avx512f")


def test_calls_share_inputs_and_keep_outputs(saved):
    """CPU calls pass torch tensors through DLPack without copies: an output stays valid after
    later calls, and non-contiguous or unaligned inputs are copied first, not misread."""
    _, _, cm = saved
    g = torch.Generator().manual_seed(0)
    x1, x2 = (torch.rand(3, 3, 12, 12, generator=g) * 4 - 2 for _ in range(2))
    (y1,) = cm(x1)
    first = y1.clone()
    (y2,) = cm(x2)
    assert torch.equal(y1, first) and not torch.equal(y1, y2)
    wide = torch.rand(3, 3, 12, 13, generator=g)
    view = wide[..., 1:]
    assert not view.is_contiguous()
    assert torch.equal(cm(view)[0], cm(view.contiguous())[0])
    flat = torch.rand(3 * 3 * 12 * 12 + 1, generator=g)
    unaligned = flat[1:].view(3, 3, 12, 12)
    assert unaligned.data_ptr() % 64
    assert torch.equal(cm(unaligned)[0], cm(unaligned.clone())[0])


def test_cross_target_is_saved_with_its_strategy_cross_compiler(tvm_backend, tmp_path):
    """An aarch64 module built here: a ``.so`` linked by the strategy's cross compiler
    (``aarch64-linux-gnu-gcc``) where it is installed, else a ``.tar`` of objects; loading it
    for execution on this x86 machine is refused."""
    import shutil

    gm = torch.fx.symbolic_trace(SmallCNN())
    cm = tvm_backend.compile(gm, "aarch64-dotprod", example_inputs=[torch.rand(1, 3, 12, 12)])
    assert cm.meta["cross"] and cm.meta["cross_compiler"] == "aarch64-linux-gnu-gcc"
    path = cm.save(tmp_path / "arm")
    assert path.suffix == (".so" if shutil.which("aarch64-linux-gnu-gcc") else ".tar")
    with pytest.raises(tvm_backend.LoadError, match="cannot be loaded for execution"):
        tvm_backend.load(tmp_path / "arm")


def test_killed_save_leaves_the_old_module(tvm_backend, saved, tmp_path):
    """A save killed before its renames (the process SIGKILLs itself at the first one) leaves
    the old pair of files, which still loads and computes what it did."""
    d, _, _ = saved
    stem, _ = _copy(saved, tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.glob("m.*")}
    script = textwrap.dedent(f"""
        import os, signal, torch, ptqpasses_backends.tvm as bt
        from tests.backends.models import SmallCNN
        gm = torch.fx.symbolic_trace(SmallCNN())
        cm = bt.compile(gm, "host", example_inputs=[torch.rand(1, 3, 12, 12)],
                        dynamic_batch=False)
        os.replace = lambda *a: os.kill(os.getpid(), signal.SIGKILL)
        cm.save({str(stem)!r})
    """)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT)] + sys.path))
    out = subprocess.run([sys.executable, "-c", script], env=env, cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == -9, out.stderr[-2000:]
    assert {p.name: p.read_bytes() for p in tmp_path.glob("m.*")} == before
    io = torch.load(d / "io.pt")
    assert torch.equal(tvm_backend.load(stem)(io["x"])[0], io["y"][0])


def test_failed_save_leaves_no_partial_files(tvm_backend, saved, tmp_path, monkeypatch):
    _, _, cm = saved

    def broken(path, **kw):
        Path(path).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(cm._lib, "export_library", broken, raising=False)
    with pytest.raises(OSError, match="disk full"):
        cm.save(tmp_path / "m")
    assert list(tmp_path.iterdir()) == []
