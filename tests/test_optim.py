"""Optimizer: the paper's schedule and which parameters get weight decay."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tfusion import configlib, optim, train_state


def test_warmup_then_cosine_to_the_floor():
  c = configlib.base_config().optim  # paper: 3e-4, 4000 warmup, cosine to 1.5e-5
  schedule = optim.learning_rate_schedule(c)
  assert float(schedule(0)) == 0.0
  np.testing.assert_allclose(schedule(2000), 1.5e-4, rtol=1e-6)
  np.testing.assert_allclose(schedule(4000), 3e-4, rtol=1e-6)
  mid = 4000 + (250_000 - 4000) // 2
  np.testing.assert_allclose(schedule(mid), 1.5e-5 + (3e-4 - 1.5e-5) / 2, rtol=1e-3)
  np.testing.assert_allclose(schedule(250_000), 1.5e-5, rtol=1e-6)
  np.testing.assert_allclose(schedule(400_000), 1.5e-5, rtol=1e-6)


def test_weight_decay_skips_norms_biases_and_embeddings():
  config = configlib.base_config()
  params = jax.eval_shape(lambda: train_state._init_fn(config)(jax.random.PRNGKey(0)))["params"]
  mask = optim.weight_decay_mask(params)["params"]
  assert mask["trunk"]["layers"]["mlp"]["gate"]["kernel"] is True
  assert mask["lm_head"]["kernel"] is True
  assert mask["trunk"]["layers"]["attn_norm"]["scale"] is False
  assert mask["embedding"]["embedding"] is False
  assert mask["image_in"]["proj"]["bias"] is False


def test_adamw_with_decay_mask_and_clipping_updates_as_expected():
  config = configlib.base_config()
  config.optim.update(dict(warmup_steps=1, decay_steps=10, lr=0.1, grad_clip=1.0,
                           weight_decay=0.5))
  tx, _ = optim.make_optimizer(config.optim)
  params = {"w": {"kernel": jnp.ones(4)}, "n": {"scale": jnp.ones(4)}}
  state = tx.init(params)
  grads = {"w": {"kernel": jnp.full(4, 100.0)}, "n": {"scale": jnp.zeros(4)}}
  state_1 = tx.update(grads, state, params)[1]  # step 0 has lr 0
  updates, _ = tx.update(grads, state_1, params)
  # Norm scale: zero gradient, no decay -> unchanged. Kernel: Adam step + decay.
  np.testing.assert_allclose(updates["n"]["scale"], 0.0)
  assert np.all(np.asarray(updates["w"]["kernel"]) < -0.1)


def test_decay_steps_must_exceed_warmup():
  c = configlib.base_config().optim
  c.decay_steps = 100
  with pytest.raises(ValueError, match="config.optim.decay_steps"):
    optim.learning_rate_schedule(c)
