"""The generation context: a functional KV cache plus the layout of the row it caches.

Every row of a batch is one document being generated. The cache holds Lc positions; `cursor`
(the same for all rows) is the next slot to write. A row that has nothing to add while others
do (a shorter prompt, a finished caption, a row not drawing an image) writes a *hole*: a slot
with segment id 0, which the attention rule hides from every query (DESIGN.md), and which does
not advance the row's RoPE position. So a row with holes computes exactly what the same
document laid out contiguously would.

The attention mask of a query chunk is read from the cache-sized layout with
`attention.query_rows_mask`, the same rule as training. Image spans in the layout all carry
image number 0: only their extent matters to the mask, and two images are always separated
by <eoi> <boi>.

The functions taking `module` run inside `Transfusion.apply(..., method=fn)`.
"""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from tfusion.model import attention as attention_lib


class Context(NamedTuple):
  """Generation state of B rows (a pytree; jit-able)."""
  cache: Any  # {"k", "v": [layers, B, Lc, Hkv, D]}
  segment_ids: jax.Array  # int32 [B, Lc]: 1 at written content, 0 at holes and unwritten slots
  positions: jax.Array  # int32 [B, Lc]: RoPE position of each slot
  image_index: jax.Array  # int32 [B, Lc]: 0 at image patches, -1 elsewhere
  next_position: jax.Array  # int32 [B]: RoPE position of the row's next content
  cursor: jax.Array  # int32 []: next cache slot to write

  @property
  def batch_size(self):
    return self.segment_ids.shape[0]

  @property
  def capacity(self):
    return self.segment_ids.shape[1]


