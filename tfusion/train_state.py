"""The train state {params, opt_state, step[, ema_params]} and its shardings, created sharded.

`ema_params` (an exponential moving average of the params, tfusion/ema.py) is present only
when config.train.ema_decay > 0; it is sharded like the params.

Parameter shardings come from the logical axis names in the model and the table in
tfusion/sharding.py; optimizer moments follow their parameters. Initialising under jit with
those out_shardings means no device ever holds the full model.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec

from tfusion import ema, optim, sharding
from tfusion.model import transfusion


def build_model(config):
  return transfusion.Transfusion(config.model)


def dummy_inputs(model_config, batch=1):
  """Smallest inputs that trace every parameter (one image slot, one image span)."""
  img = model_config.image
  n = (img.latent_size // img.patch_size) ** 2
  length = n + 2
  tokens = jnp.zeros((batch, length), jnp.int32)
  index = jnp.concatenate([jnp.full((batch, 1), -1), jnp.zeros((batch, n)),
                           jnp.full((batch, 1), -1)], axis=1).astype(jnp.int32)
  latents = jnp.zeros((batch, 1, img.latent_size, img.latent_size, img.latent_channels))
  return tokens, tokens, tokens + 1, index, latents, jnp.zeros((batch, 1))


def _init_fn(config):
  model = build_model(config)
  tx, _ = optim.make_optimizer(config.optim)

  def init(rng):
    params = nn.meta.unbox(model.init(rng, *dummy_inputs(config.model)))
    state = {"params": params, "opt_state": tx.init(params), "step": jnp.zeros((), jnp.int32)}
    if ema.enabled(config):
      state[ema.KEY] = ema.init(params)
    return state

  return init


def _abstract_params(config):
  """(boxed, unboxed) ShapeDtypeStructs of the model's variables {"params": ...}."""
  model = build_model(config)
  boxed = jax.eval_shape(model.init, jax.random.PRNGKey(0), *dummy_inputs(config.model))
  return boxed, nn.meta.unbox(boxed)


def param_shardings(config, mesh, abstract=None):
  """NamedShardings of the model's variables {"params": ...} on `mesh` (the logical rules);
  `abstract`: _abstract_params(config) when the caller has it already."""
  boxed, abstract_params = abstract or _abstract_params(config)
  # With shapes, a mesh axis that does not divide a dimension falls back to the next rule.
  return sharding.logical_to_sharding(nn.get_partition_spec(boxed), mesh, shapes=abstract_params)


def state_shardings(config, mesh):
  """NamedShardings of the train state, from the model's logical axis names."""
  tx, _ = optim.make_optimizer(config.optim)
  abstract = _abstract_params(config)
  abstract_params = abstract[1]
  shardings = param_shardings(config, mesh, abstract)
  abstract_opt = jax.eval_shape(tx.init, abstract_params)
  replicated = NamedSharding(mesh, PartitionSpec())

  # Optimizer leaves shaped like a parameter take its sharding (Adam moments); others replicate.
  flat_params, _ = jax.tree.flatten_with_path(abstract_params)
  by_suffix = {}
  for path, leaf in flat_params:
    by_suffix[_path_key(path)] = leaf.shape
  flat_shard = dict(zip([_path_key(p) for p, _ in flat_params], jax.tree.leaves(shardings)))

  def opt_sharding(path, leaf):
    key = _path_key(path)
    for pkey, shard in flat_shard.items():
      if key.endswith(pkey) and by_suffix[pkey] == leaf.shape:
        return shard
    return replicated

  opt_shardings = jax.tree.map_with_path(opt_sharding, abstract_opt)
  out = {"params": shardings, "opt_state": opt_shardings, "step": replicated}
  if ema.enabled(config):
    out[ema.KEY] = shardings
  return out


def _path_key(path):
  return "/".join(str(getattr(p, "key", getattr(p, "name", getattr(p, "idx", p)))) for p in path)


def abstract_state(config, mesh):
  """ShapeDtypeStructs of the train state carrying their shardings (for restore)."""
  shapes = jax.eval_shape(_init_fn(config), jax.random.PRNGKey(0))
  shardings = state_shardings(config, mesh)
  return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                      shapes, shardings)


def init_state(config, mesh, rng):
  """A freshly initialised train state, each array created directly with its sharding."""
  shardings = state_shardings(config, mesh)
  # No mesh context: parameter placement comes from out_shardings alone (the logical
  # constraints inside the scanned init would otherwise see per-layer shapes).
  return jax.jit(_init_fn(config), out_shardings=shardings)(rng)


def param_count(state_or_params):
  params = state_or_params.get("params", state_or_params)
  return sum(x.size for x in jax.tree.leaves(params))
