"""The Transfusion model and its joint loss: what it ignores, where gradients go, packing."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import layouts
from tfusion import batch as batch_lib
from tfusion import configlib, diffusion, losses
from tfusion.model import image_io, transfusion

B, L, M = 3, 48, 3


def _config(encoder="linear", **model_overrides):
  config = configlib.base_config()
  config.model.image.encoder = encoder
  config.model.image.latent_size = 4
  config.model.image.latent_channels = 2
  config.model.image.patch_size = 2  # 4 patches per image
  config.model.vocab_size = 100
  config.model.update(model_overrides)
  return config


def _setup(config, seed=0):
  model = transfusion.Transfusion(config.model)
  img = config.model.image
  batch, rows = layouts.random_batch(
      np.random.default_rng(seed), B, L, M, (img.latent_size, img.latent_size,
                                            img.latent_channels), img.patch_size, vocab_size=100)
  params = jax.jit(model.init)(jax.random.PRNGKey(0), batch["tokens"], batch["positions"],
                               batch["segment_ids"], batch["image_index"], batch["images"],
                               jnp.zeros((B, M)))
  loss_fn = jax.jit(losses.make_loss_fn(model, diffusion.from_config(config)))
  return model, params, batch, rows, loss_fn


@pytest.fixture(scope="module")
def linear_setup():
  return _setup(_config())


def test_loss_ignores_masked_positions_and_empty_slots(linear_setup):
  _, params, batch, _, loss_fn = linear_setup
  rng = jax.random.PRNGKey(3)
  base, metrics = loss_fn(params, batch, rng)
  assert metrics["images"] > 0 and metrics["text_tokens"] > 0
  r = np.random.default_rng(7)
  changed = {k: np.array(v) for k, v in batch.items()}
  hidden = (batch["image_index"] >= 0) | (batch["segment_ids"] == 0)
  changed["tokens"] = np.where(hidden, r.integers(0, 100, (B, L)), batch["tokens"]).astype(np.int32)
  changed["targets"] = np.where(batch["text_loss_mask"], batch["targets"],
                                r.integers(0, 100, (B, L))).astype(np.int32)
  empty = ~batch["image_mask"]
  assert empty.any(), "the random batch should have empty slots"
  changed["images"][empty] = r.standard_normal(changed["images"][empty].shape) * 100
  changed["positions"] = np.where(batch["segment_ids"] == 0, 7, batch["positions"]).astype(np.int32)
  again, _ = loss_fn(params, changed, rng)
  np.testing.assert_allclose(again, base, rtol=1e-6)
  # ...while changing a real image's latents does change it.
  real = {**changed, "images": np.where(batch["image_mask"][..., None, None, None],
                                        changed["images"] + 1.0, changed["images"])}
  assert abs(float(loss_fn(params, real, rng)[0]) - float(base)) > 1e-4


def test_document_output_does_not_depend_on_its_neighbours():
  """A document's logits and image predictions are the same packed alone or with others."""
  config = _config()
  model, params, _, _, _ = _setup(config)
  rng = np.random.default_rng(11)
  num_patches = 4
  # Row 0: doc A alone. Row 1: doc B then doc A (A shifted right).
  a = layouts.random_row(rng, 20, 2, num_patches)
  while a["num_images"] == 0 or len(a["docs"]) != 1:
    a = layouts.random_row(rng, 20, 2, num_patches, max_docs=1)
  a_len = a["docs"][0][2]
  shift = 11
  row0 = {k: np.zeros(40, np.int32) for k in ("tokens", "segment_ids", "positions")}
  row0["image_index"] = np.full(40, -1, np.int32)
  row1 = {k: v.copy() for k, v in row0.items()}
  for k in row0:
    row0[k][:a_len] = a[k][:a_len]
    row1[k][shift:shift + a_len] = a[k][:a_len]
  row1["tokens"][:shift] = rng.integers(3, 100, shift)
  row1["segment_ids"][:shift] = 1
  row1["segment_ids"][shift:shift + a_len] = 2
  row1["positions"][:shift] = np.arange(shift)
  stack = lambda k: np.stack([row0[k], row1[k]])
  latents = np.random.default_rng(1).standard_normal((1, 2, 4, 4, 2)).astype(np.float32)
  latents = np.concatenate([latents, latents])
  t = jnp.full((2, 2), 0.3)
  logits, pred = jax.jit(model.apply)(params, stack("tokens"), stack("positions"), stack("segment_ids"),
                             stack("image_index"), latents, t)
  np.testing.assert_allclose(logits[1, shift:shift + a_len], logits[0, :a_len], atol=2e-5)
  used = slice(0, a["num_images"])
  np.testing.assert_allclose(pred[1, used], pred[0, used], atol=2e-5)


