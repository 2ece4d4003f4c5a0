"""The custom VJP shared by every flash-style attention (chunked, pallas_tpu, pallas_gpu).

A flash forward returns the output and the per-query log-sum-exp; the backward recomputes the
probabilities from (q, k, lse) block by block instead of storing [L, L] scores. Only these
residuals are kept: q, k, v, the intervals, the output and the lse, O(L) per head.
"""

import functools

import jax


def flash_vjp(forward, backward):
  """Wraps a kernel pair as attention(q, k, v, iv, *static) with a memory-lean custom VJP.

  Args:
    forward: (q, k, v, iv, s1, s2) -> (out, lse); q [B, ...], out like q.
    backward: (q, k, v, iv, out, lse, dout, s1, s2) -> (dq, dk, dv), each like its input.
      s1, s2 are the two static (hashable) settings of the implementation (a block plan and the
      interpret flag, or block_q and block_k).
  Returns:
    attention(q, k, v, iv, s1, s2) -> out, differentiable in q, k, v (iv gets no cotangent).
  """

  @functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
  def attention(q, k, v, iv, s1, s2):
    return forward(q, k, v, iv, s1, s2)[0]

  def attention_fwd(q, k, v, iv, s1, s2):
    out, lse = forward(q, k, v, iv, s1, s2)
    return out, (q, k, v, iv, out, lse)

  def attention_bwd(s1, s2, residuals, dout):
    q, k, v, iv, out, lse = residuals
    dq, dk, dv = backward(q, k, v, iv, out, lse, dout, s1, s2)
    return dq, dk, dv, None

  attention.defvjp(attention_fwd, attention_bwd)
  return attention
