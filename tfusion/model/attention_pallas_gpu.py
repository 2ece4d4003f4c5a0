"""Pallas GPU (Triton) flash attention for the Transfusion mask, forward and backward.

One program per (query block, batch row, query head) for the forward and dQ kernels, per
(key block, batch row, query head) for the dK/dV kernel. Each program reads the range of blocks
on the other side that its block's intervals can reach (attention_intervals.block_ranges, one
int32 pair per row and block) and runs a `fori_loop` over exactly that range: fully masked
blocks are never loaded or computed, forward and backward, and a block of padding runs zero
iterations. Inside a visited block the rule is applied element-wise from segment ids and
horizons, `seg[q] == seg[k] != 0 and k <= horizon[q]`, as in the reference.

Layout: q, dO [B, L, H, D] and k, v [B, L, Hkv, D] as the model holds them (no transposes);
GQA by index map (query head h reads key/value head h // groups). The program's own block comes
in through its BlockSpec; the other side's rows (keys for the forward and dQ, queries for
dK/dV) come in whole and are sliced with `pl.ds` inside the loop. The forward saves the
log-sum-exp [B, H, L] (fp32); the backward recomputes the probabilities from it (custom VJP).
dK/dV are produced per query head in fp32 and summed over each group outside the kernel.
Queries with no allowed key (padding) output 0 and pass no gradient.

`interpret=True` runs the same kernels in the Pallas interpreter on any backend (tests).
Triton needs power-of-two tile shapes and dot operands of at least 16 per side, so on a GPU
block sizes and head_dim must be powers of two >= 16 (ValueError otherwise).
"""

import dataclasses
import functools

import jax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu
import jax.numpy as jnp

from tfusion.model import attention_intervals as iv_lib
from tfusion.model import flash_vjp

_NEG = -1e30  # finite "minus infinity", as in the other kernels
# Largest blocks used on a GPU (config.model.attention_block is capped to these): a program
# keeps its tiles in registers / shared memory, 512 (the TPU default) would spill.
MAX_BLOCK_Q = 128
MAX_BLOCK_K = 64
MAX_BWD_BLOCK = 64
MIN_TRITON_DIM = 16  # tl.dot needs M, N, K >= 16


def _is_pow2(x):
  return x > 0 and x & (x - 1) == 0


def _next_pow2(x):
  return 1 << max(0, (x - 1).bit_length())


def fits(head_dim):
  """True where the GPU kernel supports the head size (what `auto` checks)."""
  return _is_pow2(head_dim) and MIN_TRITON_DIM <= head_dim <= 256


def _block_mask(qseg, qhor, kseg, k_start):
  """qseg, qhor [bq], kseg [bk] -> bool [bq, bk] (the rule)."""
  k_pos = k_start + jnp.arange(kseg.shape[0], dtype=jnp.int32)
  return ((qseg[:, None] == kseg[None, :]) & (qseg != 0)[:, None]
          & (k_pos[None, :] <= qhor[:, None]))


def _fwd_kernel(first_ref, last_ref, q_ref, k_ref, v_ref, qseg_ref, qhor_ref, kseg_ref,
                o_ref, lse_ref, *, scale, block_k):
  q = q_ref[...]  # [bq, D]
  qseg, qhor = qseg_ref[...], qhor_ref[...]
  block_q, head_dim = q.shape

  def body(kb, carry):
    m_prev, l_prev, acc = carry
    k0 = pl.multiple_of(kb * block_k, block_k)
    ks = pl.ds(k0, block_k)
    k, v = k_ref[ks, :], v_ref[ks, :]
    s = plgpu.dot(q, k, trans_b=True) * scale  # fp32 [bq, bk]
    allowed = _block_mask(qseg, qhor, kseg_ref[ks], k0)
    s = jnp.where(allowed, s, _NEG)
    m_new = jnp.maximum(m_prev, s.max(axis=1))
    p = jnp.where(allowed, jnp.exp(s - m_new[:, None]), 0.0)
    corr = jnp.exp(m_prev - m_new)
    l_new = l_prev * corr + p.sum(axis=1)
    acc = acc * corr[:, None] + plgpu.dot(p.astype(v.dtype), v)
    return m_new, l_new, acc

  init = (jnp.full((block_q,), _NEG, jnp.float32), jnp.zeros((block_q,), jnp.float32),
          jnp.zeros((block_q, head_dim), jnp.float32))
  m, l, acc = jax.lax.fori_loop(first_ref[0], last_ref[0] + 1, body, init)
  seen = l > 0
  l_safe = jnp.where(seen, l, 1.0)
  o_ref[...] = (acc / l_safe[:, None]).astype(o_ref.dtype)
  lse_ref[...] = jnp.where(seen, m + jnp.log(l_safe), 0.0)