@pytest.mark.parametrize("encoder", ["linear", "unet"])
def test_gradients_reach_both_heads_and_the_trunk(encoder):
  config = _config(encoder)
  model, params, batch, _, _ = _setup(config)
  objective = diffusion.from_config(config)
  loss_fn = losses.make_loss_fn(model, objective)

  @jax.jit
  def grads(p):
    part = lambda name: jax.grad(lambda q: loss_fn(q, batch, jax.random.PRNGKey(0))[1][name])(p)
    return part("text_loss")["params"], part("image_loss")["params"]

  norm = lambda tree: float(sum(jnp.sum(jnp.abs(x)) for x in jax.tree.leaves(tree)))
  text, image = grads(params)
  assert norm(text["lm_head"]) > 0 and norm(text["trunk"]) > 0
  assert norm(text["image_out"]) == 0  # the LM loss does not train the image head
  assert norm(image["image_out"]) > 0 and norm(image["trunk"]) > 0
  # (A time embedding gets gradient even at t = 0; that the model receives the sampled
  # times is checked in test_losses.py, that its output depends on t below.)
  assert norm(image["image_in"]) > 0 and norm(image["time_embedding"]) > 0
  assert norm(image["lm_head"]) == 0


def test_image_predictions_depend_on_the_time(linear_setup):
  """The same noisy latents at another time give another prediction (per image: each slot
  sees its own time), while text logits stay as they are."""
  model, params, batch, _, _ = linear_setup
  apply = jax.jit(model.apply)
  args = (batch["tokens"], batch["positions"], batch["segment_ids"], batch["image_index"],
          batch["images"])
  t = np.full((B, M), 0.2, np.float32)
  logits, pred = apply(params, *args, t)
  real = np.argwhere(batch["image_mask"])
  changed_t = t.copy()
  changed_t[tuple(real[0])] = 0.9
  logits_b, pred_b = apply(params, *args, changed_t)
  diff = np.abs(np.asarray(pred_b) - np.asarray(pred)).max(axis=(2, 3, 4))
  assert diff[tuple(real[0])] > 1e-3
  # Earlier text cannot see the image, so at least the first text position is unchanged.
  np.testing.assert_allclose(logits_b[:, 0], logits[:, 0], atol=1e-5)


