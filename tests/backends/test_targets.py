"""Named targets: resolution, feature checks, clear errors."""

import pytest

from ptqpasses_backends import named_targets
from ptqpasses_backends.tvm import targets


def test_all_named_targets_resolve():
    for name in named_targets("tvm"):
        nt = targets.resolve(name)
        assert nt.family in ("x86", "aarch64", "cuda")
        nt.target()


def test_host_uses_real_cpu_name_not_native():
    host = targets.resolve("host")
    assert host.spec["mcpu"] == targets.system_cpu() != "native"
    assert targets.runs_here(host)


def test_features():
    assert targets.has_feature(targets.resolve("x86-avx512-vnni").target(), "avx512vnni")
    assert not targets.has_feature(targets.resolve("x86-avx2").target(), "avx512vnni")
    assert targets.has_feature(targets.resolve("aarch64-dotprod").target(), "dotprod")
    assert targets.has_feature(targets.resolve("aarch64-i8mm").target(), "i8mm")


def test_unknown_name_is_clear():
    with pytest.raises(ValueError, match="unknown TVM target 'x86-avx1024'.*known targets"):
        targets.resolve("x86-avx1024")


def test_unservable_target_is_clear():
    with pytest.raises(ValueError, match="cannot serve llvm triple 'riscv64"):
        targets.resolve({"kind": "llvm", "mtriple": "riscv64-linux-gnu", "mcpu": "generic"})
    with pytest.raises(ValueError, match="cannot serve target kind 'opencl'"):
        targets.resolve({"kind": "opencl"})


def test_missing_feature_is_clear():
    nt = targets.NamedTarget("bad", "x86", {"kind": "llvm", "mtriple": "x86_64-linux-gnu",
                                            "mcpu": "haswell"}, ("avx512vnni",))
    with pytest.raises(ValueError, match="lacks \\['avx512vnni'\\]"):
        nt.target()


def test_custom_dict_target():
    nt = targets.resolve({"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "haswell"})
    assert nt.family == "x86"
