"""Where the image patches sit in a packed row.

The batch contract (DESIGN.md) marks every patch position with the slot of its image
(`image_index`, -1 elsewhere); the patches of one image fill a contiguous span in row-major
order. Everything the model needs to know about that layout (first/last position of each
image span, the patch number of each position) is derived here in O(L), without scatters,
so the mask, the input scatter and the output gather all agree on one definition.
"""

import jax
import jax.numpy as jnp


def span_starts(image_index):
  """First position of the image span each position belongs to.

  Args:
    image_index: int [B, L], slot of the image at each position, -1 where no image.
  Returns:
    int [B, L]: for patch positions the index of the first patch of their span; for other
    positions the position itself.
  """
  _, length = image_index.shape
  pos = jnp.arange(length, dtype=jnp.int32)[None, :]
  prev = jnp.pad(image_index[:, :-1], ((0, 0), (1, 0)), constant_values=-1)
  is_start = (image_index >= 0) & (image_index != prev)
  # The latest span start at or before each position.
  last_start = jax.lax.cummax(jnp.where(is_start, pos, -1), axis=1)
  return jnp.where(image_index >= 0, last_start, pos)


def span_ends(image_index):
  """Last position of the image span each position belongs to.

  Args:
    image_index: int [B, L].
  Returns:
    int [B, L]: for patch positions the index of the last patch of their span; for other
    positions the position itself.
  """
  _, length = image_index.shape
  pos = jnp.arange(length, dtype=jnp.int32)[None, :]
  nxt = jnp.pad(image_index[:, 1:], ((0, 0), (0, 1)), constant_values=-1)
  is_end = (image_index >= 0) & (image_index != nxt)
  # The earliest span end at or after each position.
  next_end = jax.lax.cummin(jnp.where(is_end, pos, length), axis=1, reverse=True)
  return jnp.where(image_index >= 0, next_end, pos)


def patch_numbers(image_index):
  """Patch number (0..N-1, row-major) of each patch position; -1 elsewhere.

  Args:
    image_index: int [B, L].
  Returns:
    int [B, L].
  """
  pos = jnp.arange(image_index.shape[1], dtype=jnp.int32)[None, :]
  return jnp.where(image_index >= 0, pos - span_starts(image_index), -1)
