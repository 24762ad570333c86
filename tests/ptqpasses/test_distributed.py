"""Distributed calibration (issue 16): 2 gloo ranks on localhost, each calibrating ResNet-18 on
its shard, against one process calibrating on the union of the shards.

The ranks run once (a module fixture, :func:`ptqpasses.distributed.launch`, with a timeout so
a hang fails instead of blocking) and write what they got to JSON; the tests compare.
"""

from __future__ import annotations

import copy
import hashlib
import json

import numpy as np
import pytest
import torch
import torch.distributed as dist
from hypothesis import given, settings
from hypothesis import strategies as st

import ptqpasses
from ptqpasses import meta
from ptqpasses.calibrate import merge, observers
from ptqpasses.distributed import launch
from ptqpasses.observers import OBSERVERS, CalibrationError
from ptqpasses.passes.bias_correction import layer_output_means, record_bias_shift
from ptqpasses.passes.smooth_quant import record_input_absmax
from ptqpasses_tools.models import randomize_bn_stats, resnet18

WORLD = 2
EXACT = ("minmax", "histogram", "mse", "entropy")  # merges that are exact
KINDS = EXACT + ("moving_average",)


def _data() -> list[tuple[torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(2, 3, 64, 64, generator=g) * (1 + i % 3),) for i in range(6)]


def _float_graph():
    torch.manual_seed(0)
    model = randomize_bn_stats(resnet18(num_classes=16).eval(), seed=0)
    return ptqpasses.capture(model, _data()[0])


def _calibrated(float_gm, kind: str, data, **kw):
    cfg = ptqpasses.QuantConfig(activation=ptqpasses.QSpec(observer=kind))
    gm = ptqpasses.prepare(float_gm, config=cfg)
    ptqpasses.calibrate(gm, data, progress=False, **kw)
    return gm


def _summary(gm) -> dict:
    """Every observer's qparams (and a histogram's counts, hashed)."""
    out = {}
    for node, ob in observers(gm):
        p = meta.get_qparams(node)
        counts = ob.counts.numpy().tobytes() if hasattr(ob, "counts") else b""
        out[node.name] = [p.scale, p.zero_point, ob.batches, hashlib.sha256(counts).hexdigest()]
    return out


def _error(fn) -> str:
    try:
        fn()
    except CalibrationError as e:
        return f"{type(e).__name__}: {e}"
    return "no error"


def _rank(out: str) -> None:
    """One rank: everything the tests below check, written to ``out/rank{r}.json``."""
    torch.set_num_threads(1)  # as the process comparing (below): the same float kernels
    rank = dist.get_rank()
    data = _data()
    mine = data[rank::WORLD]
    float_gm = _float_graph()
    res = {kind: _summary(_calibrated(float_gm, kind, mine)) for kind in KINDS}

    gm = copy.deepcopy(float_gm)
    record_input_absmax(gm, mine)
    res["absmax"] = {n.name: meta.input_absmax(n).tolist() for n in gm.graph.nodes
                     if meta.input_absmax(n) is not None}
    gm = _calibrated(float_gm, "minmax", mine)
    res["output_means"] = {k: v.tolist() for k, v in layer_output_means(gm, mine).items()}
    record_bias_shift(gm, mine)
    res["bias_shift"] = {n.name: meta.bias_shift(n).tolist() for n in gm.graph.nodes
                         if meta.bias_shift(n) is not None}

    # rank 1 without batches: the others' statistics, no hang
    res["one_empty"] = _summary(_calibrated(float_gm, "mse", data[:2] if rank == 0 else []))
    # no batches anywhere; a NaN on rank 1: every rank raises
    res["all_empty"] = _error(lambda: _calibrated(float_gm, "minmax", []))
    bad = torch.full((2, 3, 64, 64), float("nan"))
    res["nan_on_1"] = _error(lambda: _calibrated(float_gm, "minmax", [(bad,)] if rank else mine))

    # the documented way to shard: a DataLoader with a DistributedSampler
    ds = torch.utils.data.TensorDataset(torch.cat([b[0] for b in data]))
    loader = torch.utils.data.DataLoader(
        ds, batch_size=2, sampler=torch.utils.data.DistributedSampler(ds, shuffle=False))
    res["sampler"] = _summary(_calibrated(float_gm, "histogram", loader))
    with open(f"{out}/rank{rank}.json", "w") as f:
        json.dump(res, f)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """One thread, in the ranks too: equal float kernels on both sides of each comparison,
    and fast on a shared machine (2 threads on 2 busy cores ran ResNet-18 20x slower)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    launch(_rank, WORLD, (str(out),), timeout_s=240)
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(WORLD)]


@pytest.fixture(scope="module")
def float_gm():
    return _float_graph()


def test_ranks_end_with_identical_statistics(ranks):
    for key in (*KINDS, "absmax", "output_means", "bias_shift", "one_empty", "sampler"):
        assert ranks[0][key] == ranks[1][key], key


@pytest.mark.parametrize("kind", EXACT)
def test_every_qparam_equals_one_process_on_the_union(ranks, float_gm, kind):
    union = _summary(_calibrated(float_gm, kind, _data()))
    assert len(union) > 20 and ranks[0][kind] == union  # scale, zero point, batches, counts


def test_moving_average_equals_the_merge_of_the_shards_not_one_pass(ranks, float_gm):
    """An exponential moving average depends on the order of the batches: the ranks' merge
    is the batch-weighted mean of the ranks' averages (calibrate.merge in rank order)."""
    shards = [_calibrated(float_gm, "moving_average", _data()[r::WORLD]) for r in range(WORLD)]
    assert ranks[0]["moving_average"] == _summary(merge(*shards))
    one_pass = _summary(_calibrated(float_gm, "moving_average", _data()))
    assert ranks[0]["moving_average"] != one_pass