def init_context(model_config, batch_size, length):
  """An empty context of `batch_size` rows and `length` cache slots."""
  shape = (model_config.num_layers, batch_size, length, model_config.num_kv_heads,
           model_config.head_dim)
  dtype = jnp.dtype(model_config.dtype)
  zeros = jnp.zeros((batch_size, length), jnp.int32)
  return Context(
      cache={"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)},
      segment_ids=zeros, positions=zeros, image_index=zeros - 1,
      next_position=jnp.zeros((batch_size,), jnp.int32), cursor=jnp.zeros((), jnp.int32))


def concat_contexts(a, b):
  """Stacks the rows of two contexts with the same cursor and capacity (cursor from `a`)."""
  cat = lambda x, y, axis: jnp.concatenate([x, y], axis=axis)
  return Context(
      cache=jax.tree.map(lambda x, y: cat(x, y, 1), a.cache, b.cache),
      segment_ids=cat(a.segment_ids, b.segment_ids, 0),
      positions=cat(a.positions, b.positions, 0),
      image_index=cat(a.image_index, b.image_index, 0),
      next_position=cat(a.next_position, b.next_position, 0),
      cursor=a.cursor)


def chunk_layout(ctx, active, is_image):
  """Layout of the next chunk of T slots.

  Args:
    ctx: the context.
    active: bool [B, T], True where the row writes content (False: a hole).
    is_image: bool [T], True at image patch slots.
  Returns:
    (segment_ids, positions, image_index) int32 [B, T], and next_position [B] after the chunk.
  """
  steps = jnp.cumsum(active.astype(jnp.int32), axis=1)
  positions = jnp.where(active, ctx.next_position[:, None] + steps - 1, 0)
  segment_ids = active.astype(jnp.int32)
  image_index = jnp.where(active & is_image[None, :], 0, -1).astype(jnp.int32)
  return segment_ids, positions, image_index, ctx.next_position + steps[:, -1]


def forward_chunk(module, ctx, tokens, active, is_image, patch_vectors, *, intra_image):
  """Runs T new slots through the trunk against the cache; writes their keys and values.

  Args:
    module: the bound Transfusion module.
    ctx: context; the chunk goes to slots [cursor, cursor + T).
    tokens: int [B, T] token ids (ignored at image slots).
    active: bool [B, T]; inactive slots become holes.
    is_image: bool [T] (static layout of the chunk: whole images only).
    patch_vectors: [B, 1, N, d] vectors of the chunk's image (or [B, 1, 1, d] zeros).
    intra_image: config.model.intra_image.
  Returns:
    (normed hidden states [B, T, d], the context after the chunk).
  """
  t_len = tokens.shape[1]
  seg, pos, img, next_position = chunk_layout(ctx, active, is_image)
  write = lambda full, part: jax.lax.dynamic_update_slice_in_dim(full, part, ctx.cursor, 1)
  segment_ids = write(ctx.segment_ids, seg)
  image_index = write(ctx.image_index, img)
  mask = attention_lib.query_rows_mask(segment_ids, image_index, ctx.cursor, t_len,
                                       intra_image=intra_image)
  # The model places patch vectors by slot and patch number; every image of a chunk is slot 0.
  model_index = jnp.broadcast_to(jnp.where(is_image, 0, -1)[None, :], tokens.shape)
  x = module.embed(tokens, model_index.astype(jnp.int32), patch_vectors)
  h, cache = module.run_trunk(x, pos, mask, ctx.cache, ctx.cursor)
  new_ctx = Context(cache=cache, segment_ids=segment_ids, positions=write(ctx.positions, pos),
                    image_index=image_index, next_position=next_position,
                    cursor=ctx.cursor + t_len)
  return h, new_ctx


def append_tokens(module, ctx, tokens, active, *, intra_image):
  """Text chunk -> (float32 logits [B, V] at its last slot, new context)."""
  b = tokens.shape[0]
  dummy = jnp.zeros((b, 1, 1, module.config.d_model), jnp.dtype(module.config.dtype))
  is_image = jnp.zeros((tokens.shape[1],), bool)
  h, ctx = forward_chunk(module, ctx, tokens, active, is_image, dummy, intra_image=intra_image)
  return module.text_logits(h[:, -1:])[:, 0], ctx


def append_image(module, ctx, latents, active, eoi_id, *, intra_image):
  """Writes a finished image (as a clean latent, t = 0) and <eoi> into the context.

  Args:
    latents: [B, h, w, c]. active: bool [B] (inactive rows write holes).
  Returns:
    (float32 logits [B, V] after <eoi>, new context).
  """
  b = latents.shape[0]
  vectors, _ = module.encode_images(latents[:, None], jnp.zeros((b, 1), jnp.float32))
  n = vectors.shape[2]
  tokens = jnp.concatenate([jnp.zeros((b, n), jnp.int32), jnp.full((b, 1), eoi_id, jnp.int32)], 1)
  is_image = jnp.arange(n + 1) < n
  chunk_active = jnp.broadcast_to(active[:, None], (b, n + 1))
  h, ctx = forward_chunk(module, ctx, tokens, chunk_active, is_image, vectors,
                         intra_image=intra_image)
  return module.text_logits(h[:, -1:])[:, 0], ctx


def predict_image(module, ctx, noisy_latents, image_time, active, *, intra_image):
  """The model's prediction for an image following the context, from its N positions only.

  The image's keys/values go into a copy of the cache that is dropped: the context (the
  prefix up to and including <boi>) is computed once and reused at every denoising step.

  Args:
    ctx: context whose cursor is the image's first slot.
    noisy_latents: [B, h, w, c]; image_time: [B] in [0, 1]; active: bool [B].
  Returns:
    float32 [B, h, w, c] (epsilon or velocity, as trained).
  """
  vectors, aux = module.encode_images(noisy_latents[:, None], image_time[:, None])
  b, _, n, _ = vectors.shape
  tokens = jnp.zeros((b, n), jnp.int32)
  chunk_active = jnp.broadcast_to(active[:, None], (b, n))
  h, _ = forward_chunk(module, ctx, tokens, chunk_active, jnp.ones((n,), bool), vectors,
                       intra_image=intra_image)
  return module.predict_images(h, jnp.zeros((b, n), jnp.int32), aux)[:, 0]