def _dq_kernel(first_ref, last_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, qseg_ref,
               qhor_ref, kseg_ref, dq_ref, *, scale, block_k):
  q, do = q_ref[...], do_ref[...]
  lse, delta = lse_ref[...], delta_ref[...]
  qseg, qhor = qseg_ref[...], qhor_ref[...]

  def body(kb, dq):
    k0 = pl.multiple_of(kb * block_k, block_k)
    ks = pl.ds(k0, block_k)
    k, v = k_ref[ks, :], v_ref[ks, :]
    s = plgpu.dot(q, k, trans_b=True) * scale
    allowed = _block_mask(qseg, qhor, kseg_ref[ks], k0)
    p = jnp.where(allowed, jnp.exp(s - lse[:, None]), 0.0)
    dp = plgpu.dot(do, v, trans_b=True)
    ds = p * (dp - delta[:, None]) * scale
    return dq + plgpu.dot(ds.astype(k.dtype), k)

  dq = jax.lax.fori_loop(first_ref[0], last_ref[0] + 1, body,
                         jnp.zeros(q.shape, jnp.float32))
  dq_ref[...] = dq.astype(dq_ref.dtype)


def _dkv_kernel(first_ref, last_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, qseg_ref,
                qhor_ref, kseg_ref, dk_ref, dv_ref, *, scale, block_q):
  k, v = k_ref[...], v_ref[...]  # [bk, D]
  kseg = kseg_ref[...]
  block_k = k.shape[0]
  k0 = pl.program_id(0) * block_k

  def body(qb, carry):
    dk, dv = carry
    q0 = pl.multiple_of(qb * block_q, block_q)
    qs = pl.ds(q0, block_q)
    q, do = q_ref[qs, :], do_ref[qs, :]
    s = plgpu.dot(q, k, trans_b=True) * scale  # [bq, bk]
    allowed = _block_mask(qseg_ref[qs], qhor_ref[qs], kseg, k0)
    p = jnp.where(allowed, jnp.exp(s - lse_ref[qs][:, None]), 0.0)
    dv = dv + plgpu.dot(p.astype(do.dtype), do, trans_a=True)
    dp = plgpu.dot(do, v, trans_b=True)
    ds = p * (dp - delta_ref[qs][:, None]) * scale
    dk = dk + plgpu.dot(ds.astype(q.dtype), q, trans_a=True)
    return dk, dv

  zeros = jnp.zeros(k.shape, jnp.float32)
  dk, dv = jax.lax.fori_loop(first_ref[0], last_ref[0] + 1, body, (zeros, zeros))
  dk_ref[...] = dk
  dv_ref[...] = dv


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
  bwd_block_q: int
  bwd_block_k: int

  scale = property(lambda self: self.head_dim ** -0.5)

  def compiler_params(self, block_a, block_b):
    warps = 4 if self.head_dim <= 64 and block_a * block_b <= 128 * 64 else 8
    return plgpu.CompilerParams(num_warps=warps, num_stages=2)


def _own(block, d=None):
  """BlockSpecs of the program's own block: grid (i, b, h), rows i*block..(i+1)*block."""
  if d is None:  # per-row vector [B, L]
    return pl.BlockSpec((None, block), lambda i, b, h: (b, i))
  return pl.BlockSpec((None, block, None, d), lambda i, b, h: (b, i, h, 0))


_RANGE_SPEC = pl.BlockSpec((None, 1), lambda i, b, h: (b, i))  # one int32 per row and block


