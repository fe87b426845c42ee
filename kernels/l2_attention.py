"""Fused L2 self-attention with keys tied to queries: the Triton kernels, as PyTorch ops.

Three ops (``torch.library.triton_op``, kernels launched through ``wrap_triton`` so that
torch.compile sees them): ``acf::l2_attention_triton_fwd``, ``_bwd`` and ``_bwd2``. Their autograd
and vmap rules are registered by ``acf.ops.l2_attention``, which dispatches to them.

The math, stated once (paper eq. 9-10, Kim et al. 2021; one batch element and head; c = scale)::

    s_ij  = c (2 q_i.q_j - |q_j|^2)          logits; equal to -c |q_i - q_j|^2 up to a per-row constant
    t_ij  = s_ij - c |q_i|^2 = -c |q_i - q_j|^2   what the kernels compute (see "Precision")
    lse_i = log sum_j exp(t_ij)               saved by the forward (fp32, fp64 for fp64 inputs)
    P_ij  = exp(t_ij - lse_i)                 never stored: every pass recomputes it tile by tile
    O_i   = sum_j P_ij v_j

First order (given G = dL/dO)::

    dP_ij = G_i.v_j          delta_i = G_i.O_i          dS_ij = P_ij (dP_ij - delta_i)
    dv_j  = sum_i P_ij G_i
    dq_k  = 2c [ sum_j dS_kj q_j                           (query role: q_k in row k)
               + sum_i dS_ik q_i - (sum_i dS_ik) q_k ]     (key role: q_k in column k, incl. the
                                                            bias -c|q_k|^2, d/dq_k = -2c q_k)

Precision (fp32). Two rewrites, exact in real arithmetic, keep the kernel's error well below the
PyTorch reference's (the tolerance rule of ``tests/attention_rule.py``; the plain forms were up to 3x above it):
  * logits relative to the diagonal, t_ij = s_ij - c|q_i|^2 = -c|q_i - q_j|^2 <= 0 (``_logits``):
    the saved lse is O(log N) instead of O(c|q|^2), so exp(t_ij - lse_i) does not inherit the
    rounding of a large lse; the second order uses the matching tangent t' (``_tangent_tile``).
  * both roles of dq in difference form. Rows of dS sum to zero (sum_j P_ij dP_ij = delta_i), so
    the query role is sum_j dS_kj (q_j - q_k): the kernels subtract (sum_j dS_kj) q_k, as the key
    role already subtracts (sum_i dS_ik) q_k. Where softmax saturates (P_kk ~ 1, large |q|^2 or
    d), dS_kk = P_kk (dP_kk - delta_k) is pure cancellation error; in difference form it is
    multiplied by q_k - q_k = 0 and drops out (measured: dq error 3.5e-5 -> 3e-10 at |q|^2 ~ 150,
    PyTorch reference 1.2e-5). Same for dq' with (dS', q) and (dS, u).

Second order. ``(dq, dv)`` is the gradient of ``L = sum_i G_i.O_i`` in ``(q, v)``; for incoming
cotangents ``(u, w)`` of ``(dq, dv)`` the double backward returns ``H (u, w)`` (H the Hessian of L,
symmetric, so this is the forward-mode tangent of ``(dq, dv)`` in the direction ``(u, w)`` at fixed
G) and ``dO' = J_O (u, w)`` (the tangent of O). Tangents (dotted)::

    s'_ij   = 2c (u_i.q_j + q_i.u_j - q_j.u_j)      mu_i = sum_j P_ij s'_ij   (= lse'_i)
    P'_ij   = P_ij (s'_ij - mu_i)
    O'_i    = sum_j P_ij s'_ij v_j + P_ij w_j - mu_i O_i
    dP'_ij  = G_i.w_j        delta'_i = G_i.O'_i
    dS'_ij  = P'_ij (dP_ij - delta_i) + P_ij (dP'_ij - delta'_i)
    dv'_j   = sum_i P'_ij G_i
    dq'_k   = 2c [ sum_j (dS'_kj q_j + dS_kj u_j) + sum_i (dS'_ik q_i + dS_ik u_i)
                   - (sum_i dS'_ik) q_k - (sum_i dS_ik) u_k ]
    (computed with the row sums sum_j dS'_kj = sum_j dS_kj = 0 subtracted as well, and with
    t'_ij = s'_ij - 2c q_i.u_i in place of s': see "Precision" above)

Route for the second order: fused. The backward op is itself differentiable (its autograd is
registered in ``acf.ops.l2_attention``, with the CPU kernels of ``acf._C`` sharing the pattern):
its backward runs three more flash-style kernels (a row pass for O',
mu, delta'; a column pass for dv' and the key role of dq'; a row pass for the query role of dq').
Extra memory: O(B H N (d + e)) (the tangent O', and mu, delta' per row), never N x N.
Third and higher order derivatives are not provided (the double-backward op has no autograd, and
differentiating it raises).

Kernel layout: inputs of any strides on (B, H, N, d) / (B, H, N, e); one program per block of
rows (or columns) of one (batch, head); head dims padded to a power of two >= 16 by masking;
any N by masking. fp32 inputs use ``input_precision`` "ieee" (exact fp32 products) or "tf32";
bf16/fp16 inputs accumulate in fp32; fp64 inputs compute in fp64 throughout.
"""
from __future__ import annotations

import math
import os
from typing import Optional

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton
from triton.runtime.errors import OutOfResources


