"""Named remat policies keep what they say (q/k/v, the attention context, nothing) and change
no numbers."""

import contextlib
import io

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.ad_checkpoint import print_saved_residuals

from tfusion import configlib
from tfusion.model import layers, remat


def _block_and_inputs():
  cfg = configlib.model_config()
  block = layers.Block(cfg)
  b, length = 2, 16
  x = jax.random.normal(jax.random.PRNGKey(0), (b, length, cfg.d_model))
  positions = jnp.broadcast_to(jnp.arange(length), (b, length))
  mask = jnp.tril(jnp.ones((b, length, length), bool))
  params = block.init(jax.random.PRNGKey(1), x, positions, mask, None, None)
  f = lambda p, x: block.apply(p, x, positions, mask, None, None)[0].sum()
  return f, params, x


def saved_residuals(f, *args):
  """Lines of jax's print_saved_residuals: one per residual, with its checkpoint name if any."""
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    print_saved_residuals(f, *args)
  return [(None, line) for line in out.getvalue().splitlines() if line.strip()]


def _saved_names(policy_name):
  f, params, x = _block_and_inputs()
  g = jax.checkpoint(f, policy=remat.policy(policy_name))
  return {name for name in remat.QKV + (remat.ATTN_CONTEXT,)
          if any(f"'{name}'" in desc for _, desc in saved_residuals(g, params, x))}


def test_policies_save_what_they_name():
  assert _saved_names("qkv") == set(remat.QKV)
  assert _saved_names("qkv_attn") == set(remat.QKV) | {remat.ATTN_CONTEXT}
  assert _saved_names("full") == set()
  f, params, x = _block_and_inputs()
  count = lambda p: len(saved_residuals(jax.checkpoint(f, policy=remat.policy(p)), params, x))
  assert count("full") < count("qkv") < count("qkv_attn") < count("minimal")
  with pytest.raises(ValueError, match="config.model.remat must be one of"):
    remat.policy("everything")


@pytest.mark.parametrize("policy", ["qkv", "minimal"])
def test_remat_changes_no_gradients(policy):
  f, params, x = _block_and_inputs()
  base = jax.grad(f)(params, x)
  got = jax.grad(jax.checkpoint(f, policy=remat.policy(policy)))(params, x)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(base)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
