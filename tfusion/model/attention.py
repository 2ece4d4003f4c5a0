"""The Transfusion attention rule and the attention computation.

The rule (DESIGN.md), for query q and key k of one packed row:

    allowed(q, k) = segment[q] == segment[k] != 0  and  k <= horizon[q]

with horizon[q] = q for text and the last position of q's own image for an image patch
(bidirectional inside an image). With intra_image="causal" the horizon of a patch is the
patch itself (the paper's ablation). `attention_mask` is the one reference definition; any
faster kernel must agree with it.
"""

import jax
import jax.numpy as jnp

from tfusion.model import layout

INTRA_IMAGE_CHOICES = ("bidirectional", "causal")


def horizons(image_index, *, intra_image="bidirectional"):
  """The last key position each query may see (before the segment check).

  Args:
    image_index: int [B, L], image slot per position, -1 where no image.
    intra_image: "bidirectional" (paper) or "causal" (ablation).
  Returns:
    int [B, L].
  """
  if intra_image not in INTRA_IMAGE_CHOICES:
    raise ValueError(
        f"intra_image must be one of {INTRA_IMAGE_CHOICES}, got {intra_image!r}")
  if intra_image == "causal":
    return jnp.broadcast_to(
        jnp.arange(image_index.shape[1], dtype=jnp.int32)[None], image_index.shape)
  return layout.span_ends(image_index)


def mask_from_horizons(q_segment_ids, q_horizons, k_segment_ids):
  """Applies the attention rule to query rows against all key positions.

  Args:
    q_segment_ids: int [B, Lq], segment of each query.
    q_horizons: int [B, Lq], last key position each query may see.
    k_segment_ids: int [B, Lk], segment of each key (keys are positions 0..Lk-1).
  Returns:
    bool [B, Lq, Lk], True where the query may attend to the key.
  """
  k_pos = jnp.arange(k_segment_ids.shape[1], dtype=jnp.int32)
  same_doc = q_segment_ids[:, :, None] == k_segment_ids[:, None, :]
  not_pad = (q_segment_ids != 0)[:, :, None]
  visible = k_pos[None, None, :] <= q_horizons[:, :, None]
  return same_doc & not_pad & visible


def attention_mask(segment_ids, image_index, *, intra_image="bidirectional"):
  """The paper's attention mask for packed rows.

  Args:
    segment_ids: int [B, L], 1.. document index inside the row, 0 = padding.
    image_index: int [B, L], image slot per position, -1 where no image.
    intra_image: "bidirectional" (paper) or "causal" (ablation).
  Returns:
    bool [B, L, L], True where query q may attend to key k.
  """
  hor = horizons(image_index, intra_image=intra_image)
  return mask_from_horizons(segment_ids, hor, segment_ids)


def query_rows_mask(segment_ids, image_index, q_start, q_len, *, intra_image="bidirectional"):
  """Rows [q_start, q_start + q_len) of `attention_mask`, for decoding with a KV cache.

  Args:
    segment_ids, image_index: int [B, L] layout of the whole (cache-sized) row.
    q_start: int scalar (may be traced), first query position.
    q_len: static int, number of query positions.
  Returns:
    bool [B, q_len, L].
  """
  hor = horizons(image_index, intra_image=intra_image)
  q_seg = jax.lax.dynamic_slice_in_dim(segment_ids, q_start, q_len, axis=1)
  q_hor = jax.lax.dynamic_slice_in_dim(hor, q_start, q_len, axis=1)
  return mask_from_horizons(q_seg, q_hor, segment_ids)


def dot_product_attention(q, k, v, mask, *, implementation="dense"):
  """Multi-head attention with grouped key/value heads.

  Args:
    q: [B, Lq, H, D] queries.
    k, v: [B, Lk, Hkv, D] keys and values; H must be a multiple of Hkv.
    mask: bool [B, Lq, Lk], True where attention is allowed.
    implementation: "dense" (reference einsum, softmax in float32) or "jax"
      (`jax.nn.dot_product_attention`, which picks cuDNN on GPUs when it can).
  Returns:
    [B, Lq, H, D] in q's dtype. Queries with no allowed key (padding) get finite garbage.
  """
  batch, q_len, heads, head_dim = q.shape
  kv_heads = k.shape[2]
  if heads % kv_heads:
    raise ValueError(f"num_heads={heads} is not a multiple of num_kv_heads={kv_heads}")
  if implementation == "jax":
    return jax.nn.dot_product_attention(q, k, v, mask=mask[:, None, :, :])
  if implementation != "dense":
    raise ValueError(f"unknown attention implementation {implementation!r} (dense | jax)")
  groups = heads // kv_heads
  qg = q.reshape(batch, q_len, kv_heads, groups, head_dim)
  scores = jnp.einsum("bqhgd,bkhd->bhgqk", qg, k, preferred_element_type=jnp.float32)
  scores = scores * (head_dim ** -0.5)
  scores = jnp.where(mask[:, None, None, :, :], scores, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
  out = jnp.einsum("bhgqk,bkhd->bqhgd", probs, v)
  return out.reshape(batch, q_len, heads, head_dim)
