"""Pallas TPU flash attention for the Transfusion mask, forward and backward.

Grid (batch, head, query block, key step) for the forward and dQ kernels, (batch, head, key
block, query step) for the dK/dV kernel. Per row and block, the range of blocks on the other
side that the block's intervals can reach (attention_intervals.block_ranges) is
scalar-prefetched into SMEM; step s of the inner grid axis visits block `first + s`, so the
live blocks come first and the remaining steps are idle: their index maps repeat the last live
block (no new DMA) and `pl.when` skips the compute. Inside a live block the rule is applied
element-wise from segment ids and horizons, as in the reference.

Layout: q, dO [B, H, L, D], k, v [B, Hkv, L, D] (GQA by index map h -> h // groups); the
query-side vectors (segment ids, horizons, lse, delta) are lane-broadcast to [B, (H,) L, LANES],
the key-side segment ids sublane-broadcast to [B, 8, L], following jax's own TPU flash kernel.
dK/dV are produced per query head and summed over each group outside the kernel.

`interpret=True` runs the same kernels with the Pallas interpreter on any backend (tests).
On a real TPU: block_k must be a multiple of 128 and block_q of 8 (ValueError otherwise).
"""

import dataclasses
import functools
import math

import jax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
import jax.numpy as jnp

from tfusion.model import attention_intervals as iv_lib
from tfusion.model import flash_vjp

_NEG = -1e30
_SUBLANES = 8
_TRANS_B = (((1,), (1,)), ((), ()))  # x @ y.T
_TRANS_A = (((0,), (0,)), ((), ()))  # x.T @ y


def _round_up(x, m):
  return -(-x // m) * m


def _block_mask(qseg, qhor, kseg, k_start, lanes):
  """qseg, qhor [bq, lanes], kseg [8, bk] -> bool [bq, bk] (the rule)."""
  block_k = kseg.shape[1]
  reps = block_k // lanes
  qs = jnp.tile(qseg, (1, reps)) if reps > 1 else qseg
  qh = jnp.tile(qhor, (1, reps)) if reps > 1 else qhor
  k_pos = k_start + jax.lax.broadcasted_iota(jnp.int32, qs.shape, 1)
  return (qs == kseg[:1]) & (qs != 0) & (k_pos <= qh)


def _step_block(first, last, step):
  """Block visited at inner step `step`: first + step, held at `last` once past it."""
  return jnp.minimum(first + step, jnp.maximum(last, 0))


def _fwd_kernel(first_ref, last_ref, q_ref, k_ref, v_ref, qseg_ref, qhor_ref, kseg_ref,
                o_ref, lse_ref, m_sc, l_sc, acc_sc, *, scale, nq, lanes):
  b, i, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)
  first, last = first_ref[b * nq + i], last_ref[b * nq + i]
  block_k = k_ref.shape[2]

  @pl.when(j == 0)
  def _init():
    m_sc[...] = jnp.full(m_sc.shape, _NEG, jnp.float32)
    l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
    acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

  @pl.when(first + j <= last)
  def _compute():
    kb = first + j
    s = jax.lax.dot_general(q_ref[0, 0], k_ref[0, 0], _TRANS_B,
                            preferred_element_type=jnp.float32) * scale
    allowed = _block_mask(qseg_ref[0], qhor_ref[0], kseg_ref[0], kb * block_k, lanes)
    s = jnp.where(allowed, s, _NEG)
    m_prev, l_prev = m_sc[...][:, :1], l_sc[...][:, :1]
    m_new = jnp.maximum(m_prev, s.max(axis=1, keepdims=True))
    p = jnp.where(allowed, jnp.exp(s - m_new), 0.0)
    corr = jnp.exp(m_prev - m_new)
    l_sc[...] = jnp.broadcast_to(l_prev * corr + p.sum(axis=1, keepdims=True), l_sc.shape)
    m_sc[...] = jnp.broadcast_to(m_new, m_sc.shape)
    v = v_ref[0, 0]
    acc_sc[...] = acc_sc[...] * corr + jax.lax.dot(p.astype(v.dtype), v,
                                                   preferred_element_type=jnp.float32)

  @pl.when(j == pl.num_programs(3) - 1)
  def _finish():
    l = l_sc[...][:, :1]
    seen = l > 0
    o_ref[0, 0] = (acc_sc[...] / jnp.where(seen, l, 1.0)).astype(o_ref.dtype)
    lse = jnp.where(seen, m_sc[...][:, :1] + jnp.log(jnp.where(seen, l, 1.0)), 0.0)
    lse_ref[0, 0] = jnp.broadcast_to(lse, lse_ref.shape[2:])


