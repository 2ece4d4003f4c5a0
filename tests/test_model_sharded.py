"""Forward and backward jitted on 8 fake CPU devices, parameters sharded by the logical rules."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

import layouts
from tfusion import configlib, diffusion, losses, sharding
from tfusion.model import transfusion


def test_sharded_loss_and_grads_match_single_device():
  assert len(jax.devices()) == 8, "conftest sets 8 fake CPU devices"
  config = configlib.base_config()
  config.model.vocab_size = 128
  config.model.num_kv_heads = 2
  mesh = sharding.make_mesh(dict(data=2, fsdp=2, tensor=2))
  model = transfusion.Transfusion(config.model)
  img = config.model.image
  batch, _ = layouts.random_batch(np.random.default_rng(0), 4, 64, 2,
                                  (img.latent_size, img.latent_size, img.latent_channels),
                                  img.patch_size, vocab_size=128)
  init_args = (batch["tokens"], batch["positions"], batch["segment_ids"], batch["image_index"],
               batch["images"], jnp.zeros((4, 2)))
  abstract = jax.eval_shape(model.init, jax.random.PRNGKey(0), *init_args)
  param_shardings = sharding.logical_to_sharding(nn.get_partition_spec(abstract), mesh)
  loss_fn = losses.make_loss_fn(model, diffusion.from_config(config))
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  with mesh, nn.logical_axis_rules(sharding.LOGICAL_RULES):
    params = jax.jit(model.init, out_shardings=param_shardings)(jax.random.PRNGKey(0), *init_args)
    kernel = params["params"]["trunk"]["layers"]["mlp"]["gate"]["kernel"].value
    # [layers, embed, mlp]: embed over fsdp, mlp over tensor.
    assert kernel.sharding.spec == PartitionSpec(None, "fsdp", "tensor")
    assert kernel.addressable_shards[0].data.shape == (2, 32, 96)
    batch_sharded = jax.device_put(batch, sharding.batch_sharding(mesh))
    (loss, _), grads = jax.jit(grad_fn, out_shardings=((None, None), param_shardings))(
        params, batch_sharded, jax.random.PRNGKey(1))
  assert grads["params"]["lm_head"]["kernel"].value.sharding.spec == PartitionSpec("fsdp", "tensor")

  single = jax.device_put(params, jax.devices()[0])
  (loss_1, _), grads_1 = jax.jit(grad_fn)(single, batch, jax.random.PRNGKey(1))
  np.testing.assert_allclose(loss, loss_1, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_1)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=1e-4)
