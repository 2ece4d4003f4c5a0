"""The Transfusion attention rule and the attention computation.

The rule (DESIGN.md), for query q and key k of one packed row:

    allowed(q, k) = segment[q] == segment[k] != 0  and  k <= horizon[q]

with horizon[q] = q for text and the last position of q's own image for an image patch
(bidirectional inside an image). With intra_image="causal" the horizon of a patch is the
patch itself (the paper's ablation). `attention_mask` is the one reference definition; any
faster kernel must agree with it.

Kernels never take that dense mask: the model hands them `Intervals`
(tfusion/model/attention_intervals.py: segment_ids + horizons, plus per-query and per-key
interval bounds used to skip fully masked blocks). `dot_product_attention` dispatches on
`config.model.attention_impl`:
  dense       the reference (fp32 [B, H, L, L] scores; builds the mask from the intervals);
  chunked     plain XLA, query/key-blocked online softmax with a recomputing custom VJP,
              O(L * block) memory on any backend (attention_chunked.py);
  pallas_tpu  Pallas TPU flash kernel with scalar-prefetched block ranges (attention_pallas_tpu.py);
  pallas_gpu  Pallas Triton flash kernel, per-block loops over the live block range
              (attention_pallas_gpu.py; blocks capped at 128 queries x 64 keys forward, 64 x 64
              backward);
  auto        pallas_tpu on TPU when head_dim % 128 == 0, pallas_gpu on GPU when head_dim is a
              power of two in [16, 256], chunked otherwise;
  jax         deprecated alias of auto (jax.nn.dot_product_attention with an arbitrary mask
              ran the dense XLA path; it never picked cuDNN for this mask).
A dense bool mask (the KV-cache decode path: query rows [B, q_len, Lc]) always runs the
dense reference.
"""

import contextlib
import contextvars
import functools
import logging

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec

from tfusion.model import attention_intervals as iv_lib
from tfusion.model import layout

INTRA_IMAGE_CHOICES = ("bidirectional", "causal")
IMPLEMENTATIONS = ("dense", "chunked", "pallas_tpu", "pallas_gpu", "auto", "jax")
DEFAULT_BLOCK = 512
Intervals = iv_lib.Intervals


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


def intervals(segment_ids, image_index, *, intra_image="bidirectional"):
  """The mask of `attention_mask` as `Intervals` (what the model passes to attention).

  Args:
    segment_ids, image_index: int [B, L] per the batch contract.
    intra_image: "bidirectional" (paper) or "causal" (ablation).
  Returns:
    attention_intervals.Intervals, fields int32 [B, L].
  """
  hor = horizons(image_index, intra_image=intra_image)
  if intra_image == "causal":
    first_viewer = jnp.broadcast_to(
        jnp.arange(image_index.shape[1], dtype=jnp.int32)[None], image_index.shape)
  else:
    first_viewer = layout.span_starts(image_index)  # the whole image sees each patch
  return iv_lib.build(segment_ids, hor, first_viewer)


def dense_mask(iv):
  """Intervals -> the reference bool mask [B, L, L] (same as `attention_mask`)."""
  return mask_from_horizons(iv.segment_ids, iv.horizons, iv.segment_ids)


def allowed_pairs(segment_ids, image_index, *, intra_image="bidirectional"):
  """Number of (query, key) pairs the mask allows, int32 [B] (exact for contract rows).

  Model FLOPs of attention per layer and forward pass: 4 * heads * head_dim * pairs
  (QK^T and PV); a training step (forward + backward) is 3x that.
  """
  return iv_lib.allowed_pairs(intervals(segment_ids, image_index, intra_image=intra_image))


def kernel_blocks(implementation, length, block_q, block_k, head_dim):
  """The (query, key) block sizes a blocked kernel runs with at sequence length `length`
  (each kernel clips the configured sizes; see its flash/chunked_attention)."""
  if implementation == "pallas_gpu":
    from tfusion.model import attention_pallas_gpu  # pylint: disable=g-import-not-at-top
    plan = attention_pallas_gpu.make_plan(
        (1, length, 1, head_dim), 1, block_q=min(block_q, attention_pallas_gpu.MAX_BLOCK_Q),
        block_k=min(block_k, attention_pallas_gpu.MAX_BLOCK_K))
    return plan.block_q, plan.block_k
  if implementation == "pallas_tpu":
    from tfusion.model import attention_pallas_tpu  # pylint: disable=g-import-not-at-top
    return attention_pallas_tpu.blocks(length, block_q, block_k)
  from tfusion.model import attention_chunked  # pylint: disable=g-import-not-at-top
  return attention_chunked.blocks(length, block_q, block_k)


