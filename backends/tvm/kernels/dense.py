"""``ptq.linear``: ``x[..., K]`` times a packed ``[N/l, K/d, l, d]`` int8 weight."""

from __future__ import annotations

from tvm import te, tirx

from ptqpasses_backends.tvm.requant import requant_te


def dense(x, w_packed, corr, mult, *, n_out: int, k_in: int, shift: int, act_dtype: str,
          out_zp: int, qmin: int, qmax: int, out_dtype: str):
    """TE compute of a requantized int8 linear layer.

    Args:
        x: ``[..., K]`` int8/uint8 activations.
        w_packed: ``[N/l, K/d, l, d]`` int8 weights.
        corr: ``[N]`` int32, ``bias - zp_enc * sum_k w``.
        mult: ``[N]`` float32 requantization multipliers.
        shift: Added to ``x`` to reach ``act_dtype`` (see ``packing.encode_shift``).
    """
    nb, kb, lanes, depth = (int(d) for d in w_packed.shape)
    lead = list(x.shape[:-1])
    zero = tirx.const(0, act_dtype)

    def enc(*idx):
        *m, k = idx
        v = (x[(*m, k)].astype("int32") + shift).astype(act_dtype)
        return tirx.if_then_else(k < k_in, v, zero) if kb * depth != k_in else v

    x_enc = te.compute((*lead, kb * depth), enc, name="x_enc")
    k = te.reduce_axis((0, kb * depth), name="k")
    acc = te.compute(
        (*lead, nb * lanes),
        lambda *idx: te.sum(
            x_enc[(*idx[:-1], k)].astype("int32")
            * w_packed[idx[-1] // lanes, k // depth, idx[-1] % lanes, k % depth].astype("int32"),
            axis=k),
        name="acc")
    return te.compute(
        (*lead, n_out),
        lambda *idx: requant_te(acc[idx] + corr[idx[-1]], mult[idx[-1]], out_zp, qmin, qmax,
                                out_dtype),
        name="out")
