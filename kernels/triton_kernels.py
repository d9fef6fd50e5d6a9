"""Triton kernels of ``(ell_B, cos_t_B)``: forward, and a backward in two contention-free passes.

Import only on the Triton path (triton is imported at module level). Launchers, tile plans
and autotuning live in ``triton_launch.py``.

Precision (``precision.py``): every tile is loaded in its storage dtype (the fp32 master weight
stays fp32 in memory) and cast in registers to the compute dtype ``TILE`` (0 ieee fp32, 1 tf32,
2 bf16, 3 fp16); products accumulate in fp32 and the log-sum-exp is fp32.

* ``fwd_kernel``: grid (row blocks x class splits); online (max, sum-exp) per row over the
  split's class tiles; one partial (m, l) per split (small batches still fill the GPU), combined
  by a length-B logsumexp in torch. The class norms ``1/max(|w_j|, eps)`` come from the same W
  tiles as the products (no separate pass over W, no normalised copy of W) and scale each fp32
  product tile; the first row block stores them for the backward.
* ``dx_kernel``: grid (row blocks x class splits x D blocks). The program recomputes its
  probability tiles and keeps ``dX[rows, d-block]`` of its class split in registers, then
  writes it once into a ``[splits, B, D]`` fp32 partial; torch sums the splits. Deterministic
  (no atomics), bounded memory (the launcher caps splits * B * D * 4 bytes at 64 MB).
* ``dw_kernel``: grid (class tiles x D blocks). The program owns its class rows, loops over
  every row block keeping ``a_j = sum_i q_ij x_i`` and ``t_j = sum_i q_ij r_ij`` in registers,
  applies the normalisation gradient ``dW_j = a_j - t_j w_j / |w_j|^2`` and writes its rows
  once, in the gradient's dtype. No C x D scratch, no atomics.

Why two passes and not one: a single pass must add either dX or dW across programs; the
previous kernel did (fp32 atomics into dX replicas plus a C x D fp32 accumulator) and spent
~90 % of its time there. The split passes recompute the B x C products once more (5 instead of
4 matmul-sized passes over the data) but contend on nothing. Gradient filtering (skipping
tiles whose probabilities are all tiny, as cut-cross-entropy does) is not used: it would save
only the two gradient dots, never the recomputed products; at initialisation the softmax over
85K-2M classes is near uniform (every probability ~1/C, below any fixed eps, so a fixed
threshold skips everything and breaks the accuracy rule); and here the non-target weights
``exp(s r/|w| - ell)`` sum to one per row by construction, so only ``g_i`` (the non-target share
of the full softmax) says what is negligible. A filter would need a per-row bound on the
skipped mass and a GPU measurement showing it pays; neither exists yet.

Interpreter (``TRITON_INTERPRET=1``): tiles are rounded to the compute precision bit-wise and
multiplied as fp32 (bf16 ``tl.dot`` is wrong there), the dots run in ieee mode, and one fixed tile plan is used (no autotune, no libdevice, no atomics).
"""
# B: batch, C: classes (local shard), D: embedding dim
import triton
import triton.language as tl


@triton.jit
def _tile(a, TILE: tl.constexpr, INTERP: tl.constexpr):
    """A loaded tile in the compute dtype (cast in registers).

    The interpreter keeps fp32 tiles holding the rounded values: its bf16 dot is wrong and its
    fp32 -> bf16 cast truncates, so bf16 (round to nearest even) and tf32 (round to nearest,
    ties away, as cvt.rna.tf32.f32) are rounded bit-wise, exactly as the GPU rounds them."""
    if INTERP:
        a = a.to(tl.float32)
        if TILE == 1:
            bits = a.to(tl.int32, bitcast=True)
            a = ((bits + 0x1000) & -0x2000).to(tl.float32, bitcast=True)
        elif TILE == 2:
            bits = a.to(tl.int32, bitcast=True)
            a = ((bits + 0x7FFF + ((bits >> 16) & 1)) & -0x10000).to(tl.float32, bitcast=True)
        elif TILE == 3:
            a = a.to(tl.float16).to(tl.float32)
    elif TILE == 2:
        a = a.to(tl.bfloat16)
    elif TILE == 3:
        a = a.to(tl.float16)
    else:
        a = a.to(tl.float32)
    return a