def _dq_kernel(first_ref, last_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, qseg_ref,
               qhor_ref, kseg_ref, dq_ref, dq_sc, *, scale, nq, lanes):
  b, i, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)
  first, last = first_ref[b * nq + i], last_ref[b * nq + i]
  block_k = k_ref.shape[2]

  @pl.when(j == 0)
  def _init():
    dq_sc[...] = jnp.zeros(dq_sc.shape, jnp.float32)

  @pl.when(first + j <= last)
  def _compute():
    kb = first + j
    k = k_ref[0, 0]
    s = jax.lax.dot_general(q_ref[0, 0], k, _TRANS_B, preferred_element_type=jnp.float32) * scale
    allowed = _block_mask(qseg_ref[0], qhor_ref[0], kseg_ref[0], kb * block_k, lanes)
    p = jnp.where(allowed, jnp.exp(s - lse_ref[0, 0][:, :1]), 0.0)
    dp = jax.lax.dot_general(do_ref[0, 0], v_ref[0, 0], _TRANS_B,
                             preferred_element_type=jnp.float32)
    ds = p * (dp - delta_ref[0, 0][:, :1]) * scale
    dq_sc[...] += jax.lax.dot(ds.astype(k.dtype), k, preferred_element_type=jnp.float32)

  @pl.when(j == pl.num_programs(3) - 1)
  def _finish():
    dq_ref[0, 0] = dq_sc[...].astype(dq_ref.dtype)


def _dkv_kernel(first_ref, last_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, qseg_ref,
                qhor_ref, kseg_ref, dk_ref, dv_ref, dk_sc, dv_sc, *, scale, nk, lanes):
  b, j, i = pl.program_id(0), pl.program_id(2), pl.program_id(3)
  first, last = first_ref[b * nk + j], last_ref[b * nk + j]
  block_k = k_ref.shape[2]

  @pl.when(i == 0)
  def _init():
    dk_sc[...] = jnp.zeros(dk_sc.shape, jnp.float32)
    dv_sc[...] = jnp.zeros(dv_sc.shape, jnp.float32)

  @pl.when(first + i <= last)
  def _compute():
    q, do = q_ref[0, 0], do_ref[0, 0]
    s = jax.lax.dot_general(q, k_ref[0, 0], _TRANS_B, preferred_element_type=jnp.float32) * scale
    allowed = _block_mask(qseg_ref[0], qhor_ref[0], kseg_ref[0], j * block_k, lanes)
    p = jnp.where(allowed, jnp.exp(s - lse_ref[0, 0][:, :1]), 0.0)  # [bq, bk]
    dv_sc[...] += jax.lax.dot_general(p.astype(do.dtype), do, _TRANS_A,
                                      preferred_element_type=jnp.float32)
    dp = jax.lax.dot_general(do, v_ref[0, 0], _TRANS_B, preferred_element_type=jnp.float32)
    ds = p * (dp - delta_ref[0, 0][:, :1]) * scale
    dk_sc[...] += jax.lax.dot_general(ds.astype(q.dtype), q, _TRANS_A,
                                      preferred_element_type=jnp.float32)

  @pl.when(i == pl.num_programs(3) - 1)
  def _finish():
    dk_ref[0, 0] = dk_sc[...]
    dv_ref[0, 0] = dv_sc[...]


