"""``ptq.matmul``: activation x activation, batched with torch.matmul broadcasting.

Both operands are activations, so zero points cannot be folded into constants; the product of
centered values is exact in int32 for 8-bit operands (|a - za| * |b - zb| <= 255 * 255); an
int16 operand may need ``acc_dtype="int64"`` (chosen by the emitter from K and the ranges).
"""

from __future__ import annotations

from tvm import te, tirx

from backends.tvm.requant import f32, requant_te


def _is_one(dim) -> bool:
    return isinstance(dim, (int, tirx.IntImm)) and int(dim) == 1


def broadcast_shape(a: list, b: list) -> list:
    """Right-aligned broadcast of two batch shapes (symbolic dims assumed equal)."""
    out = []
    for i in range(max(len(a), len(b))):
        da = a[len(a) - 1 - i] if i < len(a) else 1
        db = b[len(b) - 1 - i] if i < len(b) else 1
        out.append(db if _is_one(da) else da)
    return out[::-1]


def _batch_index(shape: list, out_idx: list) -> list:
    off = len(out_idx) - len(shape)
    return [0 if _is_one(d) else out_idx[off + i] for i, d in enumerate(shape)]


def matmul(a, b, *, a_zp: int, b_zp: int, multiplier: float, out_zp: int, qmin: int,
           qmax: int, out_dtype: str, acc_dtype: str = "int32"):
    """TE compute of ``requant((a - a_zp) @ (b - b_zp))``, ``a [..., M, K]``, ``b [..., K, N]``,
    accumulated in ``acc_dtype``."""
    a_batch, b_batch = list(a.shape[:-2]), list(b.shape[:-2])
    batch = broadcast_shape(a_batch, b_batch)
    m_dim, k_dim, n_dim = a.shape[-2], a.shape[-1], b.shape[-1]
    k = te.reduce_axis((0, k_dim), name="k")

    def body(*idx):
        bi, i, j = list(idx[:-2]), idx[-2], idx[-1]
        av = a[(*_batch_index(a_batch, bi), i, k)].astype(acc_dtype) - tirx.const(a_zp, acc_dtype)
        bv = b[(*_batch_index(b_batch, bi), k, j)].astype(acc_dtype) - tirx.const(b_zp, acc_dtype)
        return te.sum(av * bv, axis=k)

    acc = te.compute((*batch, m_dim, n_dim), body, name="acc")
    m = f32(multiplier)
    return te.compute(acc.shape, lambda *idx: requant_te(acc[idx], m, out_zp, qmin, qmax,
                                                         out_dtype), name="out")