from ..ops.backends import TRITON_DTYPES, TRITON_MAX_HEAD_DIM as MAX_HEAD_DIM
from ..ops.l2_attention_passes import register_autograd, register_vmap

INTERPRET_BLOCK = 64  # tile size under TRITON_INTERPRET=1


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# ----------------------------------------------------------------------------------------------
# Triton kernels. Pointers are offset to one (batch, head) first; a program owns BLOCK_M rows
# (row passes) or BLOCK_N columns (column passes) of that head and loops over all the others.
# ----------------------------------------------------------------------------------------------


@triton.jit
def _head_offset(pid, n_blocks, H, sb, sh):
    """Program id -> (block start index, element offset of its (batch, head))."""
    bh = pid // n_blocks
    blk = pid % n_blocks
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    return blk, b * sb + h * sh


@triton.jit
def _rows(ptr, offs, cols, s_n, s_c, n_rows, n_cols):
    """Load a (len(offs), len(cols)) tile, zero outside (n_rows, n_cols)."""
    mask = (offs[:, None] < n_rows) & (cols[None, :] < n_cols)
    return tl.load(ptr + offs[:, None] * s_n + cols[None, :] * s_c, mask=mask, other=0.0)


@triton.jit
def _cols(ptr, offs, cols, s_n, s_c, n_rows, n_cols):
    """Load the transposed tile (len(cols), len(offs)), zero outside."""
    mask = (offs[None, :] < n_rows) & (cols[:, None] < n_cols)
    return tl.load(ptr + offs[None, :] * s_n + cols[:, None] * s_c, mask=mask, other=0.0)


@triton.jit
def _logits(q, kT, sqi, sqj, scale, PRECISION: tl.constexpr):
    """Logits relative to the diagonal for a (BLOCK_M, BLOCK_N) tile:
    ``t_ij = scale (2 q_i.q_j - |q_j|^2 - |q_i|^2) = -scale |q_i - q_j|^2 <= 0``.

    Softmax ignores the per-row term ``-scale |q_i|^2``, but dropping it costs accuracy: the
    plain logits ``s_ij`` and the log-sum-exp are of size ``scale |q|^2``, and every pass forms
    ``exp(s_ij - lse_i)`` from two such numbers, so the rounding of ``lse_i`` (the forward's
    ``m_i + log l_i``) adds an error of ``eps scale |q|^2`` to every P_ij on top of the logit's
    own rounding. The PyTorch reference avoids that (softmax subtracts an exact row max and
    divides); with the row term the kernel's log-sum-exp is ``O(log N)`` and its rounding
    negligible (measured at |q|^2 ~ 150: dv error 4.4e-6 -> 9.8e-7, dv' 5.9e-5 -> 1.5e-10 with
    the matching tangent t'; PyTorch reference 3.9e-7 and 1.2e-5).

    Every pass computes its tiles with this same call, on (rows, cols) operands of the same
    orientation and the same saved ``|q|^2``, so that P recomputed in a backward pass matches
    the forward bit for bit (a transposed product rounds differently).

    With TF32 products ("tf32") this one product runs as "tf32x3" (three TF32 products, about fp32
    accurate): every P_ij inherits its logit's error through exp, and a single TF32 rounding of the
    inputs put the output's error at 2.8x the TF32 PyTorch reference's (measured on an H200 at
    N = 1000, d = 32: 6.3e-3 against 2.3e-3; with "tf32x3" 3.8e-6). The other products stay TF32."""
    if PRECISION == "tf32":
        dot = tl.dot(q, kT, input_precision="tf32x3", out_dtype=sqj.dtype)
    else:
        dot = tl.dot(q, kT, input_precision=PRECISION, out_dtype=sqj.dtype)
    return scale * ((2.0 * dot - sqj[None, :]) - sqi[:, None])


