"""Next-token cross-entropy that never holds the [B, L, V] float32 logits.

The LM head and the softmax run over chunks of `chunk_size` positions in a `lax.scan`; each
chunk is wrapped in `jax.checkpoint`, so the backward recomputes that chunk's logits instead of
keeping them. Peak extra memory is one chunk's logits, B * chunk_size * V * 4 bytes (plus its
gradient), instead of B * L * V * 4 (~0.5 GiB per 4096-row at V = 32k) and the same again for
the softmax and the label one-hot.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp


def chunked_cross_entropy(hidden, head, targets, *, chunk_size, dtype=jnp.float32,
                          return_lse=False):
  """Per-position CE of `softmax(hidden @ head)` against `targets`, chunk by chunk.

  Args:
    hidden: [B, L, d] final (normed) hidden states.
    head: [d, V] output projection (lm_head kernel, or the embedding table transposed).
    targets: int [B, L] labels.
    chunk_size: positions per chunk; L is padded up to a multiple of it.
    dtype: matmul dtype (the model's compute dtype); logits are cast to float32 after it,
      as the dense path does.
    return_lse: also return logsumexp(logits) per position (the z-loss's input).
  Returns:
    float32 [B, L] cross-entropy per position (mask it yourself); with return_lse a pair
    (cross-entropy, logsumexp), both [B, L].
  """
  b, length, d = hidden.shape
  n = -(-length // chunk_size)
  pad = n * chunk_size - length
  if pad:
    hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
    targets = jnp.pad(targets, ((0, 0), (0, pad)))
  hs = hidden.reshape(b, n, chunk_size, d).swapaxes(0, 1)  # [n, B, C, d]
  ts = targets.reshape(b, n, chunk_size).swapaxes(0, 1)  # [n, B, C]

  @jax.checkpoint  # the backward recomputes this chunk's logits rather than storing them
  def chunk_ce(h, t, w):
    logits = jnp.einsum("bcd,dv->bcv", h.astype(dtype), w.astype(dtype)).astype(jnp.float32)
    logits = nn.with_logical_constraint(logits, ("batch", "length", "vocab"))
    label = jnp.take_along_axis(logits, t[..., None], axis=-1)[..., 0]
    lse = jax.nn.logsumexp(logits, axis=-1)
    return jnp.stack([lse - label, lse]) if return_lse else lse - label

  def body(carry, xs):
    return carry, chunk_ce(*xs, head)

  _, ce = jax.lax.scan(body, None, (hs, ts))
  if return_lse:  # [n, 2, B, C]
    both = ce.transpose(1, 2, 0, 3).reshape(2, b, n * chunk_size)[:, :, :length]
    return both[0], both[1]
  return ce.swapaxes(0, 1).reshape(b, n * chunk_size)[:, :length]