def computed_pairs(segment_ids, image_index, *, intra_image="bidirectional",
                   implementation="dense", block_q=512, block_k=512, head_dim=None):
  """(query, key) pairs the attention kernel computes in the forward pass: the hardware's
  work, float32 scalar summed over the rows (the backward visits the same live blocks).

  dense: every L x L pair. Blocked kernels: each visited (query block, key block) pair counts
  whole (masked elements inside are computed too): per row for the Pallas kernels, over the
  union of the batch's rows for `chunked` (its loop bounds are shared). Compare with
  `allowed_pairs` (model FLOPs): the ratio is the work spent on masked elements.

  Args:
    segment_ids, image_index: int [B, L] per the batch contract.
    implementation, block_q, block_k, head_dim: config.model's attention settings.
  """
  b, length = segment_ids.shape
  implementation = resolve_implementation(implementation, head_dim=head_dim)
  if implementation == "dense":
    return jnp.float32(b) * length * length
  bq, bk = kernel_blocks(implementation, length, block_q, block_k, head_dim)
  lcm = bq * bk // np.gcd(bq, bk)
  iv = iv_lib.pad_to(intervals(segment_ids, image_index, intra_image=intra_image),
                     -(-length // lcm) * lcm)
  first, last = iv_lib.block_ranges(iv.kv_lo, iv.kv_hi, bq, bk)  # [B, query blocks]
  if implementation == "chunked":  # rows share the loop bounds
    first, last = first.min(0, keepdims=True), last.max(0, keepdims=True)
  live = jnp.maximum(last - first + 1, 0).astype(jnp.float32).sum()
  return live * (b if implementation == "chunked" else 1) * bq * bk


@functools.lru_cache(maxsize=None)
def _warn_once(message):
  logging.warning(message)


_TARGET_PLATFORM = contextvars.ContextVar("tfusion_attention_platform", default=None)


@contextlib.contextmanager
def target_platform(platform):
  """Kernels resolve for `platform` inside (tfusion-aot compiles for a TPU topology from a
  CPU host, so the default backend is not the target)."""
  token = _TARGET_PLATFORM.set(platform)
  try:
    yield
  finally:
    _TARGET_PLATFORM.reset(token)


def resolve_implementation(implementation, *, head_dim=None, backend=None):
  """The kernel `implementation` runs as on `backend` (default: the `target_platform`, else
  jax's default backend).

  Raises ValueError naming config.model.attention_impl for unknown names; a kernel that does
  not support the backend or shape falls back to chunked with a one-line warning.
  """
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"config.model.attention_impl must be one of {IMPLEMENTATIONS}, "
                     f"got {implementation!r}")
  backend = backend or _TARGET_PLATFORM.get() or jax.default_backend()
  if implementation == "jax":
    _warn_once("config.model.attention_impl='jax' is deprecated (jax.nn.dot_product_attention "
               "ran dense XLA attention for this mask); using 'auto'")
    implementation = "auto"
  if implementation == "auto":
    # No warning when auto falls back: the kernels want lane-aligned (TPU) or power-of-two
    # (Triton) heads.
    implementation = "chunked"
    if backend == "tpu" and (head_dim is None or head_dim % 128 == 0):
      implementation = "pallas_tpu"
    elif backend == "gpu":
      from tfusion.model import attention_pallas_gpu  # pylint: disable=g-import-not-at-top
      if head_dim is None or attention_pallas_gpu.fits(head_dim):
        implementation = "pallas_gpu"
  for kernel, needs in [("pallas_tpu", "tpu"), ("pallas_gpu", "gpu")]:
    if implementation == kernel and backend != needs:
      raise ValueError(f"config.model.attention_impl={kernel!r} needs a {needs.upper()} backend "
                       f"(got {backend!r}); use 'chunked' or 'auto'")
  return implementation


def dot_product_attention(q, k, v, mask, *, implementation="dense", block_q=DEFAULT_BLOCK,
                          block_k=DEFAULT_BLOCK):
  """Multi-head attention with grouped key/value heads.

  Args:
    q: [B, Lq, H, D] queries.
    k, v: [B, Lk, Hkv, D] keys and values; H must be a multiple of Hkv.
    mask: `Intervals` of the rows (self-attention, Lq == Lk), or a dense bool mask
      [B, Lq, Lk] (True where allowed; always computed by the dense reference).
    implementation: see the module docstring (config.model.attention_impl).
    block_q, block_k: query / key block sizes of the chunked and Pallas kernels.
  Returns:
    [B, Lq, H, D] in q's dtype. Queries with no allowed key (padding) get finite garbage
    (dense) or 0 (blocked kernels).
  """
  heads, head_dim = q.shape[2:]
  kv_heads = k.shape[2]
  if heads % kv_heads:
    raise ValueError(f"num_heads={heads} is not a multiple of num_kv_heads={kv_heads}")
  implementation = resolve_implementation(implementation, head_dim=head_dim)
  if not isinstance(mask, Intervals):
    if implementation != "dense" and q.shape[1] == k.shape[1] and q.shape[1] > 1:
      _warn_once(f"attention_impl={implementation!r} got a dense [B, L, L] mask: running the "
                 "dense reference; pass attention.intervals(...) instead")
    return _dense(q, k, v, mask)
  if q.shape[1] != mask.length or k.shape[1] != mask.length:
    raise ValueError(f"Intervals of length {mask.length} need self-attention inputs, got "
                     f"q {q.shape}, k {k.shape}")
  if implementation == "dense":
    return _dense(q, k, v, dense_mask(mask))
  if implementation == "chunked":
    from tfusion.model import attention_chunked  # pylint: disable=g-import-not-at-top
    return attention_chunked.chunked_attention(q, k, v, mask, block_q=block_q, block_k=block_k)
  if implementation == "pallas_gpu":
    from tfusion.model import attention_pallas_gpu  # pylint: disable=g-import-not-at-top
    kernel = functools.partial(attention_pallas_gpu.flash_attention,
                               block_q=min(block_q, attention_pallas_gpu.MAX_BLOCK_Q),
                               block_k=min(block_k, attention_pallas_gpu.MAX_BLOCK_K))
  else:
    from tfusion.model import attention_pallas_tpu  # pylint: disable=g-import-not-at-top
    kernel = functools.partial(attention_pallas_tpu.flash_attention, block_q=block_q,
                               block_k=block_k)
  return per_shard(kernel, q, k, v, mask)


def per_shard(kernel, q, k, v, iv, mesh=None):
  """Runs `kernel(q, k, v, iv)` on each device's rows and heads of the current mesh.

  A Pallas kernel is one custom call that XLA cannot partition: under a mesh it would gather
  the whole batch onto every device and compute all of it there. Rows split over the mesh's
  batch axes (data, fsdp; the logical "batch" rule) and heads over tensor (when it divides
  both H and Hkv), the kernel sees only its shard (shard_map), as the rest of the model does.
  Without a mesh (or a one-device one) the kernel runs as is.
  """
  mesh = jax.sharding.get_abstract_mesh() if mesh is None else mesh
  if mesh is None or mesh.empty or mesh.size == 1:
    return kernel(q, k, v, iv)
  sizes = dict(mesh.shape)
  batch = [a for a in ("data", "fsdp") if sizes.get(a, 1) > 1]
  if q.shape[0] % int(np.prod([sizes[a] for a in batch], dtype=int)):
    batch = []  # rows that do not divide stay whole (as the logical rules would leave them)
  tensor = sizes.get("tensor", 1)
  heads = "tensor" if tensor > 1 and not q.shape[2] % tensor and not k.shape[2] % tensor else None
  rows = tuple(batch) or None
  qkv = PartitionSpec(rows, None, heads, None)
  iv_spec = type(iv)(*[PartitionSpec(rows, None)] * len(iv))
  return jax.shard_map(kernel, mesh=mesh, in_specs=(qkv, qkv, qkv, iv_spec), out_specs=qkv,
                       check_vma=False)(q, k, v, iv)


def _dense(q, k, v, mask):
  """The reference: einsum, fp32 softmax over a bool mask [B, Lq, Lk]."""
  batch, q_len, heads, head_dim = q.shape
  kv_heads = k.shape[2]
  groups = heads // kv_heads
  qg = q.reshape(batch, q_len, kv_heads, groups, head_dim)
  scores = jnp.einsum("bqhgd,bkhd->bhgqk", qg, k, preferred_element_type=jnp.float32)
  scores = scores * (head_dim ** -0.5)
  scores = jnp.where(mask[:, None, None, :, :], scores, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
  out = jnp.einsum("bhgqk,bkhd->bqhgd", probs, v)
  return out.reshape(batch, q_len, heads, head_dim)