@triton.jit
def _dot(a, b, acc, TILE: tl.constexpr, INTERP: tl.constexpr):
    if INTERP:
        acc = tl.dot(a, b, acc, input_precision="ieee")
    elif TILE == 0:
        acc = tl.dot(a, b, acc, input_precision="ieee")
    elif TILE == 1:
        acc = tl.dot(a, b, acc, input_precision="tf32")
    else:
        acc = tl.dot(a, b, acc)
    return acc


@triton.jit
def _xw_tiles(X, W, rows, cols64, row_ok, col_ok, d0, D, stride_xb, stride_wc,
              BLOCK_D: tl.constexpr):
    """The embedding tile ``X[rows, d0:d0+BLOCK_D]`` and weight tile ``W[cols, d0:d0+BLOCK_D]``
    as stored (0 outside the rows, classes and D)."""
    dd = d0 + tl.arange(0, BLOCK_D)
    d_ok = dd < D
    x = tl.load(X + rows[:, None] * stride_xb + dd[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    w = tl.load(W + cols64[:, None] * stride_wc + dd[None, :],
                mask=col_ok[:, None] & d_ok[None, :], other=0.0)
    return x, w


@triton.jit
def _products(X, W, rows, cols64, row_ok, col_ok, D, stride_xb, stride_wc,
              BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
              TILE: tl.constexpr, INTERP: tl.constexpr):
    """``r = X[rows] . W[cols]^T`` (raw weight) in fp32, looping over D."""
    acc = tl.zeros((BLOCK_B, BLOCK_C), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        x, w = _xw_tiles(X, W, rows, cols64, row_ok, col_ok, d0, D, stride_xb, stride_wc,
                         BLOCK_D)
        acc = _dot(_tile(x, TILE, INTERP), tl.trans(_tile(w, TILE, INTERP)), acc, TILE, INTERP)
    return acc


@triton.jit
def _grad_tile(r, inv, tgt, cols, row_ok, col_ok, ell, g, scale):
    """``q_ij = dL/dr_ij = g_i s exp(s r_ij/|w_j| - ell_i) / |w_j|``; 0 on target/padding."""
    # ell = -inf only for rows with no class: all their columns are masked anyway.
    ell_safe = tl.where(ell == float("-inf"), 0.0, ell)
    valid = row_ok[:, None] & col_ok[None, :] & (cols[None, :] != tgt[:, None])
    p = tl.where(valid, tl.exp(r * (inv * scale)[None, :] - ell_safe[:, None]), 0.0)
    return p * (g * scale)[:, None] * inv[None, :]


@triton.jit
def fwd_kernel(X, W, INV, LAB, M_OUT, L_OUT, B, C, D, class_start, scale, tiles_per_split,
               stride_xb, stride_wc,
               BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
               TILE: tl.constexpr, INTERP: tl.constexpr):
    pid_b = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    row_ok = rows < B
    tgt = tl.load(LAB + rows, mask=row_ok, other=-1) - class_start
    m = tl.full((BLOCK_B,), float("-inf"), tl.float32)
    l = tl.zeros((BLOCK_B,), dtype=tl.float32)
    for t in range(0, tiles_per_split):
        cols = (pid_s * tiles_per_split + t) * BLOCK_C + tl.arange(0, BLOCK_C)
        col_ok = cols < C
        cols64 = cols.to(tl.int64)
        # The products and the class norms from the same W tiles (one read of W for both).
        r = tl.zeros((BLOCK_B, BLOCK_C), dtype=tl.float32)
        sumsq = tl.zeros((BLOCK_C,), dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            x, w = _xw_tiles(X, W, rows, cols64, row_ok, col_ok, d0, D, stride_xb, stride_wc,
                             BLOCK_D)
            w32 = w.to(tl.float32)
            sumsq += tl.sum(w32 * w32, 1)
            r = _dot(_tile(x, TILE, INTERP), tl.trans(_tile(w, TILE, INTERP)), r, TILE, INTERP)
        inv = tl.where(col_ok, 1.0 / tl.maximum(tl.sqrt(sumsq), 1e-12), 0.0)  # NORM_EPS
        # Every row block computes the same norms; the first one stores them for backward.
        if pid_b == 0:
            tl.store(INV + cols, inv, mask=col_ok)
        valid = col_ok[None, :] & (cols[None, :] != tgt[:, None])
        logit = tl.where(valid, r * (inv * scale)[None, :], float("-inf"))
        m_new = tl.maximum(m, tl.max(logit, 1))
        # Rows with nothing unmasked yet keep m = -inf: shift by 0 to avoid -inf - -inf.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        l = l * tl.exp(m - m_safe) + tl.sum(tl.exp(logit - m_safe[:, None]), 1)
        m = m_new
    tl.store(M_OUT + pid_s * B + rows, m, mask=row_ok)
    tl.store(L_OUT + pid_s * B + rows, l, mask=row_ok)


@triton.jit
def dx_kernel(X, W, INV, LAB, ELL, G, DX_PART, B, C, D, class_start, scale, tiles_per_split,
              stride_xb, stride_wc,
              BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
              BLOCK_DO: tl.constexpr, TILE: tl.constexpr, INTERP: tl.constexpr):
    pid_b = tl.program_id(0)
    pid_s = tl.program_id(1)
    pid_d = tl.program_id(2)
    rows = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    row_ok = rows < B
    tgt = tl.load(LAB + rows, mask=row_ok, other=-1) - class_start
    ell = tl.load(ELL + rows, mask=row_ok, other=0.0)
    g = tl.load(G + rows, mask=row_ok, other=0.0)
    do = pid_d * BLOCK_DO + tl.arange(0, BLOCK_DO)
    do_ok = do < D
    acc = tl.zeros((BLOCK_B, BLOCK_DO), dtype=tl.float32)
    for t in range(0, tiles_per_split):
        cols = (pid_s * tiles_per_split + t) * BLOCK_C + tl.arange(0, BLOCK_C)
        col_ok = cols < C
        cols64 = cols.to(tl.int64)
        r = _products(X, W, rows, cols64, row_ok, col_ok, D, stride_xb, stride_wc,
                      BLOCK_B, BLOCK_C, BLOCK_D, TILE, INTERP)
        inv = tl.load(INV + cols, mask=col_ok, other=0.0)
        q = _grad_tile(r, inv, tgt, cols, row_ok, col_ok, ell, g, scale)
        w = tl.load(W + cols64[:, None] * stride_wc + do[None, :],
                    mask=col_ok[:, None] & do_ok[None, :], other=0.0)
        acc = _dot(_tile(q, TILE, INTERP), _tile(w, TILE, INTERP), acc, TILE, INTERP)
    out = DX_PART + (pid_s * B).to(tl.int64) * D + rows[:, None] * D + do[None, :]
    tl.store(out, acc, mask=row_ok[:, None] & do_ok[None, :])


@triton.jit
def dw_kernel(X, W, INV, LAB, ELL, G, DW, B, C, D, class_start, scale,
              stride_xb, stride_wc, stride_dwc,
              BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
              BLOCK_DO: tl.constexpr, TILE: tl.constexpr, INTERP: tl.constexpr):
    pid_c = tl.program_id(0)
    pid_d = tl.program_id(1)
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    col_ok = cols < C
    cols64 = cols.to(tl.int64)
    inv = tl.load(INV + cols, mask=col_ok, other=0.0)
    do = pid_d * BLOCK_DO + tl.arange(0, BLOCK_DO)
    do_ok = do < D
    acc = tl.zeros((BLOCK_C, BLOCK_DO), dtype=tl.float32)
    t_acc = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for r0 in range(0, B, BLOCK_B):
        rows = r0 + tl.arange(0, BLOCK_B)
        row_ok = rows < B
        tgt = tl.load(LAB + rows, mask=row_ok, other=-1) - class_start
        ell = tl.load(ELL + rows, mask=row_ok, other=0.0)
        g = tl.load(G + rows, mask=row_ok, other=0.0)
        r = _products(X, W, rows, cols64, row_ok, col_ok, D, stride_xb, stride_wc,
                      BLOCK_B, BLOCK_C, BLOCK_D, TILE, INTERP)
        q = _grad_tile(r, inv, tgt, cols, row_ok, col_ok, ell, g, scale)
        t_acc += tl.sum(q * r, 0)
        x = tl.load(X + rows[:, None] * stride_xb + do[None, :],
                    mask=row_ok[:, None] & do_ok[None, :], other=0.0)
        acc = _dot(tl.trans(_tile(q, TILE, INTERP)), _tile(x, TILE, INTERP), acc, TILE, INTERP)
    cd_ok = col_ok[:, None] & do_ok[None, :]
    w = tl.load(W + cols64[:, None] * stride_wc + do[None, :], mask=cd_ok,
                other=0.0).to(tl.float32)
    dw = acc - (inv * inv * t_acc)[:, None] * w
    tl.store(DW + cols64[:, None] * stride_dwc + do[None, :], dw.to(DW.dtype.element_ty),
             mask=cd_ok)
