"""Discrete image tokens, sampled autoregressively with the KV cache (the Chameleon baseline).

After `<boi>` the model draws exactly n = latent_size^2 codes, one token per step, each from
the image-token slice of the vocabulary only (tfusion/discrete.py: ids [offset, offset + K)),
then `<eoi>` is written. Classifier-free guidance works on logits: the batch carries B
conditional rows (the prompt) and B unconditional rows (<bos> <boi>), both fed the same chosen
code, and the code is drawn from
    uncond + scale * (cond - uncond)
(restricted to image tokens; scale 1 is the conditional model). Temperature divides the guided
logits, top-k keeps the k largest. Randomness is per row: code i of a row draws from
fold_in(row key, i), so a row's image does not depend on the rest of the batch.

The functions taking `module` run inside `Transfusion.apply(..., method=fn)`.
"""

import jax
import jax.numpy as jnp

from tfusion.generate import context as context_lib


def guide_logits(cond, uncond, scale):
  """Classifier-free guidance on logits: uncond + scale * (cond - uncond)."""
  return uncond + scale * (cond - uncond)


def top_k_filter(logits, k):
  """Keeps the k largest logits per row (ties at the k-th kept); k = 0 keeps all."""
  if not k or k >= logits.shape[-1]:
    return logits
  kth = jnp.sort(logits, axis=-1)[:, -k][:, None]
  return jnp.where(logits >= kth, logits, -jnp.inf)


def choose_codes(image_logits, keys, step, temperature, *, greedy, top_k):
  """image_logits float [B, K] -> codes int32 [B]."""
  if greedy:
    return jnp.argmax(image_logits, axis=-1).astype(jnp.int32)
  scaled = top_k_filter(image_logits / temperature, top_k)
  step_keys = jax.vmap(lambda k: jax.random.fold_in(k, step))(keys)
  return jax.vmap(jax.random.categorical)(step_keys, scaled).astype(jnp.int32)


def take_rows(ctx, b):
  """The first b rows of a context (the conditional half of a guided batch)."""
  return context_lib.Context(
      cache=jax.tree.map(lambda x: x[:, :b], ctx.cache), segment_ids=ctx.segment_ids[:b],
      positions=ctx.positions[:b], image_index=ctx.image_index[:b],
      next_position=ctx.next_position[:b], cursor=ctx.cursor)


def sample_codes(module, ctx, logits, keys, active, scale, temperature, *, guided, num_tokens,
                 offset, codebook_size, top_k, greedy, eoi_id, intra_image):
  """Draws n codes per row after <boi>, then writes <eoi>.

  Args:
    module: the bound Transfusion module.
    ctx: the context ending with <boi>: B rows, or 2B (conditional, then unconditional) when
      `guided`. logits: float32 [B or 2B, V] for the next token.
    keys: [B, 2] per-row keys. active: bool [B] rows that draw (others write holes).
    scale: guidance scale; temperature: > 0 (unused when greedy).
    num_tokens, offset, codebook_size, top_k, greedy, eoi_id: static.
  Returns:
    (codes int32 [B, num_tokens], the conditional rows' context after <eoi>, their logits
    [B, V] after <eoi>).
  """
  b = keys.shape[0]
  both = (lambda x: jnp.concatenate([x, x], 0)) if guided else (lambda x: x)
  written = both(active)

  def body(i, carry):
    ctx, logits, codes = carry
    image_logits = logits[:, offset:offset + codebook_size]
    if guided:
      image_logits = guide_logits(image_logits[:b], image_logits[b:], scale)
    code = choose_codes(image_logits, keys, i, temperature, greedy=greedy, top_k=top_k)
    code = jnp.where(active, code, 0)
    new_logits, ctx = context_lib.append_tokens(
        module, ctx, both(code + offset)[:, None], written[:, None], intra_image=intra_image)
    return ctx, new_logits, codes.at[:, i].set(code)

  codes = jnp.zeros((b, num_tokens), jnp.int32)
  ctx, logits, codes = jax.lax.fori_loop(0, num_tokens, body, (ctx, logits, codes))
  eoi = jnp.full((written.shape[0], 1), eoi_id, jnp.int32)
  logits, ctx = context_lib.append_tokens(module, ctx, eoi, written[:, None],
                                          intra_image=intra_image)
  if guided:
    ctx, logits = take_rows(ctx, b), logits[:b]
  return codes, ctx, logits