def test_smooth_quant_and_bias_correction_statistics_merge(ranks, float_gm):
    gm = copy.deepcopy(float_gm)
    record_input_absmax(gm, _data())
    absmax = {n.name: meta.input_absmax(n).tolist() for n in gm.graph.nodes
              if meta.input_absmax(n) is not None}
    assert absmax and ranks[0]["absmax"] == absmax  # a maximum: exact
    gm = _calibrated(float_gm, "minmax", _data())
    means = layer_output_means(gm, _data())
    assert len(means) == 21
    for name, m in means.items():  # bias correction's "output" mode: the float means
        np.testing.assert_allclose(ranks[0]["output_means"][name], m, rtol=1e-12, atol=1e-12)
    record_bias_shift(gm, _data())
    assert len(ranks[0]["bias_shift"]) == 21
    for n in gm.graph.nodes:  # means: float64 sums in another order, then float32
        if meta.bias_shift(n) is not None:
            np.testing.assert_allclose(ranks[0]["bias_shift"][n.name], meta.bias_shift(n),
                                       rtol=1e-5, atol=1e-9)


def test_a_rank_without_batches_and_failures(ranks, float_gm):
    assert ranks[0]["one_empty"] == _summary(_calibrated(float_gm, "mse", _data()[:2]))
    for r in ranks:
        assert "zero batches on all 2 ranks" in r["all_empty"]
    assert "produced NaN" in ranks[1]["nan_on_1"]
    assert "calibration failed on rank(s) [1]" in ranks[0]["nan_on_1"]


def test_distributed_sampler_shards(ranks, float_gm):
    """DistributedSampler interleaves samples: rank r gets samples r, r + 2, ... in batches
    of 2; one process on the same batches (any order) gets the same qparams."""
    x = torch.cat([b[0] for b in _data()])
    batches = [(x[[i, i + 2]],) for r in range(WORLD) for i in range(r, len(x), 4)]
    assert ranks[0]["sampler"] == _summary(_calibrated(float_gm, "histogram", batches[::-1]))


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**16), pieces=st.integers(1, 4), kind=st.sampled_from(
    ["histogram", "mse", "entropy"]))
def test_histogram_counts_do_not_depend_on_order_or_split(seed, pieces, kind):
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(int(torch.randint(1, 3000, (1,), generator=g)), generator=g)
          * float(torch.rand(1, generator=g) * 10 ** int(torch.randint(-3, 4, (1,), generator=g)))
          + float(torch.randn(1, generator=g)) for _ in range(5)]
    whole = OBSERVERS[kind]("x")
    for x in xs:
        whole(x)
    order = torch.randperm(len(xs), generator=g).tolist()
    parts = [OBSERVERS[kind]("x") for _ in range(pieces)]
    for i, j in enumerate(order):
        parts[i % pieces](xs[j])
    for p in parts[1:]:
        parts[0].merge(p)
    spec = ptqpasses.QSpec(observer=kind)
    assert torch.equal(parts[0].counts, whole.counts)
    assert parts[0].qparams(spec) == whole.qparams(spec)
    assert float(whole.counts.sum()) == sum(x.numel() for x in xs)
    assert whole.hist.sum() == pytest.approx(whole.counts.sum(), rel=1e-12)


def test_cli_quantize_nproc_2_writes_the_single_process_recipe(tmp_path):
    from ptqpasses_tools.cli import main
    np.save(tmp_path / "calib.npy", np.random.default_rng(0).normal(size=(24, 1, 8, 8))
            .astype("float32"))
    args = ["tools.digits:DigitsCNN", "--input", "1x1x8x8:float32", "--calib",
            str(tmp_path / "calib.npy"), "--batch-size", "4"]
    assert main(["quantize", *args, "--no-guard", "--out", str(tmp_path / "one")]) == 0
    assert main(["quantize", *args, "--nproc", "2", "--out", str(tmp_path / "two")]) == 0
    assert (tmp_path / "one.json").read_text() == (tmp_path / "two.json").read_text()
