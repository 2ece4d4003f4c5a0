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


# ------------------------------------------------------------------------- the VQ-VAE

def _digits(n=200):
  from sklearn.datasets import load_digits
  from tfusion.vae import images as images_lib
  digits = load_digits().images[:n] / 16.0
  return np.stack([images_lib.array_to_model_input(d, 8) for d in digits])


def test_vq_vae_trains_uses_its_codebook_round_trips_and_resumes(tmp_path):
  from tfusion.vae import train as train_lib, train_vq, vq as vq_lib
  from tfusion.vae.model import VAEConfig
  config = VAEConfig(block_out_channels=(16, 32), layers_per_block=1, latent_channels=4,
                     norm_num_groups=8)
  images = _digits()
  logs = []
  kwargs = dict(num_codes=32, steps=120, batch_size=16, lr=3e-3, restart_every=20,
                workdir=str(tmp_path / "run"), log_every=20, log=logs.append)
  model, report = train_vq.train_vq(images, config, **kwargs)
  history = report["history"]
  assert history[-1]["l1"] < 0.75 * history[0]["l1"]
  # The codebook follows the encoder (EMA) and the encoder commits to it: the quantization
  # error falls (0.040 -> 0.024; 0.034 with a frozen codebook, 1.1 without the commitment term).
  assert history[-1]["commitment"] < 0.7 * history[0]["commitment"]
  baseline = train_lib.psnr(images, np.broadcast_to(images.mean(0), images.shape))
  assert report["heldout_psnr"] > baseline + 4, (report["heldout_psnr"], baseline)  # 17.1 vs 11.4
  assert report["code_shape"] == [4, 4]  # 8x8 digits, 2x down
  assert report["heldout_usage"]["used"] >= 0.5, report["heldout_usage"]  # 0.875
  assert report["heldout_usage"]["perplexity"] > 12  # 24.0
  # Save, load: same codes and reconstructions.
  vq_lib.save_vq(model, str(tmp_path / "vq"))
  loaded = vq_lib.load_vq(str(tmp_path / "vq"))
  codes = np.asarray(model.encode_codes(images[:20]))
  np.testing.assert_array_equal(np.asarray(loaded.encode_codes(images[:20])), codes)
  np.testing.assert_allclose(np.asarray(loaded.decode_codes(codes)),
                             np.asarray(model.decode_codes(codes)), atol=1e-5)
  with pytest.raises(ValueError, match="image code 32 .* outside the codebook \\[0, 32\\)"):
    loaded.decode_codes(np.full((1, 4, 4), 32), where="records shard-0 record 5")
  # A rerun resumes; a KL VAE of the same shape in that directory is refused.
  _, again = train_vq.train_vq(images, config, **kwargs)
  assert any("resumed at step 120" in line for line in logs) and again["history"] == []
  with pytest.raises(train_lib.ShapeMismatchError, match="quantizer"):
    train_lib.train_vae(images, config, steps=2, workdir=str(tmp_path / "run"))
  from tfusion import vae as vae_lib
  with pytest.raises(ValueError, match="not a VQModel"):
    vae_lib.save_vae(vae_lib.init_vae(config), str(tmp_path / "kl"))
    vq_lib.load_vq(str(tmp_path / "kl"))
