"""Device mesh and the one table that maps logical axis names to mesh axes.

Parameters and key activations carry logical names (tfusion/model/); `LOGICAL_RULES` maps them
onto the mesh ('data', 'fsdp', 'tensor'). Changing the parallelism is a config edit of
`config.mesh` — nothing else moves.
"""

import math

import flax.linen as nn
import jax
import jax.experimental.mesh_utils
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

# First matching rule whose mesh axes are still free wins (flax semantics), so an activation
# [batch, length, embed] is sharded over (data, fsdp) on batch and replicated on embed.
LOGICAL_RULES = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("vocab", "tensor"),
    ("length", None),
    ("head_dim", None),
    ("layers", None),
    ("norm", None),
    ("patches", None),
    ("patch_dim", None),
    ("embed_out", None),
    ("conv_h", None),
    ("conv_w", None),
    ("conv_in", None),
    ("conv_out", None),
)


def mesh_shape(mesh_config, num_devices):
  """Resolves sizes {data, fsdp, tensor} (one may be -1: fills the rest) for `num_devices`."""
  sizes = [int(mesh_config[a]) for a in MESH_AXES]
  fill = [i for i, s in enumerate(sizes) if s == -1]
  if len(fill) > 1:
    raise ValueError(f"config.mesh: only one axis may be -1, got {dict(zip(MESH_AXES, sizes))}")
  if any(s == 0 or s < -1 for s in sizes):
    raise ValueError(f"config.mesh: sizes must be positive or -1, got {dict(zip(MESH_AXES, sizes))}")
  known = math.prod(s for s in sizes if s != -1)
  if fill:
    if num_devices % known:
      raise ValueError(f"config.mesh {dict(zip(MESH_AXES, sizes))}: the fixed axes ({known} "
                       f"devices) do not divide the {num_devices} available devices")
    sizes[fill[0]] = num_devices // known
  if math.prod(sizes) != num_devices:
    raise ValueError(f"config.mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} "
                     f"devices but {num_devices} are available")
  return tuple(sizes)


def make_mesh(mesh_config, devices=None):
  """Builds a Mesh with axes ('data', 'fsdp', 'tensor') from `config.mesh`."""
  devices = jax.devices() if devices is None else devices
  shape = mesh_shape(mesh_config, len(devices))
  try:
    device_array = jax.experimental.mesh_utils.create_device_mesh(shape, devices=devices)
  except Exception:  # unusual topologies: fall back to the given order
    device_array = np.asarray(devices).reshape(shape)
  return Mesh(device_array, MESH_AXES)


def logical_to_sharding(logical_tree, mesh, rules=LOGICAL_RULES):
  """Maps a pytree of logical PartitionSpecs (from nn.get_partition_spec) to NamedShardings."""
  specs = nn.logical_to_mesh(logical_tree, rules)
  return jax.tree.map(lambda s: NamedSharding(mesh, s), specs,
                      is_leaf=lambda x: isinstance(x, PartitionSpec))


def batch_sharding(mesh):
  """Sharding of a [B, ...] batch array: B over ('data', 'fsdp')."""
  return NamedSharding(mesh, PartitionSpec(("data", "fsdp")))


def process_rows(mesh, global_batch):
  """Rows [start, start + count) of the global batch whose shards live on this process.

  The training job reads exactly these rows on this process. Raises when the global batch does
  not divide the batch axes or this process's rows are not one contiguous block.
  """
  batch_devices = mesh.shape["data"] * mesh.shape["fsdp"]
  if global_batch % batch_devices:
    raise ValueError(f"config.data.batch_size={global_batch} is not divisible by the mesh's "
                     f"batch axes data x fsdp = {mesh.shape['data']} x {mesh.shape['fsdp']}")
  index_map = batch_sharding(mesh).addressable_devices_indices_map((global_batch,))
  rows = sorted({r for idx in index_map.values() for r in range(*idx[0].indices(global_batch))})
  if rows != list(range(rows[0], rows[0] + len(rows))):
    raise ValueError("this process's batch rows are not contiguous on the mesh; order the "
                     "devices so each process holds a contiguous block of the batch axes")
  return rows[0], len(rows)


def global_batch_from_local(mesh, local_batch, global_batch):
  """Assembles global jax arrays [global_batch, ...] from this process's rows (numpy)."""
  shard = batch_sharding(mesh)

  def build(x):
    return jax.make_array_from_process_local_data(shard, x, (global_batch,) + x.shape[1:])

  return jax.tree.map(build, local_batch)
