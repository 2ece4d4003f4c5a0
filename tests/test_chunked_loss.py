"""The chunked cross-entropy equals the dense one (loss and gradients) without [B, L, V] logits."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import layouts
from tfusion import chunked_ce, configlib, diffusion, losses
from tfusion.model import transfusion


def _dense_ce(h, w, t):
  return optax.softmax_cross_entropy_with_integer_labels(h @ w, t)


def test_chunked_ce_matches_dense_values_and_grads():
  rng = np.random.default_rng(0)
  b, length, d, v = 2, 37, 16, 50  # 37 is not a multiple of the chunk: the pad is dropped
  h = jnp.asarray(rng.standard_normal((b, length, d)), jnp.float32)
  w = jnp.asarray(rng.standard_normal((d, v)) * 0.3, jnp.float32)
  t = jnp.asarray(rng.integers(0, v, (b, length)), jnp.int32)
  weights = jnp.asarray(rng.random((b, length)), jnp.float32)
  chunked = lambda h, w: chunked_ce.chunked_cross_entropy(h, w, t, chunk_size=8)
  np.testing.assert_allclose(chunked(h, w), _dense_ce(h, w, t), rtol=1e-5, atol=1e-5)
  g_chunk = jax.grad(lambda h, w: (chunked(h, w) * weights).sum(), argnums=(0, 1))(h, w)
  g_dense = jax.grad(lambda h, w: (_dense_ce(h, w, t) * weights).sum(), argnums=(0, 1))(h, w)
  for a, e in zip(g_chunk, g_dense):
    np.testing.assert_allclose(a, e, rtol=1e-4, atol=1e-5)


def _shapes_in_jaxpr(jaxpr, out):
  for eqn in jaxpr.eqns:
    out.update(tuple(v.aval.shape) for v in eqn.outvars if hasattr(v.aval, "shape"))
    for param in eqn.params.values():
      for p in (param if isinstance(param, (list, tuple)) else [param]):
        inner = getattr(p, "jaxpr", p)
        if hasattr(inner, "eqns"):
          _shapes_in_jaxpr(inner, out)
  return out


def test_chunked_ce_never_builds_full_logits():
  b, length, d, v, chunk = 2, 64, 8, 40, 16
  h, w = jnp.ones((b, length, d)), jnp.ones((d, v))
  t = jnp.zeros((b, length), jnp.int32)
  grad = jax.grad(lambda h, w: chunked_ce.chunked_cross_entropy(h, w, t, chunk_size=chunk).sum(),
                  argnums=(0, 1))
  shapes = _shapes_in_jaxpr(jax.make_jaxpr(grad)(h, w).jaxpr, set())
  assert (b, chunk, v) in shapes  # the per-chunk logits exist (sanity of the walk)
  assert not [s for s in shapes if np.prod(s) >= b * length * v], "full-size logits in the graph"


@pytest.mark.parametrize("tie", [False, True])
def test_loss_fn_chunked_matches_dense(tie):
  config = configlib.base_config()
  config.model.vocab_size = 96
  config.model.tie_embeddings = tie
  model = transfusion.Transfusion(config.model)
  img = config.model.image
  batch, _ = layouts.random_batch(np.random.default_rng(1), 2, 48, 2,
                                  (img.latent_size, img.latent_size, img.latent_channels),
                                  img.patch_size, vocab_size=96)
  params = model.init(jax.random.PRNGKey(0), batch["tokens"], batch["positions"],
                      batch["segment_ids"], batch["image_index"], batch["images"],
                      jnp.zeros((2, 2)))
  objective = diffusion.from_config(config)
  results = []
  for chunk in (0, 20):  # 48 positions in chunks of 20: the last chunk is padded
    loss_fn = losses.make_loss_fn(model, objective, ce_chunk_size=chunk)
    results.append(jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(
        params, batch, jax.random.PRNGKey(2)))
  (loss_d, aux_d), grads_d = results[0]
  (loss_c, aux_c), grads_c = results[1]
  assert float(aux_d["text_loss"]) > 0
  np.testing.assert_allclose(aux_c["text_loss"], aux_d["text_loss"], rtol=1e-5)
  np.testing.assert_allclose(loss_c, loss_d, rtol=1e-5)
  for a, e in zip(jax.tree.leaves(grads_c), jax.tree.leaves(grads_d)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(e), rtol=1e-4, atol=1e-6)
