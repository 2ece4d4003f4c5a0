"""Text decoding with the KV cache: greedy, temperature and nucleus (top-p) sampling.

One token per step for all rows; a row stops after emitting a stop token (<eos> or <boi>)
and then writes holes while the others go on. Every emitted token, the stop token included,
is written into the cache, so the context is ready for what follows (an image after <boi>).
Randomness is per row: the token of step s of a row draws from fold_in(row key, s), so a
row's text does not depend on what else is in the batch.
"""

import jax
import jax.numpy as jnp

from tfusion.generate import context as context_lib


def top_p_filter(logits, top_p):
  """Keeps the smallest set of most likely tokens whose probability reaches `top_p`.

  Args:
    logits: float [B, V]. top_p: float in (0, 1] (scalar or [B]).
  Returns:
    [B, V] logits with the tokens outside the nucleus at -inf (the top token always stays).
  """
  sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
  probs = jax.nn.softmax(sorted_logits, axis=-1)
  mass_before = jnp.cumsum(probs, axis=-1) - probs
  keep = mass_before < jnp.reshape(top_p, (-1, 1))
  last_kept = jnp.maximum(jnp.sum(keep, axis=-1) - 1, 0)
  threshold = jnp.take_along_axis(sorted_logits, last_kept[:, None], axis=-1)
  return jnp.where(logits >= threshold, logits, -jnp.inf)


def choose_tokens(logits, keys, step, *, greedy, temperature, top_p):
  """Next token per row. logits [B, V] float32, keys [B, 2] -> int32 [B]."""
  if greedy:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  scaled = top_p_filter(logits / temperature, top_p)
  step_keys = jax.vmap(lambda k: jax.random.fold_in(k, step))(keys)
  return jax.vmap(jax.random.categorical)(step_keys, scaled).astype(jnp.int32)


def decode(module, ctx, logits, keys, done, stop_ids, temperature, top_p, *, max_new_tokens,
           greedy, intra_image, return_logits=False):
  """Decodes up to `max_new_tokens` tokens per row (runs inside `Transfusion.apply`).

  Args:
    module: the bound Transfusion module.
    ctx: the context after the prompt; logits: float32 [B, V] for the next token.
    keys: [B, 2] per-row PRNG keys. done: bool [B], rows that write nothing.
    stop_ids: int [S] tokens that end a row (written into the context).
    temperature, top_p: sampling parameters (unused when greedy).
    max_new_tokens: static; the caller makes sure the context has room.
  Returns:
    dict with tokens int32 [B, max_new_tokens] (0 after a row's end), lengths [B] (tokens
    emitted, stop token included), stop_token [B] (-1 if none), logits [B, V] after the last
    token, ctx, and with `return_logits` the logits each token was chosen from
    [B, max_new_tokens, V].
  """
  b, vocab = logits.shape
  state = dict(ctx=ctx, logits=logits, done=done, step=jnp.zeros((), jnp.int32),
               tokens=jnp.zeros((b, max_new_tokens), jnp.int32),
               lengths=jnp.zeros((b,), jnp.int32), stop_token=jnp.full((b,), -1, jnp.int32))
  if return_logits:
    state["all_logits"] = jnp.zeros((b, max_new_tokens, vocab), jnp.float32)

  def cond(s):
    return (s["step"] < max_new_tokens) & ~jnp.all(s["done"])

  def body(s):
    active = ~s["done"]
    token = choose_tokens(s["logits"], keys, s["step"], greedy=greedy,
                          temperature=temperature, top_p=top_p)
    token = jnp.where(active, token, 0)
    stopped = active & jnp.isin(token, stop_ids)
    new_logits, new_ctx = context_lib.append_tokens(module, s["ctx"], token[:, None],
                                                    active[:, None], intra_image=intra_image)
    out = dict(
        ctx=new_ctx, logits=jnp.where(active[:, None], new_logits, s["logits"]),
        done=s["done"] | stopped, step=s["step"] + 1,
        tokens=jax.lax.dynamic_update_slice_in_dim(s["tokens"], token[:, None], s["step"], 1),
        lengths=s["lengths"] + active.astype(jnp.int32),
        stop_token=jnp.where(stopped, token, s["stop_token"]))
    if return_logits:
      out["all_logits"] = jax.lax.dynamic_update_slice_in_dim(
          s["all_logits"], s["logits"][:, None], s["step"], 1)
    return out

  final = jax.lax.while_loop(cond, body, state)
  final.pop("done")
  final.pop("step")
  return final

