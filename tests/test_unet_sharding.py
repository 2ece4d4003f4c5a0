"""Under FSDP no large leaf of the train state is replicated (U-Net convs included).

Abstract only: jax.eval_shape of the state and its shardings on 8 fake devices, no compile.
"""

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec

from tfusion import configlib, sharding, train_state

MIB = 2 ** 20


def _unet_config():
  config = configlib.base_config()
  m = config.model
  m.d_model, m.num_heads, m.head_dim, m.mlp_dim, m.vocab_size = 256, 4, 64, 768, 1024
  m.image.encoder = "unet"
  m.image.latent_size, m.image.latent_channels, m.image.patch_size = 16, 4, 4
  m.image.unet_channels = (192, 384, 512)  # 3x3x384x512 fp32 convs: 6.75 MiB
  m.image.unet_blocks_per_level = 1
  return config


def _mesh_axes(spec):
  axes = set()
  for entry in spec:
    axes.update([entry] if isinstance(entry, str) else entry or ())
  return axes


@pytest.mark.parametrize("mesh_config", [dict(data=1, fsdp=8, tensor=1),
                                         dict(data=2, fsdp=4, tensor=1),
                                         dict(data=1, fsdp=4, tensor=2)])
def test_no_leaf_over_1mib_is_replicated_under_fsdp(mesh_config):
  config = _unet_config()
  mesh = sharding.make_mesh(mesh_config)
  state = train_state.abstract_state(config, mesh)
  big = {jax.tree_util.keystr(path): leaf for path, leaf in jax.tree.leaves_with_path(state)
         if leaf.size * leaf.dtype.itemsize > MIB}
  assert any("conv" in k for k in big) and any("opt_state" in k for k in big)
  replicated = [k for k, leaf in big.items() if "fsdp" not in _mesh_axes(leaf.sharding.spec)]
  assert not replicated, f"replicated under fsdp: {replicated}"
  # What a device holds of the largest leaves is 1/fsdp of them (or less).
  for k, leaf in big.items():
    assert np.prod(leaf.sharding.shard_shape(leaf.shape)) * mesh.shape["fsdp"] <= leaf.size, k


def test_conv_kernel_falls_back_to_conv_in_when_conv_out_does_not_divide():
  mesh = sharding.make_mesh(dict(data=1, fsdp=8, tensor=1))
  names = ("conv_h", "conv_w", "conv_in", "conv_out")
  assert sharding.spec_for(names, (3, 3, 64, 128), mesh) == PartitionSpec(None, None, None, "fsdp")
  # The U-Net's last conv maps to the latent channels (4): fsdp goes on its input channels.
  assert sharding.spec_for(names, (3, 3, 64, 4), mesh) == PartitionSpec(None, None, "fsdp", None)
  assert sharding.spec_for(names, (3, 3, 4, 4), mesh) == PartitionSpec(None, None, None, None)
  # Without a shape the rules apply as flax's (no divisibility check).
  assert sharding.spec_for(names, None, mesh) == PartitionSpec(None, None, None, "fsdp")
