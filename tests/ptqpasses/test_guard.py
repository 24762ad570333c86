"""The accuracy guard of ``quantize``: judges on held-out calibration batches, raises the most
damaging nodes (int16, then float) until the floor is met, and says what it did."""

import warnings

import pytest
import torch

import ptqpasses
from ptqpasses.guard import GUARD_KEY, Guard, score_outputs


class Outliers(torch.nn.Module):
    """Hidden channel 0 is ``factor`` times the others, and the next layer barely reads it:
    one per-tensor int8 scale for the hidden state rounds the channels that matter away
    (the LLM outlier pattern), while int16 (factor ~100) or float (factor ~1000) holds."""

    def __init__(self, factor: float):
        super().__init__()
        self.a, self.b, self.c = (torch.nn.Linear(16, 64), torch.nn.Linear(64, 32),
                                  torch.nn.Linear(32, 16))
        with torch.no_grad():
            self.a.weight[0] *= factor
            self.a.bias[0] = 0
            self.b.weight[:, 0] /= factor

    def forward(self, x):
        return self.c(torch.nn.functional.gelu(self.b(self.a(x))))


def _case(factor, batches=8, seed=0):
    torch.manual_seed(seed)
    model = Outliers(factor).eval()
    calib = [(torch.randn(16, 16),) for _ in range(batches)]
    test = [(torch.randn(32, 16),) for _ in range(2)]  # never seen by quantize
    return model, calib, test


def _score(model, q, data):
    with torch.no_grad():
        return score_outputs([model(*b) for b in data], [q(*b) for b in data])


@pytest.mark.parametrize("factor, to", [(100.0, "int16"), (1000.0, "float")])
def test_guard_meets_the_floor_on_a_model_built_to_break_int8(factor, to, capsys):
    model, calib, test = _case(factor)
    plain = ptqpasses.quantize(model, calib[0], calib, guard=False, progress=False)
    q = ptqpasses.quantize(model, calib[0], calib, progress=False)
    rep = q.meta[GUARD_KEY]
    assert Guard().margin(_score(model, plain, test)) < -5  # plain int8 breaks, far below
    assert rep.guard.margin(rep.before) < 0 and rep.met and rep.changed
    assert {r.to for r in rep.raised} == {to}
    assert Guard().margin(_score(model, q, test)) >= 0  # and it holds on unseen data
    assert rep.set_aside and rep.batches == 2 and rep.calibrated == 8
    printed = capsys.readouterr().err
    assert "Accuracy guard" in printed and f"| {to} |" in printed and "floor met" in printed
    assert 0 < rep.raised_share <= 1
    assert f"({100 * rep.raised_share:.0f}% of their MACs reading a raised activation)" in printed
    cov = {c.node: c for c in ptqpasses.coverage(q)}
    if to == "float":  # coverage names the guard as the reason
        assert all("accuracy guard" in cov[r.node].reason and not cov[r.node].integer
                   for r in rep.raised)
        assert rep.config.keep_float == tuple(r.node for r in rep.raised)
    else:  # int16: still integer ops, with int16 activations
        assert rep.config.by_node_regex and rep.config.keep_float == ()
        int16 = [n for n in q.graph.nodes if n.op == "call_function"
                 and n.target == torch.ops.ptq.quantize.default and n.args[-1] == torch.int16]
        assert int16
    # the plan is reproducible by hand: the same config on the same calibration batches
    again = ptqpasses.quantize(model, calib[0], calib[:rep.calibrated], rep.config,
                               guard=False, progress=False)
    assert torch.equal(again(*test[0]), q(*test[0]))


def test_guard_leaves_an_accurate_plan_alone_and_is_quiet(capsys):
    model, calib, test = _case(1.0)
    q = ptqpasses.quantize(model, calib[0], calib, progress=False)
    rep = q.meta[GUARD_KEY]
    assert rep.met and not rep.changed and rep.evaluations == 0 and rep.after == rep.before
    assert capsys.readouterr().err == ""
    ptqpasses.quantize(model, calib[0], calib, progress=True)
    assert "floor met, plan unchanged" in capsys.readouterr().err


def test_guard_false_calibrates_on_every_batch():
    model, calib, test = _case(1.0)
    q = ptqpasses.quantize(model, calib[0], calib, guard=False, progress=False)
    observed = ptqpasses.prepare(model, calib[0])
    ptqpasses.calibrate(observed, calib, progress=False)
    assert GUARD_KEY not in q.meta
    assert torch.equal(q(*test[0]), ptqpasses.convert(observed)(*test[0]))


def test_unreachable_floor_keeps_the_best_plan_and_warns(capsys):
    model, calib, test = _case(100.0)
    with pytest.warns(UserWarning, match="could not meet its floor"):
        q = ptqpasses.quantize(model, calib[0], calib, progress=False,
                               guard=Guard(sqnr_db=200.0, cosine=None, steps=("int16",)))
    rep = q.meta[GUARD_KEY]
    assert not rep.met and rep.after.sqnr_db > rep.before.sqnr_db
    assert "NOT met" in capsys.readouterr().err


def test_budget_stops_the_search_and_says_so(capsys):
    model, calib, _ = _case(1000.0)
    with pytest.warns(UserWarning):
        q = ptqpasses.quantize(model, calib[0], calib, progress=False, guard=Guard(budget_s=0))
    rep = q.meta[GUARD_KEY]
    assert rep.out_of_budget and not rep.changed and not rep.met
    assert "stopped at its limit" in capsys.readouterr().err
    with pytest.warns(UserWarning):  # one plan: the search stops before meeting the floor
        q = ptqpasses.quantize(model, calib[0], calib, progress=False,
                               guard=Guard(max_plans=1, steps=("int16",)))
    assert q.meta[GUARD_KEY].evaluations == 1 and q.meta[GUARD_KEY].out_of_budget