@pytest.mark.parametrize("patch_size", [1, 2, 4, 8])
def test_patchify_round_trip_and_row_major_order(patch_size):
  x = np.random.default_rng(0).standard_normal((2, 3, 16, 8, 5)).astype(np.float32)
  patches = image_io.patchify(x, patch_size)
  assert patches.shape == (2, 3, (16 // patch_size) * (8 // patch_size), patch_size ** 2 * 5)
  np.testing.assert_array_equal(image_io.unpatchify(patches, patch_size, 16, 8), x)
  # Patch 1 is the top-left patch's right neighbour; its first vector is pixel (0, p).
  if 8 // patch_size > 1:
    np.testing.assert_array_equal(patches[0, 0, 1, :5], x[0, 0, 0, patch_size])


@pytest.mark.slow
@pytest.mark.parametrize("patch_size", [1, 2, 4, 8])
def test_unet_encoder_decoder_shapes_for_every_patch_size(patch_size):
  config = _config("unet")
  config.model.image.latent_size = 16
  config.model.image.patch_size = patch_size
  config.model.image.unet_channels = (8, 8, 8, 8)
  model = transfusion.Transfusion(config.model)
  n = (16 // patch_size) ** 2
  length = n + 6
  tokens = np.zeros((1, length), np.int32)
  idx = np.full((1, length), -1, np.int32)
  idx[0, 2:2 + n] = 0
  seg = np.ones((1, length), np.int32)
  pos = np.arange(length, dtype=np.int32)[None]
  latents = np.ones((1, 1, 16, 16, 2), np.float32)
  init = jax.jit(functools.partial(model.init_with_output, jax.random.PRNGKey(0)))
  (logits, pred), _ = init(tokens, pos, seg, idx, latents, jnp.zeros((1, 1)))
  assert logits.shape == (1, length, 100) and pred.shape == (1, 1, 16, 16, 2)
  assert np.isfinite(pred).all()


def test_rows_without_images_or_text_give_finite_loss(linear_setup):
  _, params, batch, _, loss_fn = linear_setup
  no_images = {k: np.array(v) for k, v in batch.items()}
  no_images["image_mask"][:] = False
  no_images["image_index"][:] = -1
  loss, metrics = loss_fn(params, no_images, jax.random.PRNGKey(0))
  assert np.isfinite(loss) and metrics["images"] == 0 and metrics["image_loss"] == 0
  no_text = {k: np.array(v) for k, v in batch.items()}
  no_text["text_loss_mask"][:] = False
  loss, metrics = loss_fn(params, no_text, jax.random.PRNGKey(0))
  assert np.isfinite(loss) and metrics["text_tokens"] == 0 and metrics["text_loss"] == 0


def test_grouped_query_attention_and_tied_embeddings_run():
  config = _config(num_kv_heads=2, tie_embeddings=True, qk_norm=True)
  _, params, batch, _, loss_fn = _setup(config)
  assert "lm_head" not in params["params"]
  k_kernel = params["params"]["trunk"]["layers"]["attn"]["k"]["kernel"].value
  assert k_kernel.shape[2] == 2  # [layers, embed, kv_heads, head_dim]
  assert np.isfinite(loss_fn(params, batch, jax.random.PRNGKey(0))[0])


def test_the_loss_goes_down_with_training():
  config = _config()
  model, params, batch, _, _ = _setup(config)
  loss_fn = losses.make_loss_fn(model, diffusion.from_config(config))

  @jax.jit
  def step(p, i):
    (loss, _), g = jax.value_and_grad(loss_fn, has_aux=True)(p, batch, jax.random.PRNGKey(i % 4))
    return jax.tree.map(lambda a, b: a - 0.05 * b, p, g), loss

  first = None
  for i in range(60):
    params, loss = step(params, i)
    first = loss if first is None else first
  assert float(loss) < 0.7 * float(first)


class TestBadBatches:
  """A batch that breaks the contract fails naming the key, not with a silent NaN."""

  def _batch(self):
    img = _config().model.image
    batch, _ = layouts.random_batch(np.random.default_rng(5), 2, 40, 3, (4, 4, 2), 2)
    while not batch["image_mask"].any():
      batch, _ = layouts.random_batch(np.random.default_rng(6), 2, 40, 3, (4, 4, 2), 2)
    del img
    return batch

  def test_wrong_dtype(self, linear_setup):
    _, params, _, _, loss_fn = linear_setup
    batch = self._batch()
    batch["tokens"] = batch["tokens"].astype(np.float32)
    with pytest.raises(batch_lib.BatchContractError, match="tokens"):
      loss_fn(params, batch, jax.random.PRNGKey(0))

  def test_wrong_shape(self, linear_setup):
    _, params, _, _, loss_fn = linear_setup
    batch = self._batch()
    batch["positions"] = batch["positions"][:, :-1]
    with pytest.raises(batch_lib.BatchContractError, match="positions"):
      loss_fn(params, batch, jax.random.PRNGKey(0))

  def test_wrong_latent_shape(self, linear_setup):
    _, params, _, _, loss_fn = linear_setup
    batch = self._batch()
    batch["images"] = np.zeros((2, 3, 8, 8, 2), np.float32)
    with pytest.raises(batch_lib.BatchContractError, match="images"):
      loss_fn(params, batch, jax.random.PRNGKey(0))

  def test_image_index_pointing_at_empty_slot(self):
    batch = self._batch()
    row, slot = np.argwhere(batch["image_mask"])[0]
    batch["image_mask"][row, slot] = False
    with pytest.raises(batch_lib.BatchContractError, match="empty slot"):
      batch_lib.check_batch_values(batch, num_patches=4)

  def test_span_that_does_not_match_the_image_size(self):
    batch = self._batch()
    with pytest.raises(batch_lib.BatchContractError, match="image_index.*9 patches"):
      batch_lib.check_batch_values(batch, num_patches=9)

  def test_nan_latents(self):
    batch = self._batch()
    row, slot = np.argwhere(batch["image_mask"])[0]
    batch["images"][row, slot, 0, 0, 0] = np.nan
    with pytest.raises(batch_lib.BatchContractError, match="NaN"):
      batch_lib.check_batch_values(batch, num_patches=4)

  def test_valid_random_batches_pass(self):
    for seed in range(10):
      batch, _ = layouts.random_batch(np.random.default_rng(seed), 3, 40, 3, (4, 4, 2), 2)
      batch_lib.check_batch_values(batch, num_patches=4)
