"""Vector quantizer (the Chameleon baseline's image tokens): nearest codes, straight-through
gradients, losses, EMA codebook, dead-code restart, k-means init, usage statistics."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tfusion.vae import quantizer as vq


def blobs(rng, centres, per, scale=0.05):
  """[len(centres) * per, D] points around each centre, and their true centre index."""
  labels = np.repeat(np.arange(len(centres)), per)
  return (centres[labels] + scale * rng.normal(size=(len(labels), centres.shape[1]))).astype(
      np.float32), labels


def test_nearest_codes_match_brute_force():
  rng = np.random.default_rng(0)
  z = rng.normal(size=(3, 5, 8)).astype(np.float32)
  codebook = rng.normal(size=(17, 8)).astype(np.float32)
  want = np.argmin(((z[..., None, :] - codebook) ** 2).sum(-1), -1)
  got = vq.nearest_codes(jnp.asarray(z), jnp.asarray(codebook))
  assert got.shape == (3, 5) and got.dtype == jnp.int32
  np.testing.assert_array_equal(np.asarray(got), want)


def test_quantize_forward_values_and_losses():
  rng = np.random.default_rng(1)
  z = rng.normal(size=(4, 6)).astype(np.float32)
  codebook = rng.normal(size=(5, 6)).astype(np.float32)
  out = vq.quantize(jnp.asarray(z), jnp.asarray(codebook))
  e = codebook[np.argmin(((z[:, None] - codebook) ** 2).sum(-1), -1)]
  np.testing.assert_allclose(np.asarray(out.z_q), e, atol=1e-6)  # forward: the code vectors
  np.testing.assert_allclose(float(out.commitment), np.mean((z - e) ** 2), rtol=1e-5)
  np.testing.assert_allclose(float(out.codebook_loss), np.mean((z - e) ** 2), rtol=1e-5)


def test_straight_through_gradients():
  """d/dz f(z_q) = f'(z_q) (the identity backward); the commitment term pulls z to its code
  and only the codebook loss reaches the codebook, only at the chosen entries."""
  rng = np.random.default_rng(2)
  z = jnp.asarray(rng.normal(size=(6, 4)).astype(np.float32))
  codebook = jnp.asarray(rng.normal(size=(9, 4)).astype(np.float32))
  target = jnp.asarray(rng.normal(size=(6, 4)).astype(np.float32))

  def decoder_loss(z, codebook):
    return jnp.sum((vq.quantize(z, codebook).z_q - target) ** 2)

  gz, gc = jax.grad(decoder_loss, argnums=(0, 1))(z, codebook)
  e = vq.lookup(vq.nearest_codes(z, codebook), codebook)
  np.testing.assert_allclose(np.asarray(gz), 2 * np.asarray(e - target), atol=1e-5)
  np.testing.assert_array_equal(np.asarray(gc), 0.0)  # no decoder gradient to the codebook

  gz, gc = jax.grad(lambda z, c: vq.quantize(z, c).commitment, argnums=(0, 1))(z, codebook)
  np.testing.assert_allclose(np.asarray(gz), 2 * np.asarray(z - e) / z.size, atol=1e-6)
  np.testing.assert_array_equal(np.asarray(gc), 0.0)

  gz, gc = jax.grad(lambda z, c: vq.quantize(z, c).codebook_loss, argnums=(0, 1))(z, codebook)
  np.testing.assert_array_equal(np.asarray(gz), 0.0)
  used = np.unique(np.asarray(vq.nearest_codes(z, codebook)))
  unused = np.setdiff1d(np.arange(9), used)
  assert np.all(np.abs(np.asarray(gc)[used]).sum(-1) > 0)
  np.testing.assert_array_equal(np.asarray(gc)[unused], 0.0)


def test_ema_codebook_converges_to_cluster_means():
  rng = np.random.default_rng(3)
  centres = rng.normal(size=(4, 3)).astype(np.float32) * 3
  state = vq.init_ema_state(jnp.asarray(centres + 0.5 * rng.normal(size=centres.shape)))
  for _ in range(300):
    z, _ = blobs(rng, centres, 16)
    codes = vq.quantize(jnp.asarray(z), state["codebook"]).codes
    state = vq.ema_update(state, jnp.asarray(z), codes, decay=0.95)
  np.testing.assert_allclose(np.asarray(state["codebook"]), centres, atol=0.05)
  np.testing.assert_allclose(np.asarray(state["cluster_size"]), 16.0, rtol=0.05)


def test_an_unused_code_dies_and_restarts_on_data():
  rng = np.random.default_rng(4)
  centres = np.array([[0.0, 0.0], [5.0, 5.0]], np.float32)
  far = np.array([[100.0, -100.0]], np.float32)  # a code no vector will ever choose
  state = vq.init_ema_state(jnp.asarray(np.concatenate([centres, far])))
  for _ in range(200):
    z, _ = blobs(rng, centres, 8)
    state = vq.ema_update(state, jnp.asarray(z),
                          vq.quantize(jnp.asarray(z), state["codebook"]).codes, decay=0.95)
  assert float(state["cluster_size"][2]) < 1e-3
  assert vq.usage_stats(vq.nearest_codes(jnp.asarray(z), state["codebook"]), 3)["dead"] == 1
  z, _ = blobs(rng, centres, 8)
  state, restarted = vq.restart_dead_codes(state, jnp.asarray(z), jax.random.PRNGKey(0))
  assert int(restarted) == 1
  new = np.asarray(state["codebook"][2])
  assert np.min(np.abs(z - new).sum(-1)) == 0.0  # now one of the batch's vectors
  np.testing.assert_allclose(np.asarray(state["codebook"][:2]), centres, atol=0.1)
  stats = vq.usage_stats(vq.nearest_codes(jnp.asarray(z), state["codebook"]), 3)
  assert stats["dead"] == 0 and stats["used"] == 1.0


def test_kmeans_init_finds_the_clusters():
  rng = np.random.default_rng(5)
  centres = rng.normal(size=(6, 4)).astype(np.float32) * 4
  z, _ = blobs(rng, centres, 40)
  codebook = np.asarray(vq.kmeans_init(jnp.asarray(z), 6, jax.random.PRNGKey(1), iters=20))
  # Every true centre has a codebook entry next to it (k-means is up to permutation).
  nearest = np.min(np.linalg.norm(centres[:, None] - codebook[None], axis=-1), axis=1)
  assert np.all(nearest < 0.1), nearest


def test_usage_stats():
  assert vq.usage_stats(np.arange(8), 8) == {"perplexity": pytest.approx(8.0), "used": 1.0,
                                             "dead": 0}
  assert vq.usage_stats(np.zeros(10, int), 4) == {"perplexity": pytest.approx(1.0),
                                                  "used": 0.25, "dead": 3}


def test_codes_out_of_the_codebook_are_named():
  vq.check_codes(np.array([[0, 255]]), 256, "shard-0.array_record record 3")
  with pytest.raises(ValueError, match=r"shard-0.array_record record 3: image code 256 at "
                                       r"index \[0, 1\] is outside the codebook \[0, 256\)"):
    vq.check_codes(np.array([[0, 256], [1, -1]]), 256, "shard-0.array_record record 3")
  with pytest.raises(ValueError, match="must be integers"):
    vq.check_codes(np.array([0.5]), 256, "x")
