"""``ptq.matmul``: activation x activation, batched with torch.matmul broadcasting.

Both operands are activations, so zero points cannot be folded into constants; the product of
centered values is exact in int32 for 8-bit operands (|a - za| * |b - zb| <= 255 * 255); an
int16 operand may need ``acc_dtype="int64"`` (chosen by the emitter from K and the ranges).
"""

from __future__ import annotations

from tvm import te, tirx

from ptqpasses_backends.tvm.requant import f32, requant_te


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


def matmul_packed(a, b, *, a_zp: int, b_zp: int, multiplier: float, out_zp: int, qmin: int,
                  qmax: int, out_dtype: str, lanes: int = 16, depth: int = 2):
    """:func:`matmul` for 8-bit operands in dot-product block form (x86 AVX2: ``vpmaddwd``).

    Both operands are centered to int16 once per call (``|q - zp| <= 255``): ``x_enc [..., M,
    K']`` from ``a``, and ``b_pack [..., N'/lanes, K'/depth, lanes, depth]`` from ``b``, the
    blocks of the packed dense weights (``K'``, ``N'``: ``K``, ``N`` rounded up, zero-padded).
    ``acc [..., M, N']`` is the same int32 sum as :func:`matmul`'s, in the shape of the
    ``dense`` kernel's, so the family's dense template schedules it.
    """
    a_batch, b_batch = list(a.shape[:-2]), list(b.shape[:-2])
    batch = broadcast_shape(a_batch, b_batch)
    m_dim, k_in, n_out = a.shape[-2], int(a.shape[-1]), int(b.shape[-1])
    kb, nb = -(-k_in // depth), -(-n_out // lanes)
    zero = tirx.const(0, "int16")

    def centered(q, zp):
        return (q.astype("int32") - zp).astype("int16")

    def enc(*idx):
        *lead, i, k = idx
        if kb * depth == k_in:
            return centered(a[(*lead, i, k)], a_zp)
        v = centered(a[(*lead, i, tirx.min(k, k_in - 1))], a_zp)  # (in bounds when padding)
        return tirx.if_then_else(k < k_in, v, zero)

    x_enc = te.compute((*a_batch, m_dim, kb * depth), enc, name="x_enc")

    def pack(*idx):
        *lead, o, c, l, d = idx
        k, n = c * depth + d, o * lanes + l
        inside = []
        if kb * depth != k_in:
            inside, k = inside + [k < k_in], tirx.min(k, k_in - 1)
        if nb * lanes != n_out:
            inside, n = inside + [n < n_out], tirx.min(n, n_out - 1)
        v = centered(b[(*lead, k, n)], b_zp)
        return tirx.if_then_else(tirx.all(*inside), v, zero) if inside else v

    b_pack = te.compute((*b_batch, nb, kb, lanes, depth), pack, name="b_pack")
    k = te.reduce_axis((0, kb * depth), name="k")

    def body(*idx):
        bi, i, j = list(idx[:-2]), idx[-2], idx[-1]
        av = x_enc[(*_batch_index(a_batch, bi), i, k)].astype("int32")
        bv = b_pack[(*_batch_index(b_batch, bi), j // lanes, k // depth, j % lanes,
                     k % depth)].astype("int32")
        return te.sum(av * bv, axis=k)

    acc = te.compute((*batch, m_dim, nb * lanes), body, name="acc")
    m = f32(multiplier)
    return te.compute((*batch, m_dim, n_out),
                      lambda *idx: requant_te(acc[idx], m, out_zp, qmin, qmax, out_dtype),
                      name="out")
