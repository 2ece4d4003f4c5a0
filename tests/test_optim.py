"""Optimizer: the paper's schedule and which parameters get weight decay."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
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


def _adam_first_moment(state):
  """The `mu` of the one ScaleByAdamState inside an optax chain's state."""
  found = [s.mu for s in jax.tree.leaves(
      state, is_leaf=lambda x: isinstance(x, optax.ScaleByAdamState))
           if isinstance(s, optax.ScaleByAdamState)]
  assert len(found) == 1, state
  return found[0]


@pytest.mark.parametrize("grad_clip", [1.0, 0.0])
def test_gradients_are_clipped_by_global_norm_before_adam(grad_clip):
  """Adam's update hardly depends on the gradient's scale, so look inside it: after one step
  its first moment is (1 - b1) * the gradient it was given, i.e. the clipped one."""
  config = configlib.base_config()
  config.optim.update(dict(warmup_steps=1, decay_steps=10, lr=0.1, grad_clip=grad_clip))
  tx, _ = optim.make_optimizer(config.optim)
  params = {"w": {"kernel": jnp.ones(4)}, "n": {"scale": jnp.ones(3)}}
  grads = {"w": {"kernel": jnp.array([30.0, 0.0, -40.0, 0.0])}, "n": {"scale": jnp.zeros(3)}}
  _, state = tx.update(grads, tx.init(params), params)
  mu = _adam_first_moment(state)
  norm = 50.0  # global norm of grads
  scale = grad_clip / norm if grad_clip else 1.0
  np.testing.assert_allclose(mu["w"]["kernel"], (1 - config.optim.b1) * scale *
                             np.array([30.0, 0.0, -40.0, 0.0]), rtol=1e-6)
  np.testing.assert_allclose(mu["n"]["scale"], 0.0)
  # A gradient already inside the bound is left alone.
  small = jax.tree.map(lambda g: g / 100.0, grads)
  mu_small = _adam_first_moment(tx.update(small, tx.init(params), params)[1])
  np.testing.assert_allclose(mu_small["w"]["kernel"], (1 - config.optim.b1) *
                             np.array([0.3, 0.0, -0.4, 0.0]), rtol=1e-6)


def test_adamw_with_decay_mask_updates_as_expected():
  """Step 1 of lr 0.1, weight decay 0.5: a zero-gradient norm scale (no decay) stays put; a
  kernel moves by lr * (Adam's bias-corrected step + decay * param)."""
  config = configlib.base_config()
  config.optim.update(dict(warmup_steps=1, decay_steps=10, lr=0.1, grad_clip=1.0,
                           weight_decay=0.5))
  tx, schedule = optim.make_optimizer(config.optim)
  params = {"w": {"kernel": jnp.ones(4)}, "n": {"scale": jnp.ones(4)}}
  state = tx.init(params)
  grads = {"w": {"kernel": jnp.full(4, 100.0)}, "n": {"scale": jnp.zeros(4)}}
  state_1 = tx.update(grads, state, params)[1]  # step 0 has lr 0
  updates, _ = tx.update(grads, state_1, params)
  np.testing.assert_allclose(updates["n"]["scale"], 0.0)
  # Two equal (clipped) gradients: bias-corrected mu / sqrt(nu) = sign(g) = 1 (up to eps).
  lr = float(schedule(1))
  np.testing.assert_allclose(updates["w"]["kernel"], -lr * (1.0 + 0.5 * 1.0), rtol=1e-5)


def test_decay_steps_must_exceed_warmup():
  c = configlib.base_config().optim
  c.decay_steps = 100
  with pytest.raises(ValueError, match="config.optim.decay_steps"):
    optim.learning_rate_schedule(c)