def test_one_batch_is_judged_in_sample_and_the_report_says_so():
    model, calib, _ = _case(1.0, batches=1)
    q = ptqpasses.quantize(model, calib[0], calib, progress=False)
    rep = q.meta[GUARD_KEY]
    assert not rep.set_aside and rep.calibrated == 1 and "nothing to set aside" in str(rep)


def test_score_outputs_cosine_is_per_sample_and_skips_integer_outputs():
    a, b = torch.zeros(2, 16), torch.zeros(2, 16)
    a[0, 0], a[1, 1], b[0, 0], b[1, 0] = 1.0, 2.0, 1.0, 2.0
    ref, out = [(a, torch.tensor([3, 4]))], [(b, torch.tensor([0, 0]))]
    s = score_outputs(ref, out)
    assert s.cosine == pytest.approx(0.0, abs=1e-12)  # sample 1 is orthogonal
    assert s.sqnr_db == pytest.approx(10 * torch.log10(torch.tensor(5.0 / 8.0)).item())
    # two class scores per sample: no cosine (ill-conditioned), the SQNR still counts
    few = score_outputs([a[:, :2]], [b[:, :2]])
    assert few.cosine == 1.0 and few.sqnr_db == pytest.approx(s.sqnr_db)


@pytest.mark.parametrize("kwargs, match", [
    (dict(sqnr_db=None, cosine=None), "needs a floor"), (dict(holdout=1.0), "holdout"),
    (dict(cosine=1.0), "cosine"), (dict(steps=("int4",)), "steps"),
    (dict(rank_samples=0), "rank_samples"), (dict(max_plans=0), "max_plans")])
def test_guard_options_are_checked(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Guard(**kwargs)
    with pytest.raises(TypeError, match="guard must be"):
        ptqpasses.quantize(torch.nn.Linear(2, 2), (torch.randn(2, 2),), [], guard="yes")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert Guard(holdout=0.5).split([1, 2, 3, 4]) == ([1, 2], [3, 4], True)


def test_refit_calibrates_the_returned_graph_on_every_batch_or_not():
    model, calib, test = _case(1.0)
    q = ptqpasses.quantize(model, calib[0], calib, progress=False)
    plain = ptqpasses.quantize(model, calib[0], calib, guard=False, progress=False)
    assert q.meta[GUARD_KEY].calibrated == 8 and "refit" in str(q.meta[GUARD_KEY])
    assert torch.equal(q(*test[0]), plain(*test[0]))  # unchanged plan: the plain result
    judged = ptqpasses.quantize(model, calib[0], calib, progress=False, guard=Guard(refit=False))
    six = ptqpasses.quantize(model, calib[0], calib[:6], guard=False, progress=False)
    assert judged.meta[GUARD_KEY].calibrated == 6 and torch.equal(judged(*test[0]), six(*test[0]))


def test_the_ranking_runs_on_the_first_samples_cut_along_the_shared_batch_dimension():
    from ptqpasses.guard import _first_samples
    a, b = (torch.randn(4, 3), torch.ones(4, 5)), (torch.randn(4, 3), torch.ones(4, 5))
    few = _first_samples([a, b], 6)
    assert [t.shape[0] for bt in few for t in bt] == [4, 4, 2, 2]
    assert torch.equal(few[1][0], b[0][:2])
    odd = (torch.randn(4, 3), torch.randn(2))  # tensors disagree on dim 0: kept whole
    assert _first_samples([odd], 1) == [odd]


def test_node_cost_counts_the_macs_of_compute_nodes_and_the_elements_of_others():
    from ptqpasses.guard import node_cost

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.lin = torch.nn.Conv2d(3, 8, 3, groups=1), torch.nn.Linear(6, 5)

        def forward(self, x):  # x: [2, 3, 8, 8]
            y = self.lin(torch.nn.functional.gelu(self.conv(x)))  # [2, 8, 6, 5]
            return y @ y.transpose(-1, -2)                          # [2, 8, 6, 6]

    gm = ptqpasses.capture(Net().eval(), (torch.randn(2, 3, 8, 8),), dynamic_batch=False)
    cost = {n.name: node_cost(n) for n in gm.graph.nodes if n.op == "call_function"}
    conv = next(k for k in cost if k.startswith("conv"))
    assert cost[conv] == (2 * 8 * 6 * 6) * (3 * 3 * 3)
    assert cost[next(k for k in cost if k.startswith("linear"))] == (2 * 8 * 6 * 5) * 6
    assert cost[next(k for k in cost if k.startswith("matmul"))] == (2 * 8 * 6 * 6) * 5
    assert cost[next(k for k in cost if k.startswith("gelu"))] == 2 * 8 * 6 * 6

    # raising the GELU to int16 makes the linear read int16 too: its MACs count
    from ptqpasses.guard import raise_cost
    nodes = {n.name: n for n in gm.graph.nodes}
    gelu, lin = (nodes[next(k for k in cost if k.startswith(p))] for p in ("gelu", "linear"))
    assert raise_cost(gelu, [nodes[conv]]) == cost[gelu.name] + cost[lin.name]


def test_ranking_is_by_damage_per_cost():
    """The most harmful node first, unless one about as harmful is much cheaper to raise;
    a node that adds no noise last."""
    from ptqpasses.guard import damage_per_cost

    harmful, mild = damage_per_cost(-8.0, 10**6), damage_per_cost(12.0, 10**6)
    assert harmful > mild
    assert damage_per_cost(-7.0, 10**4) > harmful  # about as harmful, 100x cheaper
    assert damage_per_cost(15.0, 10**4) < harmful  # cheaper, far less harmful
    assert damage_per_cost(float("inf"), 1) == 0.0