def block_ranges(iv, plan):
  """The block ranges each kernel loops over, (first, last) int32 [B, n_blocks] per kernel.

  fwd, dq: per query block of the kernel, the key blocks; dkv: per key block, the query blocks.
  A program runs blocks first..last (none where first > last).
  """
  return dict(
      fwd=iv_lib.block_ranges(iv.kv_lo, iv.kv_hi, plan.block_q, plan.block_k),
      dq=iv_lib.block_ranges(iv.kv_lo, iv.kv_hi, plan.bwd_block_q, plan.bwd_block_k),
      dkv=iv_lib.block_ranges(iv.q_lo, iv.q_hi, plan.bwd_block_k, plan.bwd_block_q))


def _forward(q, k, v, iv, plan, interpret):
  b, length, h, d = q.shape
  bq, bk, g = plan.block_q, plan.block_k, plan.groups
  first, last = block_ranges(iv, plan)["fwd"]
  kv_spec = pl.BlockSpec((None, length, None, d), lambda i, bi, hi: (bi, 0, hi // g, 0))
  row_spec = pl.BlockSpec((None, length), lambda i, bi, hi: (bi, 0))
  out, lse = pl.pallas_call(
      functools.partial(_fwd_kernel, scale=plan.scale, block_k=bk),
      grid=(length // bq, b, h),
      in_specs=[_RANGE_SPEC, _RANGE_SPEC, _own(bq, d), kv_spec, kv_spec, _own(bq), _own(bq),
                row_spec],
      out_specs=[_own(bq, d), pl.BlockSpec((None, None, bq), lambda i, bi, hi: (bi, hi, i))],
      out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                 jax.ShapeDtypeStruct((b, h, length), jnp.float32)],
      compiler_params=plan.compiler_params(bq, bk), interpret=interpret,
      name="tfusion_flash_fwd",
  )(first, last, q, k, v, iv.segment_ids, iv.horizons, iv.segment_ids)
  return out, lse


def _backward(q, k, v, iv, out, lse, dout, plan, interpret):
  b, length, h, d = q.shape
  bq, bk, g = plan.bwd_block_q, plan.bwd_block_k, plan.groups
  delta = jnp.einsum("bqhd,bqhd->bhq", dout.astype(jnp.float32), out.astype(jnp.float32))
  row_spec = pl.BlockSpec((None, length), lambda i, bi, hi: (bi, 0))

  # dQ: one program per query block, looping over the key blocks it can see.
  ranges = block_ranges(iv, plan)
  first, last = ranges["dq"]
  kv_spec = pl.BlockSpec((None, length, None, d), lambda i, bi, hi: (bi, 0, hi // g, 0))
  lse_spec = pl.BlockSpec((None, None, bq), lambda i, bi, hi: (bi, hi, i))
  dq = pl.pallas_call(
      functools.partial(_dq_kernel, scale=plan.scale, block_k=bk),
      grid=(length // bq, b, h),
      in_specs=[_RANGE_SPEC, _RANGE_SPEC, _own(bq, d), kv_spec, kv_spec, _own(bq, d), lse_spec,
                lse_spec, _own(bq), _own(bq), row_spec],
      out_specs=_own(bq, d),
      out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
      compiler_params=plan.compiler_params(bq, bk), interpret=interpret,
      name="tfusion_flash_dq",
  )(first, last, q, k, v, dout, lse, delta, iv.segment_ids, iv.horizons, iv.segment_ids)

  # dK, dV: one program per key block and query head, looping over the query blocks that may
  # see the key block.
  first, last = ranges["dkv"]
  kv_spec = pl.BlockSpec((None, bk, None, d), lambda j, bi, hi: (bi, j, hi // g, 0))
  q_spec = pl.BlockSpec((None, length, None, d), lambda j, bi, hi: (bi, 0, hi, 0))
  lse_spec = pl.BlockSpec((None, None, length), lambda j, bi, hi: (bi, hi, 0))
  dk, dv = pl.pallas_call(
      functools.partial(_dkv_kernel, scale=plan.scale, block_q=bq),
      grid=(length // bk, b, h),
      in_specs=[_RANGE_SPEC, _RANGE_SPEC, q_spec, kv_spec, kv_spec, q_spec, lse_spec, lse_spec,
                row_spec, row_spec, _own(bk)],
      out_specs=[_own(bk, d)] * 2,
      out_shape=[jax.ShapeDtypeStruct(q.shape, jnp.float32)] * 2,
      compiler_params=plan.compiler_params(bq, bk), interpret=interpret,
      name="tfusion_flash_dkv",
  )(first, last, q, k, v, dout, lse, delta, iv.segment_ids, iv.horizons, iv.segment_ids)
  per_group = lambda x: x.reshape(b, length, h // g, g, d).sum(3)  # GQA: sum the group's heads
  return dq, per_group(dk).astype(k.dtype), per_group(dv).astype(v.dtype)


_attention = flash_vjp.flash_vjp(_forward, _backward)


def check_shapes(head_dim, blocks, *, interpret):
  """Raises ValueError (naming the setting) for shapes the Triton kernel cannot tile."""
  names = "block_q, block_k, bwd_block_q, bwd_block_k"
  if not all(map(_is_pow2, blocks)):
    raise ValueError(f"pallas_gpu blocks must be powers of two (config.model.attention_block), "
                     f"got {names} = {blocks}")
  if interpret:
    return
  if min(blocks) < MIN_TRITON_DIM:
    raise ValueError(f"pallas_gpu on GPU needs blocks >= {MIN_TRITON_DIM} "
                     f"(config.model.attention_block), got {names} = {blocks}")
  if not fits(head_dim):
    raise ValueError(f"pallas_gpu on GPU needs head_dim a power of two in "
                     f"[{MIN_TRITON_DIM}, 256], got {head_dim}; use attention_impl='chunked'")


def make_plan(q_shape, kv_heads, *, block_q=MAX_BLOCK_Q, block_k=MAX_BLOCK_K, bwd_block_q=None,
              bwd_block_k=None, interpret=False):
  """The static plan of `flash_attention` (block sizes after clipping, padded length)."""
  b, length, heads, d = q_shape
  cap = max(_next_pow2(length), 8 if interpret else MIN_TRITON_DIM)
  if d > 128:
    block_q = min(block_q, 64)
  bwd_block_q = min(block_q, MAX_BWD_BLOCK) if bwd_block_q is None else bwd_block_q
  bwd_block_k = min(block_k, MAX_BWD_BLOCK) if bwd_block_k is None else bwd_block_k
  blocks = tuple(min(x, cap) for x in (block_q, block_k, bwd_block_q, bwd_block_k))
  check_shapes(d, blocks, interpret=interpret)
  padded = -(-length // max(blocks)) * max(blocks)  # powers of two: the max is the lcm
  return _Plan(b, heads, padded, d, heads // kv_heads, *blocks)


def flash_attention(q, k, v, iv, *, block_q=MAX_BLOCK_Q, block_k=MAX_BLOCK_K, bwd_block_q=None,
                    bwd_block_k=None, interpret=False):
  """Masked flash attention (Pallas Triton).

  Args:
    q: [B, L, H, D]; k, v: [B, L, Hkv, D] (H a multiple of Hkv).
    iv: attention_intervals.Intervals (length L).
    block_q, block_k: forward block sizes (powers of two); clipped to L rounded up to a power
      of two (at least 16 on a GPU), block_q to 64 when D > 128.
    bwd_block_q, bwd_block_k: dQ / dK-dV block sizes; default min(forward block, 64).
      L is padded to a multiple of every block.
    interpret: run the kernels in the Pallas interpreter (any backend).
  Returns:
    [B, L, H, D] in q's dtype; 0 at queries with no allowed key.
  """
  length = q.shape[1]
  plan = make_plan(q.shape, k.shape[2], block_q=block_q, block_k=block_k,
                   bwd_block_q=bwd_block_q, bwd_block_k=bwd_block_k, interpret=interpret)
  pad = lambda x: jnp.pad(x, ((0, 0), (0, plan.length - length), (0, 0), (0, 0)))
  out = _attention(pad(q), pad(k), pad(v), iv_lib.pad_to(iv, plan.length), plan, interpret)
  return out[:, :length]
