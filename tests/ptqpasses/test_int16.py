"""int16 activations as a per-node precision: exact integer ops past the int32 accumulator."""

import torch
from torch import nn

import ptqpasses
from ptqpasses import QSpec, QuantConfig, Scheme
from ptqpasses.report import sqnr

ptq = torch.ops.ptq
INT16 = Scheme(activation=QSpec(dtype="int16", symmetric=True, observer="minmax"))


class Wide(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(64, 8192), nn.Linear(8192, 8)
        with torch.no_grad():  # same-sign products: a long reduction that overflows int32
            self.fc2.weight.uniform_(0.8, 1.0)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def test_int16_linear_accumulates_past_int32_exactly():
    torch.manual_seed(0)
    m = Wide().eval()
    calib = [(torch.randn(8, 64),) for _ in range(2)]
    cfg = QuantConfig(by_module_name={"fc1": INT16, "fc2": INT16}, policy="all")
    observed = ptqpasses.prepare(m, calib[0], cfg)
    ptqpasses.calibrate(observed, calib, progress=False)
    import copy
    qdq = ptqpasses.convert(copy.deepcopy(observed), lower=False)
    q = ptqpasses.convert(observed)
    lin = [n for n in q.graph.nodes if n.target is ptq.linear.default]
    assert len(lin) == 2 and all(ptqpasses.meta.get_qparams(n).dtype == "int16" for n in lin)
    # the int16 x int8 accumulator of fc2 really exceeds int32 on this input
    x = calib[0][0]
    interp_vals = {}

    class Rec(torch.fx.Interpreter):
        def run_node(self, n):
            r = super().run_node(n)
            interp_vals[n.name] = r
            return r

    with torch.no_grad():
        out = Rec(q).run(x)
    fc2 = lin[1]
    xq = interp_vals[fc2.args[0].name].double()
    wq = getattr(q, fc2.args[2].target).double()
    acc = xq @ wq.T
    assert float(acc.abs().max()) > 2**31
    with torch.no_grad():
        assert sqnr(qdq(x), out) > 60.0  # integer graph == its QDQ reference
        assert sqnr(m(x), out) > 35.0    # and int16 activations are accurate


def test_int16_per_node_output_keeps_int8_input():
    """A node raised to int16 whose input comes from an int8 op: int8 in, int16 out."""
    torch.manual_seed(0)
    m = Wide().eval()
    calib = [(torch.randn(8, 64),)]
    q = ptqpasses.quantize(m, calib[0], calib, QuantConfig(by_module_name={"fc2": INT16},
                                                           policy="all"), progress=False)
    lin = [n for n in q.graph.nodes if n.target is ptq.linear.default]
    assert ptqpasses.meta.get_qparams(lin[0]).dtype == "uint8"
    assert ptqpasses.meta.get_qparams(lin[1]).dtype == "int16"
