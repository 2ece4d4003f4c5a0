"""Query- and key-chunked attention in plain XLA (flash-style), for any backend.

Forward: for each query block (lax.map), an online softmax over the key blocks that the
block's intervals can reach (a fori_loop whose bounds come from `Intervals`: fully masked key
blocks are never visited). Backward (custom VJP, recomputation): one scan over key blocks;
for each, a loop over the query blocks that may see it, accumulating dK, dV locally and dQ in
an fp32 buffer. Live memory is O(B * H * block_q * block_k) for the scores plus O(B * L * H)
for the saved log-sum-exp, instead of the dense kernel's fp32 [B, H, L, L].

Inside a visited block the rule is applied element-wise from (segment_ids, horizons), so the
result is the reference mask's. Queries with no allowed key (padding) output 0 and pass no
gradient (the dense reference leaves them unspecified).

The loop bounds are the union over the batch rows of each block's range (rows are computed
together); under data sharding that is one small all-reduce of int32 [n_blocks].
"""

import math

import jax
import jax.numpy as jnp

from tfusion.model import attention_intervals as iv_lib
from tfusion.model import flash_vjp

_NEG = -1e30  # finite "minus infinity": exp(_NEG - _NEG) = 1 never produces NaN


def _round_up(x, m):
  return -(-x // m) * m


def _block_mask(seg_q, hor_q, seg_k, k_start):
  """Rule for one block: seg_q, hor_q [B, bq], seg_k [B, bk] -> bool [B, 1, 1, bq, bk]."""
  k_pos = k_start + jnp.arange(seg_k.shape[1], dtype=jnp.int32)
  ok = ((seg_q[:, :, None] == seg_k[:, None, :]) & (seg_q != 0)[:, :, None]
        & (k_pos[None, None, :] <= hor_q[:, :, None]))
  return ok[:, None, None]


def _slice(x, start, size, axis=1):
  return jax.lax.dynamic_slice_in_dim(x, start, size, axis=axis)


def _scores(qc, kc, scale):
  """qc [B, bq, Hkv, G, D], kc [B, bk, Hkv, D] -> fp32 [B, Hkv, G, bq, bk]."""
  return jnp.einsum("bqhgd,bkhd->bhgqk", qc, kc, preferred_element_type=jnp.float32) * scale


def _forward(q, k, v, iv, block_q, block_k):
  """Padded inputs (L a multiple of both blocks). -> (out [B, L, Hkv, G, D], lse [B, Hkv, G, L])."""
  b, length, kv_heads, groups, d = q.shape
  scale = d ** -0.5
  nq = length // block_q
  first, last = iv_lib.block_ranges(iv.kv_lo, iv.kv_hi, block_q, block_k)
  first, last = first.min(0), last.max(0)  # union over rows: [nq]

  def q_block(i):
    q0 = i * block_q
    qc = _slice(q, q0, block_q)
    seg_q, hor_q = _slice(iv.segment_ids, q0, block_q), _slice(iv.horizons, q0, block_q)

    def body(j, carry):
      m, l, acc = carry
      k0 = j * block_k
      kc, vc = _slice(k, k0, block_k), _slice(v, k0, block_k)
      allowed = _block_mask(seg_q, hor_q, _slice(iv.segment_ids, k0, block_k), k0)
      s = jnp.where(allowed, _scores(qc, kc, scale), _NEG)
      m_new = jnp.maximum(m, s.max(-1))
      p = jnp.where(allowed, jnp.exp(s - m_new[..., None]), 0.0)
      corr = jnp.exp(m - m_new)
      l = l * corr + p.sum(-1)
      pv = jnp.einsum("bhgqk,bkhd->bhgqd", p.astype(v.dtype), vc,
                      preferred_element_type=jnp.float32)
      return m_new, l, acc * corr[..., None] + pv

    init = (jnp.full((b, kv_heads, groups, block_q), _NEG, jnp.float32),
            jnp.zeros((b, kv_heads, groups, block_q), jnp.float32),
            jnp.zeros((b, kv_heads, groups, block_q, d), jnp.float32))
    m, l, acc = jax.lax.fori_loop(first[i], last[i] + 1, body, init)
    seen = l > 0
    out = acc / jnp.where(seen, l, 1.0)[..., None]
    lse = jnp.where(seen, m + jnp.log(jnp.where(seen, l, 1.0)), 0.0)
    return out.astype(q.dtype), lse

  out, lse = jax.lax.map(q_block, jnp.arange(nq))  # [nq, B, Hkv, G, bq, (D)]
  out = jnp.moveaxis(out, 0, 3).reshape(b, kv_heads, groups, length, d)
  out = jnp.transpose(out, (0, 3, 1, 2, 4))
  lse = jnp.moveaxis(lse, 0, 3).reshape(b, kv_heads, groups, length)
  return out, lse


def _backward(q, k, v, iv, out, lse, dout, block_q, block_k):
  """Gradients w.r.t. padded q [B, L, Hkv, G, D], k, v [B, L, Hkv, D]."""
  b, length, kv_heads, groups, d = q.shape
  scale = d ** -0.5
  nk = length // block_k
  first, last = iv_lib.block_ranges(iv.q_lo, iv.q_hi, block_k, block_q)
  first, last = first.min(0), last.max(0)  # [nk]
  # delta_q = sum_d dO * O: the softmax backward's row term.
  delta = jnp.einsum("bqhgd,bqhgd->bhgq", dout.astype(jnp.float32), out.astype(jnp.float32))

  def k_block(dq, j):
    k0 = j * block_k
    kc, vc = _slice(k, k0, block_k), _slice(v, k0, block_k)
    seg_k = _slice(iv.segment_ids, k0, block_k)

    def body(i, carry):
      dk, dv, dq = carry
      q0 = i * block_q
      qc, doc = _slice(q, q0, block_q), _slice(dout, q0, block_q)
      allowed = _block_mask(_slice(iv.segment_ids, q0, block_q),
                            _slice(iv.horizons, q0, block_q), seg_k, k0)
      s = _scores(qc, kc, scale)
      p = jnp.where(allowed, jnp.exp(s - _slice(lse, q0, block_q, 3)[..., None]), 0.0)
      dv = dv + jnp.einsum("bhgqk,bqhgd->bkhd", p.astype(doc.dtype), doc,
                           preferred_element_type=jnp.float32)
      dp = jnp.einsum("bqhgd,bkhd->bhgqk", doc, vc, preferred_element_type=jnp.float32)
      ds = p * (dp - _slice(delta, q0, block_q, 3)[..., None]) * scale
      dk = dk + jnp.einsum("bhgqk,bqhgd->bkhd", ds.astype(qc.dtype), qc,
                           preferred_element_type=jnp.float32)
      dq_c = jnp.einsum("bhgqk,bkhd->bqhgd", ds.astype(kc.dtype), kc,
                        preferred_element_type=jnp.float32)
      dq = jax.lax.dynamic_update_slice_in_dim(dq, _slice(dq, q0, block_q) + dq_c, q0, 1)
      return dk, dv, dq

    zeros = jnp.zeros((b, block_k, kv_heads, d), jnp.float32)
    dk, dv, dq = jax.lax.fori_loop(first[j], last[j] + 1, body, (zeros, zeros, dq))
    return dq, (dk, dv)

  dq, (dk, dv) = jax.lax.scan(k_block, jnp.zeros(q.shape, jnp.float32), jnp.arange(nk))
  unblock = lambda x: jnp.moveaxis(x, 0, 1).reshape(b, length, kv_heads, d)
  return dq.astype(q.dtype), unblock(dk).astype(k.dtype), unblock(dv).astype(v.dtype)


_attention = flash_vjp.flash_vjp(_forward, _backward)


def blocks(length, block_q, block_k):
  """The block sizes chunked_attention runs with at `length`: clipped to L rounded up to 8."""
  return min(block_q, _round_up(length, 8)), min(block_k, _round_up(length, 8))


def chunked_attention(q, k, v, iv, *, block_q=512, block_k=512):
  """Masked attention by blocks.

  Args:
    q: [B, L, H, D]; k, v: [B, L, Hkv, D] (H a multiple of Hkv).
    iv: attention_intervals.Intervals of the rows (length L).
    block_q, block_k: block sizes (clipped to L rounded up to 8; L is padded to a multiple).
  Returns:
    [B, L, H, D] in q's dtype; 0 at queries with no allowed key.
  """
  b, length, heads, d = q.shape
  kv_heads = k.shape[2]
  block_q, block_k = blocks(length, block_q, block_k)
  padded = _round_up(length, math.lcm(block_q, block_k))
  extra = padded - length
  pad = lambda x: jnp.pad(x, ((0, 0), (0, extra)) + ((0, 0),) * (x.ndim - 2))
  qg = pad(q).reshape(b, padded, kv_heads, heads // kv_heads, d)
  out = _attention(qg, pad(k), pad(v), iv_lib.pad_to(iv, padded), block_q, block_k)
  return out.reshape(b, padded, heads, d)[:, :length]