@dataclasses.dataclass(frozen=True)
class _Plan:
  """Static shapes of one call (hashable: a custom_vjp static argument)."""
  batch: int
  heads: int
  length: int
  head_dim: int
  groups: int
  block_q: int
  block_k: int

  nq = property(lambda self: self.length // self.block_q)
  nk = property(lambda self: self.length // self.block_k)
  lanes = property(lambda self: math.gcd(128, self.block_k))
  scale = property(lambda self: self.head_dim ** -0.5)


def _side_vectors(iv, plan):
  """Lane-broadcast query-side (segment, horizon) and sublane-broadcast key-side segments."""
  b, length, lanes = plan.batch, plan.length, plan.lanes
  qseg = jnp.broadcast_to(iv.segment_ids[:, :, None], (b, length, lanes))
  qhor = jnp.broadcast_to(iv.horizons[:, :, None], (b, length, lanes))
  kseg = jnp.broadcast_to(iv.segment_ids[:, None, :], (b, _SUBLANES, length))
  return qseg, qhor, kseg


def _specs_q_major(plan, num_scalar_prefetch=2):
  """BlockSpecs for grid (b, h, query block i, key step j)."""
  bq, bk, d, g = plan.block_q, plan.block_k, plan.head_dim, plan.groups
  nq = plan.nq

  def kb(b, i, j, first, last):
    return _step_block(first[b * nq + i], last[b * nq + i], j)

  del num_scalar_prefetch
  q_spec = pl.BlockSpec((1, 1, bq, d), lambda b, h, i, j, f, l: (b, h, i, 0))
  kv_spec = pl.BlockSpec((1, 1, bk, d), lambda b, h, i, j, f, l: (b, h // g, kb(b, i, j, f, l), 0))
  row_spec = pl.BlockSpec((1, 1, bq, plan.lanes), lambda b, h, i, j, f, l: (b, h, i, 0))
  qvec_spec = pl.BlockSpec((1, bq, plan.lanes), lambda b, h, i, j, f, l: (b, i, 0))
  kseg_spec = pl.BlockSpec((1, _SUBLANES, bk), lambda b, h, i, j, f, l: (b, 0, kb(b, i, j, f, l)))
  return q_spec, kv_spec, row_spec, qvec_spec, kseg_spec


def _forward(q, k, v, iv, plan, interpret):
  first, last = iv_lib.block_ranges(iv.kv_lo, iv.kv_hi, plan.block_q, plan.block_k)
  q_spec, kv_spec, row_spec, qvec_spec, kseg_spec = _specs_q_major(plan)
  kernel = functools.partial(_fwd_kernel, scale=plan.scale, nq=plan.nq, lanes=plan.lanes)
  b, h, length = plan.batch, plan.heads, plan.length
  out, lse = pl.pallas_call(
      kernel,
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=2, grid=(b, h, plan.nq, plan.nk),
          in_specs=[q_spec, kv_spec, kv_spec, qvec_spec, qvec_spec, kseg_spec],
          out_specs=[q_spec, row_spec],
          scratch_shapes=[pltpu.VMEM((plan.block_q, plan.lanes), jnp.float32),
                          pltpu.VMEM((plan.block_q, plan.lanes), jnp.float32),
                          pltpu.VMEM((plan.block_q, plan.head_dim), jnp.float32)]),
      out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                 jax.ShapeDtypeStruct((b, h, length, plan.lanes), jnp.float32)],
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
      interpret=interpret,
  )(first.reshape(-1), last.reshape(-1), q, k, v, *_side_vectors(iv, plan))
  return out, lse


def _backward(q, k, v, iv, out, lse, dout, plan, interpret):
  b, h, length, d = q.shape
  qvecs = _side_vectors(iv, plan)
  delta = jnp.einsum("bhqd,bhqd->bhq", dout.astype(jnp.float32), out.astype(jnp.float32))
  delta = jnp.broadcast_to(delta[..., None], lse.shape)
  params = pltpu.CompilerParams(
      dimension_semantics=("parallel", "parallel", "parallel", "arbitrary"))

  # dQ: query-major, like the forward.
  first, last = iv_lib.block_ranges(iv.kv_lo, iv.kv_hi, plan.block_q, plan.block_k)
  q_spec, kv_spec, row_spec, qvec_spec, kseg_spec = _specs_q_major(plan)
  dq = pl.pallas_call(
      functools.partial(_dq_kernel, scale=plan.scale, nq=plan.nq, lanes=plan.lanes),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=2, grid=(b, h, plan.nq, plan.nk),
          in_specs=[q_spec, kv_spec, kv_spec, q_spec, row_spec, row_spec, qvec_spec, qvec_spec,
                    kseg_spec],
          out_specs=q_spec,
          scratch_shapes=[pltpu.VMEM((plan.block_q, d), jnp.float32)]),
      out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
      compiler_params=params, interpret=interpret,
  )(first.reshape(-1), last.reshape(-1), q, k, v, dout, lse, delta, *qvecs)

  # dK, dV: key-major; the inner steps walk the query blocks that may see the key block.
  first, last = iv_lib.block_ranges(iv.q_lo, iv.q_hi, plan.block_k, plan.block_q)
  bq, bk, g, nk, lanes = plan.block_q, plan.block_k, plan.groups, plan.nk, plan.lanes
  qb = lambda bi, j, i, f, l: _step_block(f[bi * nk + j], l[bi * nk + j], i)
  q_spec = pl.BlockSpec((1, 1, bq, d), lambda bi, hi, j, i, f, l: (bi, hi, qb(bi, j, i, f, l), 0))
  row_spec = pl.BlockSpec((1, 1, bq, lanes),
                          lambda bi, hi, j, i, f, l: (bi, hi, qb(bi, j, i, f, l), 0))
  qvec_spec = pl.BlockSpec((1, bq, lanes), lambda bi, hi, j, i, f, l: (bi, qb(bi, j, i, f, l), 0))
  kv_spec = pl.BlockSpec((1, 1, bk, d), lambda bi, hi, j, i, f, l: (bi, hi // g, j, 0))
  kseg_spec = pl.BlockSpec((1, _SUBLANES, bk), lambda bi, hi, j, i, f, l: (bi, 0, j))
  out_spec = pl.BlockSpec((1, 1, bk, d), lambda bi, hi, j, i, f, l: (bi, hi, j, 0))
  dk, dv = pl.pallas_call(
      functools.partial(_dkv_kernel, scale=plan.scale, nk=nk, lanes=lanes),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=2, grid=(b, h, nk, plan.nq),
          in_specs=[q_spec, kv_spec, kv_spec, q_spec, row_spec, row_spec, qvec_spec, qvec_spec,
                    kseg_spec],
          out_specs=[out_spec, out_spec],
          scratch_shapes=[pltpu.VMEM((bk, d), jnp.float32), pltpu.VMEM((bk, d), jnp.float32)]),
      out_shape=[jax.ShapeDtypeStruct((b, h, length, d), jnp.float32)] * 2,
      compiler_params=params, interpret=interpret,
  )(first.reshape(-1), last.reshape(-1), q, k, v, dout, lse, delta, *qvecs)
  per_group = lambda x: x.reshape(b, h // g, g, length, d).sum(2)  # GQA: sum the group's heads
  return dq, per_group(dk).astype(k.dtype), per_group(dv).astype(v.dtype)


_attention = flash_vjp.flash_vjp(_forward, _backward)


def check_blocks(block_q, block_k, *, interpret):
  """Raises ValueError (naming the setting) for block sizes the TPU kernel cannot tile."""
  if interpret:
    if block_q % 8 or block_k % 8:
      raise ValueError(f"pallas_tpu blocks must be multiples of 8, got block_q={block_q}, "
                       f"block_k={block_k}")
  elif block_q % 8 or block_k % 128:
    raise ValueError(f"pallas_tpu on TPU needs block_q % 8 == 0 and block_k % 128 == 0 "
                     f"(config.model.attention_block), got block_q={block_q}, block_k={block_k}")


def blocks(length, block_q, block_k, *, interpret=False):
  """The block sizes flash_attention runs with at `length`: clipped to L rounded up to 8, or
  to 128 for keys on TPU."""
  return (min(block_q, _round_up(length, 8)),
          min(block_k, _round_up(length, 8 if interpret else 128)))


def flash_attention(q, k, v, iv, *, block_q=512, block_k=512, interpret=False):
  """Masked flash attention.

  Args:
    q: [B, L, H, D]; k, v: [B, L, Hkv, D] (H a multiple of Hkv).
    iv: attention_intervals.Intervals (length L).
    block_q, block_k: block sizes; clipped to L rounded up (to 8, or 128 for keys on TPU);
      L is padded to a multiple of both.
    interpret: run the kernels in the Pallas interpreter (any backend).
  Returns:
    [B, L, H, D] in q's dtype; 0 at queries with no allowed key.
  """
  b, length, heads, d = q.shape
  block_q, block_k = blocks(length, block_q, block_k, interpret=interpret)
  check_blocks(block_q, block_k, interpret=interpret)
  padded = _round_up(length, math.lcm(block_q, block_k))
  pad = lambda x: jnp.swapaxes(
      jnp.pad(x, ((0, 0), (0, padded - length), (0, 0), (0, 0))), 1, 2)
  plan = _Plan(b, heads, padded, d, heads // k.shape[2], block_q, block_k)
  out = _attention(pad(q), pad(k), pad(v), iv_lib.pad_to(iv, padded), plan, interpret)
  return jnp.swapaxes(out, 1, 2)[:, :length]