@triton.jit
def _fwd_kernel(
    Q, V, SQ, O, LSE,
    sqb, sqh, sqn, sqd, svb, svh, svn, sve, sob, soh, son, soe,
    H, N, D, E, scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_E: tl.constexpr,
    PRECISION: tl.constexpr,
):
    n_blocks = tl.cdiv(N, BLOCK_M)
    pid = tl.program_id(0)
    blk, qo = _head_offset(pid, n_blocks, H, sqb, sqh)
    _, vo = _head_offset(pid, n_blocks, H, svb, svh)
    _, oo = _head_offset(pid, n_blocks, H, sob, soh)
    bh = (pid // n_blocks).to(tl.int64)
    Q += qo
    V += vo
    O += oo
    LSE += bh * N
    SQ += bh * N

    offs_m = blk * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_e = tl.arange(0, BLOCK_E)
    q = _rows(Q, offs_m, offs_d, sqn, sqd, N, D)
    sqi = tl.load(SQ + offs_m, mask=offs_m < N, other=0.0)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=LSE.dtype.element_ty)
    l_i = tl.zeros([BLOCK_M], dtype=LSE.dtype.element_ty)
    acc = tl.zeros([BLOCK_M, BLOCK_E], dtype=LSE.dtype.element_ty)
    for start_n in range(0, N, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        kT = _cols(Q, offs_n, offs_d, sqn, sqd, N, D)
        sq = tl.load(SQ + offs_n, mask=offs_n < N, other=0.0)
        s = _logits(q, kT, sqi, sq, scale, PRECISION)
        s = tl.where(offs_n[None, :] < N, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp(s - m_new[:, None])
        alpha = tl.exp(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        vb = _rows(V, offs_n, offs_e, svn, sve, N, E)
        acc = acc * alpha[:, None] + tl.dot(p.to(vb.dtype), vb, input_precision=PRECISION, out_dtype=LSE.dtype.element_ty)
        m_i = m_new
    acc = acc / l_i[:, None]
    mask_m = offs_m < N
    tl.store(LSE + offs_m, m_i + tl.log(l_i), mask=mask_m)
    o_ptr = O + offs_m[:, None] * son + offs_e[None, :] * soe
    tl.store(o_ptr, acc.to(O.dtype.element_ty), mask=mask_m[:, None] & (offs_e[None, :] < E))


@triton.jit
def _bwd_col_kernel(
    Q, V, DO, SQ, LSE, DELTA, DV, DQK,
    sqb, sqh, sqn, sqd, svb, svh, svn, sve, sgb, sgh, sgn, sge, sdvb, sdvh, sdvn, sdve,
    H, N, D, E, scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_E: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Columns j of one head: dv_j and the key role of dq_j (written to the fp32 DQK buffer)."""
    n_blocks = tl.cdiv(N, BLOCK_N)
    pid = tl.program_id(0)
    blk, qo = _head_offset(pid, n_blocks, H, sqb, sqh)
    _, vo = _head_offset(pid, n_blocks, H, svb, svh)
    _, go = _head_offset(pid, n_blocks, H, sgb, sgh)
    _, dvo = _head_offset(pid, n_blocks, H, sdvb, sdvh)
    bh = (pid // n_blocks).to(tl.int64)
    Q += qo
    V += vo
    DO += go
    DV += dvo
    SQ += bh * N
    LSE += bh * N
    DELTA += bh * N
    DQK += bh * N * BLOCK_D

    offs_n = blk * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_e = tl.arange(0, BLOCK_E)
    mask_n = offs_n < N
    kT = _cols(Q, offs_n, offs_d, sqn, sqd, N, D)
    vT = _cols(V, offs_n, offs_e, svn, sve, N, E)
    sq = tl.load(SQ + offs_n, mask=mask_n, other=0.0)

    dv = tl.zeros([BLOCK_N, BLOCK_E], dtype=LSE.dtype.element_ty)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=LSE.dtype.element_ty)
    cs = tl.zeros([BLOCK_N], dtype=LSE.dtype.element_ty)
    for start_m in range(0, N, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        mask_m = offs_m < N
        q = _rows(Q, offs_m, offs_d, sqn, sqd, N, D)
        g = _rows(DO, offs_m, offs_e, sgn, sge, N, E)
        lse = tl.load(LSE + offs_m, mask=mask_m, other=0.0)
        sqi = tl.load(SQ + offs_m, mask=mask_m, other=0.0)
        delta = tl.load(DELTA + offs_m, mask=mask_m, other=0.0)
        s = _logits(q, kT, sqi, sq, scale, PRECISION)
        p = tl.where(mask_m[:, None] & mask_n[None, :], tl.exp(s - lse[:, None]), 0.0)
        dp = tl.dot(g, vT, input_precision=PRECISION, out_dtype=LSE.dtype.element_ty)
        ds = p * (dp - delta[:, None])
        dv += tl.dot(tl.trans(p.to(g.dtype)), g, input_precision=PRECISION, out_dtype=LSE.dtype.element_ty)
        dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PRECISION, out_dtype=LSE.dtype.element_ty)
        cs += tl.sum(ds, 0)
    kf = _rows(Q, offs_n, offs_d, sqn, sqd, N, D).to(LSE.dtype.element_ty)
    dqk = (2.0 * scale) * (dk - cs[:, None] * kf)
    tl.store(DQK + offs_n[:, None] * BLOCK_D + offs_d[None, :], dqk, mask=mask_n[:, None])
    dv_ptr = DV + offs_n[:, None] * sdvn + offs_e[None, :] * sdve
    tl.store(dv_ptr, dv.to(DV.dtype.element_ty), mask=mask_n[:, None] & (offs_e[None, :] < E))


@triton.jit
def _bwd_row_kernel(
    Q, V, DO, SQ, LSE, DELTA, DQK, DQ,
    sqb, sqh, sqn, sqd, svb, svh, svn, sve, sgb, sgh, sgn, sge, sdqb, sdqh, sdqn, sdqd,
    H, N, D, E, scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_E: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Rows i of one head: the query role of dq_i, added to the key role from DQK."""
    n_blocks = tl.cdiv(N, BLOCK_M)
    pid = tl.program_id(0)
    blk, qo = _head_offset(pid, n_blocks, H, sqb, sqh)
    _, vo = _head_offset(pid, n_blocks, H, svb, svh)
    _, go = _head_offset(pid, n_blocks, H, sgb, sgh)
    _, dqo = _head_offset(pid, n_blocks, H, sdqb, sdqh)
    bh = (pid // n_blocks).to(tl.int64)
    Q += qo
    V += vo
    DO += go
    DQ += dqo
    SQ += bh * N
    LSE += bh * N
    DELTA += bh * N
    DQK += bh * N * BLOCK_D

    offs_m = blk * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_e = tl.arange(0, BLOCK_E)
    mask_m = offs_m < N
    q = _rows(Q, offs_m, offs_d, sqn, sqd, N, D)
    g = _rows(DO, offs_m, offs_e, sgn, sge, N, E)
    lse = tl.load(LSE + offs_m, mask=mask_m, other=0.0)
    sqi = tl.load(SQ + offs_m, mask=mask_m, other=0.0)
    delta = tl.load(DELTA + offs_m, mask=mask_m, other=0.0)

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=LSE.dtype.element_ty)
    rs = tl.zeros([BLOCK_M], dtype=LSE.dtype.element_ty)
    for start_n in range(0, N, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        kT = _cols(Q, offs_n, offs_d, sqn, sqd, N, D)
        sq = tl.load(SQ + offs_n, mask=offs_n < N, other=0.0)
        s = _logits(q, kT, sqi, sq, scale, PRECISION)
        p = tl.where(offs_n[None, :] < N, tl.exp(s - lse[:, None]), 0.0)
        vT = _cols(V, offs_n, offs_e, svn, sve, N, E)
        dp = tl.dot(g, vT, input_precision=PRECISION, out_dtype=LSE.dtype.element_ty)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(kT.dtype), tl.trans(kT), input_precision=PRECISION, out_dtype=LSE.dtype.element_ty)
        rs += tl.sum(ds, 1)
    dqk = tl.load(DQK + offs_m[:, None] * BLOCK_D + offs_d[None, :], mask=mask_m[:, None], other=0.0)
    qf = q.to(LSE.dtype.element_ty)
    dq = (2.0 * scale) * (dq - rs[:, None] * qf) + dqk  # sum_j dS_ij (q_j - q_i): see _bwd
    dq_ptr = DQ + offs_m[:, None] * sdqn + offs_d[None, :] * sdqd
    tl.store(dq_ptr, dq.to(DQ.dtype.element_ty), mask=mask_m[:, None] & (offs_d[None, :] < D))


@triton.jit
def _tangent_tile(q, u, kT, ukT, sqi, sq, qui, qu, lse, mu, scale, mask, PRECISION: tl.constexpr):
    """P and P' = P (t' - mu) for one tile, t' the tangent of the logits relative to the
    diagonal (see ``_logits``): t'_ij = 2c (u_i.q_j + q_i.u_j - q_j.u_j - q_i.u_i), zero for
    i = j. (The plain s'_ij lacks the row term -2c q_i.u_i; P' is the same, but then mu_i and
    sum_j P_ij s'_ij v_j are both of size |s'_ii| and cancel in O' = sum_j P_ij s'_ij v_j - mu_i O_i
    where softmax saturates.)"""
    p = tl.where(mask, tl.exp(_logits(q, kT, sqi, sq, scale, PRECISION) - lse[:, None]), 0.0)
    sd = tl.dot(u, kT, input_precision=PRECISION, out_dtype=sq.dtype)
    sd += tl.dot(q, ukT, input_precision=PRECISION, out_dtype=sq.dtype)
    sd = (2.0 * scale) * ((sd - qu[None, :]) - qui[:, None])
    return p, p * (sd - mu[:, None]), p * sd


@triton.jit
def _jvp_row_kernel(
    Q, U, V, W, O, DO, SQ, LSE, MU, DDELTA, ODOT,
    H, N, D, E, scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_E: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Second order, row pass 1: O'_i, mu_i and delta'_i (all inputs contiguous (BH, N, *))."""
    n_blocks = tl.cdiv(N, BLOCK_M)
    pid = tl.program_id(0)
    bh = (pid // n_blocks).to(tl.int64)
    blk = pid % n_blocks
    Q += bh * N * D
    U += bh * N * D
    V += bh * N * E
    W += bh * N * E
    O += bh * N * E
    DO += bh * N * E
    ODOT += bh * N * E
    SQ += bh * N
    LSE += bh * N
    MU += bh * N
    DDELTA += bh * N

    offs_m = blk * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_e = tl.arange(0, BLOCK_E)
    mask_m = offs_m < N
    q = _rows(Q, offs_m, offs_d, D, 1, N, D)
    u = _rows(U, offs_m, offs_d, D, 1, N, D)
    lse = tl.load(LSE + offs_m, mask=mask_m, other=0.0)
    sqi = tl.load(SQ + offs_m, mask=mask_m, other=0.0)
    qui = tl.sum(q.to(LSE.dtype.element_ty) * u.to(LSE.dtype.element_ty), 1)
    zero = tl.zeros([BLOCK_M], dtype=LSE.dtype.element_ty)

    mu = tl.zeros([BLOCK_M], dtype=LSE.dtype.element_ty)
    acc = tl.zeros([BLOCK_M, BLOCK_E], dtype=LSE.dtype.element_ty)
    for start_n in range(0, N, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        kT = _cols(Q, offs_n, offs_d, D, 1, N, D)
        ukT = _cols(U, offs_n, offs_d, D, 1, N, D)
        sq = tl.load(SQ + offs_n, mask=mask_n, other=0.0)
        qu = tl.sum(kT.to(LSE.dtype.element_ty) * ukT.to(LSE.dtype.element_ty), 0)
        p, _, ps = _tangent_tile(q, u, kT, ukT, sqi, sq, qui, qu, lse, zero, scale, mask_n[None, :], PRECISION)
        mu += tl.sum(ps, 1)
        vb = _rows(V, offs_n, offs_e, E, 1, N, E)
        wb = _rows(W, offs_n, offs_e, E, 1, N, E)
        acc += tl.dot(ps.to(vb.dtype), vb, input_precision=PRECISION, out_dtype=LSE.dtype.element_ty)
        acc += tl.dot(p.to(wb.dtype), wb, input_precision=PRECISION, out_dtype=LSE.dtype.element_ty)
    o = _rows(O, offs_m, offs_e, E, 1, N, E).to(LSE.dtype.element_ty)
    odot = acc - mu[:, None] * o
    g = _rows(DO, offs_m, offs_e, E, 1, N, E).to(LSE.dtype.element_ty)
    tl.store(MU + offs_m, mu, mask=mask_m)
    tl.store(DDELTA + offs_m, tl.sum(g * odot, 1), mask=mask_m)
    mask_o = mask_m[:, None] & (offs_e[None, :] < E)
    tl.store(ODOT + offs_m[:, None] * E + offs_e[None, :], odot.to(ODOT.dtype.element_ty), mask=mask_o)


@triton.jit
def _hvp_col_kernel(
    Q, U, V, W, DO, SQ, LSE, DELTA, MU, DDELTA, GV, GQK,
    H, N, D, E, scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_E: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Second order, column pass: dv'_j and the key role of dq'_j (fp32/fp64 buffer GQK)."""
    n_blocks = tl.cdiv(N, BLOCK_N)
    pid = tl.program_id(0)
    bh = (pid // n_blocks).to(tl.int64)
    blk = pid % n_blocks
    Q += bh * N * D
    U += bh * N * D
    V += bh * N * E
    W += bh * N * E
    DO += bh * N * E
    GV += bh * N * E
    GQK += bh * N * BLOCK_D
    SQ += bh * N
    LSE += bh * N
    DELTA += bh * N
    MU += bh * N
    DDELTA += bh * N

    offs_n = blk * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_e = tl.arange(0, BLOCK_E)
    mask_n = offs_n < N
    kT = _cols(Q, offs_n, offs_d, D, 1, N, D)
    ukT = _cols(U, offs_n, offs_d, D, 1, N, D)
    vT = _cols(V, offs_n, offs_e, E, 1, N, E)
    wT = _cols(W, offs_n, offs_e, E, 1, N, E)
    sq = tl.load(SQ + offs_n, mask=mask_n, other=0.0)
    qu = tl.sum(kT.to(LSE.dtype.element_ty) * ukT.to(LSE.dtype.element_ty), 0)

    gv = tl.zeros([BLOCK_N, BLOCK_E], dtype=LSE.dtype.element_ty)
    kacc = tl.zeros([BLOCK_N, BLOCK_D], dtype=LSE.dtype.element_ty)
    cs = tl.zeros([BLOCK_N], dtype=LSE.dtype.element_ty)
    cs2 = tl.zeros([BLOCK_N], dtype=LSE.dtype.element_ty)
    for start_m in range(0, N, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        mask_m = offs_m < N
        q = _rows(Q, offs_m, offs_d, D, 1, N, D)
        u = _rows(U, offs_m, offs_d, D, 1, N, D)
        g = _rows(DO, offs_m, offs_e, E, 1, N, E)
        lse = tl.load(LSE + offs_m, mask=mask_m, other=0.0)
        sqi = tl.load(SQ + offs_m, mask=mask_m, other=0.0)
        qui = tl.sum(q.to(LSE.dtype.element_ty) * u.to(LSE.dtype.element_ty), 1)
        delta = tl.load(DELTA + offs_m, mask=mask_m, other=0.0)
        mu = tl.load(MU + offs_m, mask=mask_m, other=0.0)
        ddelta = tl.load(DDELTA + offs_m, mask=mask_m, other=0.0)
        mask = mask_m[:, None] & mask_n[None, :]
        p, pd, _ = _tangent_tile(q, u, kT, ukT, sqi, sq, qui, qu, lse, mu, scale, mask, PRECISION)
        dp = tl.dot(g, vT, input_precision=PRECISION, out_dtype=LSE.dtype.element_ty) - delta[:, None]
        dpd = tl.dot(g, wT, input_precision=PRECISION, out_dtype=LSE.dtype.element_ty) - ddelta[:, None]
        ds = p * dp
        dsd = pd * dp + p * dpd
        gv += tl.dot(tl.trans(pd.to(g.dtype)), g, input_precision=PRECISION, out_dtype=LSE.dtype.element_ty)
        kacc += tl.dot(tl.trans(dsd.to(q.dtype)), q, input_precision=PRECISION, out_dtype=LSE.dtype.element_ty)
        kacc += tl.dot(tl.trans(ds.to(u.dtype)), u, input_precision=PRECISION, out_dtype=LSE.dtype.element_ty)
        cs += tl.sum(dsd, 0)
        cs2 += tl.sum(ds, 0)
    kf = _rows(Q, offs_n, offs_d, D, 1, N, D).to(LSE.dtype.element_ty)
    ukf = _rows(U, offs_n, offs_d, D, 1, N, D).to(LSE.dtype.element_ty)
    gqk = (2.0 * scale) * (kacc - cs[:, None] * kf - cs2[:, None] * ukf)
    tl.store(GQK + offs_n[:, None] * BLOCK_D + offs_d[None, :], gqk, mask=mask_n[:, None])
    mask_v = mask_n[:, None] & (offs_e[None, :] < E)
    tl.store(GV + offs_n[:, None] * E + offs_e[None, :], gv.to(GV.dtype.element_ty), mask=mask_v)


@triton.jit
def _hvp_row_kernel(
    Q, U, V, W, DO, SQ, LSE, DELTA, MU, DDELTA, GQK, GQ,
    H, N, D, E, scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_E: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Second order, row pass 2: the query role of dq'_i, added to the key role from GQK."""
    n_blocks = tl.cdiv(N, BLOCK_M)
    pid = tl.program_id(0)
    bh = (pid // n_blocks).to(tl.int64)
    blk = pid % n_blocks
    Q += bh * N * D
    U += bh * N * D
    V += bh * N * E
    W += bh * N * E
    DO += bh * N * E
    GQ += bh * N * D
    GQK += bh * N * BLOCK_D
    SQ += bh * N
    LSE += bh * N
    DELTA += bh * N
    MU += bh * N
    DDELTA += bh * N

    offs_m = blk * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_e = tl.arange(0, BLOCK_E)
    mask_m = offs_m < N
    q = _rows(Q, offs_m, offs_d, D, 1, N, D)
    u = _rows(U, offs_m, offs_d, D, 1, N, D)
    g = _rows(DO, offs_m, offs_e, E, 1, N, E)
    lse = tl.load(LSE + offs_m, mask=mask_m, other=0.0)
    sqi = tl.load(SQ + offs_m, mask=mask_m, other=0.0)
    qui = tl.sum(q.to(LSE.dtype.element_ty) * u.to(LSE.dtype.element_ty), 1)
    delta = tl.load(DELTA + offs_m, mask=mask_m, other=0.0)
    mu = tl.load(MU + offs_m, mask=mask_m, other=0.0)
    ddelta = tl.load(DDELTA + offs_m, mask=mask_m, other=0.0)

    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=LSE.dtype.element_ty)
    rs = tl.zeros([BLOCK_M], dtype=LSE.dtype.element_ty)
    rs2 = tl.zeros([BLOCK_M], dtype=LSE.dtype.element_ty)
    for start_n in range(0, N, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        kT = _cols(Q, offs_n, offs_d, D, 1, N, D)
        ukT = _cols(U, offs_n, offs_d, D, 1, N, D)
        sq = tl.load(SQ + offs_n, mask=mask_n, other=0.0)
        qu = tl.sum(kT.to(LSE.dtype.element_ty) * ukT.to(LSE.dtype.element_ty), 0)
        p, pd, _ = _tangent_tile(q, u, kT, ukT, sqi, sq, qui, qu, lse, mu, scale, mask_n[None, :], PRECISION)
        vT = _cols(V, offs_n, offs_e, E, 1, N, E)
        wT = _cols(W, offs_n, offs_e, E, 1, N, E)
        dp = tl.dot(g, vT, input_precision=PRECISION, out_dtype=LSE.dtype.element_ty) - delta[:, None]
        dpd = tl.dot(g, wT, input_precision=PRECISION, out_dtype=LSE.dtype.element_ty) - ddelta[:, None]
        ds = p * dp
        dsd = pd * dp + p * dpd
        acc += tl.dot(dsd.to(kT.dtype), tl.trans(kT), input_precision=PRECISION, out_dtype=LSE.dtype.element_ty)
        acc += tl.dot(ds.to(ukT.dtype), tl.trans(ukT), input_precision=PRECISION, out_dtype=LSE.dtype.element_ty)
        rs += tl.sum(dsd, 1)
        rs2 += tl.sum(ds, 1)
    gqk = tl.load(GQK + offs_m[:, None] * BLOCK_D + offs_d[None, :], mask=mask_m[:, None], other=0.0)
    qf = q.to(LSE.dtype.element_ty)
    uf = u.to(LSE.dtype.element_ty)
    gq = (2.0 * scale) * ((acc - rs[:, None] * qf) - rs2[:, None] * uf) + gqk
    mask_q = mask_m[:, None] & (offs_d[None, :] < D)
    tl.store(GQ + offs_m[:, None] * D + offs_d[None, :], gq.to(GQ.dtype.element_ty), mask=mask_q)


# ----------------------------------------------------------------------------------------------
# Launch configuration
# ----------------------------------------------------------------------------------------------


def _pow2(x: int) -> int:
    return max(16, triton.next_power_of_2(int(x)))


def _configs(kind: str, n: int, bd: int, be: int, dtype: torch.dtype, prec: Optional[str] = None) -> list[dict]:
    """Candidate (BLOCK_M, BLOCK_N, num_warps, num_stages), first preferred; later ones are
    smaller fallbacks used if the first runs out of shared memory or registers."""
    if interpreting():
        # The interpreter runs one program at a time with numpy: few, large tiles are fastest.
        # Tests lower INTERPRET_BLOCK to make small N cross several tiles.
        b = min(INTERPRET_BLOCK, _pow2(n))
        return [dict(BLOCK_M=b, BLOCK_N=b, num_warps=4, num_stages=1)]
    wide = max(bd, be)
    if dtype == torch.float64:
        return [dict(BLOCK_M=32, BLOCK_N=32, num_warps=4, num_stages=1),
                dict(BLOCK_M=16, BLOCK_N=16, num_warps=4, num_stages=1)]
    if dtype == torch.float32 and prec == "ieee":
        # Exact fp32 products run on FMA units, not tensor cores: a tile's dot needs far more
        # registers. Measured with bench/compile_check.py (ptxas, sm_90): the tensor-core tiles
        # below spill 16-87 KB per thread (ptxas then reports 32 registers) and take up to 2 min
        # to compile; 32x32 with 4 warps spills <= 28 B at d <= 32 and little at d = 64, 16x16
        # spills <= 1.1 KB at d = 128 (16x32 up to 11 KB).
        tiny = dict(BLOCK_M=16, BLOCK_N=16, num_warps=4, num_stages=1)
        return [dict(BLOCK_M=32, BLOCK_N=32, num_warps=4, num_stages=1), tiny] if wide <= 64 else [tiny]
    half = dtype in (torch.float16, torch.bfloat16)
    st = 3 if half else 2
    w = 4 if wide <= 64 else 8
    # Half-precision tiles: measured by bench/gpu_tune.py on an H200 (bf16, d = 32, N = 1024 and
    # 4096; bench/results/2026-12-04-h200-tune.json): fwd 64x64 and row 64x32 with 4 stages were the
    # fastest of 6-7 candidates each (fwd -16%, VJP -13% at N = 4096 against 128x64 and 128x32).
    if kind == "fwd":
        first = [dict(BLOCK_M=64 if half else 128, BLOCK_N=64, num_warps=w, num_stages=st)]
    elif kind == "col":  # holds BLOCK_N keys, loops over BLOCK_M queries
        first = [dict(BLOCK_M=32, BLOCK_N=128 if half else 64, num_warps=w, num_stages=st)]
    elif kind == "row":  # holds BLOCK_M queries, loops over BLOCK_N keys
        first = [dict(BLOCK_M=64, BLOCK_N=32, num_warps=w, num_stages=4 if half else st)]
    else:  # second-order passes: more live tiles
        first = [dict(BLOCK_M=64, BLOCK_N=64 if wide <= 64 else 32, num_warps=w, num_stages=2)]
    return first + [dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=1),
                    dict(BLOCK_M=32, BLOCK_N=32, num_warps=4, num_stages=1),
                    dict(BLOCK_M=16, BLOCK_N=16, num_warps=4, num_stages=1)]


_CHOSEN: dict[tuple, dict] = {}


def _launch(kernel, kind: str, rows_of: str, bh: int, n: int, bd: int, be: int,
            dtype: torch.dtype, args: tuple, **consts) -> None:
    """Launch ``kernel`` with the first config that compiles for this shape class.

    ``rows_of`` names the block the grid is laid over ("BLOCK_M" or "BLOCK_N")."""
    prec = consts.get("PRECISION")
    key = (kernel.fn.__name__ if hasattr(kernel, "fn") else str(kernel), bd, be, dtype, prec, interpreting())
    cands = [_CHOSEN[key]] if key in _CHOSEN else _configs(kind, n, bd, be, dtype, prec)
    err: Optional[Exception] = None
    for cfg in cands:
        grid = (triton.cdiv(n, cfg[rows_of]) * bh,)
        try:
            launcher = kernel if interpreting() else wrap_triton(kernel)  # the interpreter runs plain launches
            launcher[grid](*args, BLOCK_D=bd, BLOCK_E=be, **cfg, **consts)
        except OutOfResources as e:  # shared memory / registers
            err = e
            continue
        if not interpreting():
            _CHOSEN[key] = cfg
        return
    raise RuntimeError(f"no launch configuration of {key[0]} fits this device: {err}")


# ----------------------------------------------------------------------------------------------
# Host wrappers
# ----------------------------------------------------------------------------------------------


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def precision_of(dtype: torch.dtype, precision: Optional[str]) -> str:
    """``input_precision`` of tl.dot: fp64 and fp16/bf16 are exact products ("ieee");
    fp32 follows ``precision`` or, when None, PyTorch's TF32 switch for matmuls."""
    if dtype != torch.float32:
        return "ieee"
    if precision is None:
        precision = "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"
    if precision not in ("ieee", "tf32"):
        raise ValueError(f"precision must be 'ieee' or 'tf32', got {precision!r}")
    return precision


def _strides(t: torch.Tensor) -> tuple:
    return tuple(t.stride())


def _fwd(q: torch.Tensor, v: torch.Tensor, scale: float, prec: str) -> tuple[torch.Tensor, torch.Tensor]:
    B, H, N, D = q.shape
    E = v.shape[-1]
    o = torch.empty((B, H, N, E), device=q.device, dtype=q.dtype)
    lse = torch.empty((B * H, N), device=q.device, dtype=_acc_dtype(q.dtype))
    sq = _sq_norms(q)
    args = (q, v, sq, o, lse, *_strides(q), *_strides(v), *_strides(o), H, N, D, E, scale)
    _launch(_fwd_kernel, "fwd", "BLOCK_M", B * H, N, _pow2(D), _pow2(E), q.dtype, args, PRECISION=prec)
    return o, lse, sq


def _sq_norms(q: torch.Tensor) -> torch.Tensor:
    """|q_j|^2 in fp32 (fp64), (B*H, N): computed once, read by every pass (see ``_logits``)."""
    acc = _acc_dtype(q.dtype)
    return q.to(acc).square().sum(-1).reshape(-1, q.shape[2])


def _bwd(q, v, sq, o, lse, g, scale: float, prec: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    B, H, N, D = q.shape
    E = v.shape[-1]
    acc = _acc_dtype(q.dtype)
    bd, be = _pow2(D), _pow2(E)
    delta = (g.to(acc) * o.to(acc)).sum(-1).reshape(B * H, N)  # delta_i = G_i.O_i (preprocess)
    dqk = torch.empty((B * H, N, bd), device=q.device, dtype=acc)
    dq = torch.empty_like(q, memory_format=torch.contiguous_format)
    dv = torch.empty_like(v, memory_format=torch.contiguous_format)
    common = (*_strides(q), *_strides(v), *_strides(g))
    _launch(_bwd_col_kernel, "col", "BLOCK_N", B * H, N, bd, be, q.dtype,
            (q, v, g, sq, lse, delta, dv, dqk, *common, *_strides(dv), H, N, D, E, scale), PRECISION=prec)
    _launch(_bwd_row_kernel, "row", "BLOCK_M", B * H, N, bd, be, q.dtype,
            (q, v, g, sq, lse, delta, dqk, dq, *common, *_strides(dq), H, N, D, E, scale), PRECISION=prec)
    return dq, dv, delta


def _double_bwd(q, v, sq, o, lse, g, delta, u, w, scale: float, prec: str):
    B, H, N, D = q.shape
    E = v.shape[-1]
    acc = _acc_dtype(q.dtype)
    bd, be = _pow2(D), _pow2(E)
    q, v, o, g, u, w = (t.contiguous() for t in (q, v, o, g, u, w))
    mu = torch.empty((B * H, N), device=q.device, dtype=acc)
    ddelta = torch.empty_like(mu)
    odot = torch.empty_like(v)
    gv = torch.empty_like(v)
    gq = torch.empty_like(q)
    gqk = torch.empty((B * H, N, bd), device=q.device, dtype=acc)
    dims = (H, N, D, E, scale)
    _launch(_jvp_row_kernel, "second", "BLOCK_M", B * H, N, bd, be, q.dtype,
            (q, u, v, w, o, g, sq, lse, mu, ddelta, odot, *dims), PRECISION=prec)
    _launch(_hvp_col_kernel, "second", "BLOCK_N", B * H, N, bd, be, q.dtype,
            (q, u, v, w, g, sq, lse, delta, mu, ddelta, gv, gqk, *dims), PRECISION=prec)
    _launch(_hvp_row_kernel, "second", "BLOCK_M", B * H, N, bd, be, q.dtype,
            (q, u, v, w, g, sq, lse, delta, mu, ddelta, gqk, gq, *dims), PRECISION=prec)
    return gq, gv, odot


@triton_op("acf::l2_attention_triton_fwd", mutates_args=())
def l2_attention_triton_fwd(q: torch.Tensor, v: torch.Tensor, scale: float, precision: str
                            ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(O, lse)``; ``lse`` is ``(B*H, N)`` in the accumulation dtype."""
    o, lse, _ = _fwd(q, v, scale, precision)
    return o, lse


@triton_op("acf::l2_attention_triton_bwd", mutates_args=())
def l2_attention_triton_bwd(q: torch.Tensor, v: torch.Tensor, o: torch.Tensor, lse: torch.Tensor,
                            g: torch.Tensor, scale: float, precision: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(dq, dv)`` for ``G = dL/dO`` (``|q|^2`` recomputed: O(N d), against O(N^2 d) for the passes)."""
    dq, dv, _ = _bwd(q, v, _sq_norms(q), o, lse, g, scale, precision)
    return dq, dv


@triton_op("acf::l2_attention_triton_bwd2", mutates_args=())
def l2_attention_triton_bwd2(q: torch.Tensor, v: torch.Tensor, o: torch.Tensor, lse: torch.Tensor,
                             g: torch.Tensor, u: torch.Tensor, w: torch.Tensor, scale: float, precision: str
                             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The tangents ``(dq', dv', O')`` in the direction ``(U, W)`` (``delta`` recomputed)."""
    acc = _acc_dtype(q.dtype)
    delta = (g.to(acc) * o.to(acc)).sum(-1).reshape(-1, q.shape[2])
    return _double_bwd(q, v, _sq_norms(q), o, lse, g, delta, u, w, scale, precision)


def check_inputs(q: torch.Tensor, v: torch.Tensor) -> None:
    """Raise a clear error for inputs the Triton path cannot take."""
    for name, t in (("q", q), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must be (batch, heads, N, dim), got shape {tuple(t.shape)}")
        if t.dtype not in TRITON_DTYPES:
            raise TypeError(f"triton l2_attention: {name} has dtype {t.dtype}; expected float16, bfloat16, float32 or float64")
    if q.shape[:3] != v.shape[:3]:
        raise ValueError(f"q and v must agree in (batch, heads, N): got {tuple(q.shape)} and {tuple(v.shape)}")
    if q.dtype != v.dtype:
        raise TypeError(f"q and v must share a dtype: got {q.dtype} and {v.dtype}")
    if q.device != v.device:
        raise ValueError(f"q and v must be on the same device: got {q.device} and {v.device}")
    if q.device.type != "cuda" and not interpreting():
        raise ValueError(f"triton l2_attention needs CUDA tensors (got {q.device}); "
                         "set TRITON_INTERPRET=1 to run the kernels on CPU, or use backend='reference'")
    for name, t in (("q", q), ("v", v)):
        if t.shape[-1] > MAX_HEAD_DIM:
            raise ValueError(f"triton l2_attention supports head dims up to {MAX_HEAD_DIM}; "
                             f"{name} has {t.shape[-1]} (use backend='reference')")
        if t.shape[-1] < 1:
            raise ValueError(f"{name} has an empty head dim: shape {tuple(t.shape)}")


# Autograd and vmap of the three ops, registered as the ops are defined (calling torch.ops.acf.l2_attention_triton_*
# directly differentiates as the public function does).
register_autograd("l2_attention_triton")
register_vmap("l2_attention_triton")
