"""Device mesh, the one table that maps logical axis names to mesh axes, and per-host rows.

Parameters and key activations carry logical names (tfusion/model/); `LOGICAL_RULES` maps them
onto the mesh ('data', 'fsdp', 'tensor'). Changing the parallelism is a config edit of
`config.mesh` — nothing else moves.

Feeding a pod: the batch axis [B] is split into `data x fsdp` blocks in mesh order. On TPU
pods `create_device_mesh` orders devices physically, so the blocks a host holds are in general
not one contiguous range of rows. Each host nevertheless reads one contiguous *logical* range
(`process_rows`: its data shard), and `global_batch_from_local` puts those rows on the blocks
its devices hold; the global batch is then a permutation of the logical one, which the loss
(sums over rows) does not see. Hosts whose devices hold the same blocks (tensor axis across
hosts) form one data shard and read the same rows (`data_shard`).
"""

import math

import jax
import jax.experimental.mesh_utils
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")
DCN_KEYS = ("dcn_data", "dcn_fsdp")  # slices (or hosts) along data / fsdp; tensor stays in ICI

# For each logical name, the first rule whose mesh axes are still free (and, when the shape is
# known, divide that dimension) wins: an activation [batch, length, embed] is sharded over
# (data, fsdp) on batch and replicated on embed; a conv kernel [h, w, in, out] puts fsdp on
# `out` when it divides, else on `in`.
LOGICAL_RULES = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("vocab", "tensor"),
    ("conv_out", "fsdp"),
    ("conv_in", "fsdp"),
    ("length", None),
    ("head_dim", None),
    ("layers", None),
    ("norm", None),
    ("patches", None),
    ("patch_dim", None),
    ("embed_out", None),
    ("conv_h", None),
    ("conv_w", None),
)


def _as_dict(mesh_config):
  get = mesh_config.get if hasattr(mesh_config, "get") else lambda k, d: getattr(mesh_config, k, d)
  out = {a: int(mesh_config[a]) for a in MESH_AXES}
  out.update({k: int(get(k, 1)) for k in DCN_KEYS})
  return out


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


def _num_slices(devices):
  return len({getattr(d, "slice_index", 0) for d in devices})


def make_mesh(mesh_config, devices=None):
  """Builds a Mesh with axes ('data', 'fsdp', 'tensor') from `config.mesh`.

  Sizes are totals over all devices. With several TPU slices (or dcn_* > 1), the mesh is
  hybrid: `dcn_data x dcn_fsdp` granules (slices; hosts where devices carry no slice_index)
  over DCN, the rest inside each granule over ICI. With several slices and no dcn_* set, data
  parallelism spans the slices (dcn_data = number of slices), so FSDP stays inside a slice.
  """
  devices = jax.devices() if devices is None else list(devices)
  cfg = _as_dict(mesh_config)
  shape = mesh_shape(cfg, len(devices))
  dcn = [cfg["dcn_data"], cfg["dcn_fsdp"], 1]
  slices = _num_slices(devices)
  if math.prod(dcn) == 1 and slices > 1:
    dcn[0] = slices
  if math.prod(dcn) > 1:
    for axis, total, outer in zip(MESH_AXES, shape, dcn):
      if total % outer:
        raise ValueError(f"config.mesh: {axis}={total} cannot span dcn_{axis}={outer} slices "
                         f"(the devices span {slices}); make {axis} a multiple of {outer} or "
                         "set config.mesh.dcn_data / dcn_fsdp")
    ici = [s // o for s, o in zip(shape, dcn)]
    by_process = slices == 1  # no slices: hosts are the DCN granules (GPU clusters)
    granules = len({d.process_index for d in devices}) if by_process else slices
    if math.prod(dcn) != granules:
      kind = "processes" if by_process else "slices"
      raise ValueError(f"config.mesh: dcn_data x dcn_fsdp = {dcn[0]} x {dcn[1]} must equal the "
                       f"{granules} {kind} the devices span")
    device_array = jax.experimental.mesh_utils.create_hybrid_device_mesh(
        ici, dcn, devices, process_is_granule=by_process, allow_split_physical_axes=True)
    return Mesh(device_array, MESH_AXES)
  try:
    device_array = jax.experimental.mesh_utils.create_device_mesh(
        shape, devices=devices, allow_split_physical_axes=True)
  except Exception:  # unusual topologies: fall back to the given order
    device_array = np.asarray(devices).reshape(shape)
  return Mesh(device_array, MESH_AXES)


# ------------------------------------------------------------------------ logical -> mesh


def spec_for(names, shape, mesh, rules=LOGICAL_RULES):
  """PartitionSpec of one array from its logical `names` (and `shape`, or None).

  Flax's semantics (first rule with free mesh axes wins) plus, when `shape` is given, a rule
  whose mesh axes do not divide the dimension is skipped (jit shardings must divide evenly),
  so a small leaf falls back to the next rule for its name or to replication.
  """
  result = [None] * len(names)
  assigned = [False] * len(names)
  used = set()
  for logical, mesh_axes in rules:
    if logical not in names:
      continue
    pos = names.index(logical)
    axes = () if mesh_axes is None else (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes)
    if assigned[pos] or used & set(axes):
      continue
    if shape is not None and shape[pos] % math.prod(mesh.shape[a] for a in axes):
      continue
    result[pos], assigned[pos] = mesh_axes, True
    used |= set(axes)
  return PartitionSpec(*result)


def logical_to_sharding(logical_tree, mesh, rules=LOGICAL_RULES, shapes=None):
  """Maps a pytree of logical PartitionSpecs (from nn.get_partition_spec) to NamedShardings.

  `shapes` (a matching pytree of arrays / ShapeDtypeStructs) enables the divisibility check.
  """
  is_spec = lambda x: isinstance(x, PartitionSpec)
  specs, treedef = jax.tree.flatten(logical_tree, is_leaf=is_spec)
  shape_list = [None] * len(specs) if shapes is None else [x.shape for x in jax.tree.leaves(shapes)]
  if len(shape_list) != len(specs):
    raise ValueError(f"{len(shape_list)} shapes for {len(specs)} logical specs")
  out = [NamedSharding(mesh, spec_for(tuple(s), shp, mesh, rules)) for s, shp in zip(specs, shape_list)]
  return jax.tree.unflatten(treedef, out)


def batch_sharding(mesh):
  """Sharding of a [B, ...] batch array: B over ('data', 'fsdp')."""
  return NamedSharding(mesh, PartitionSpec(("data", "fsdp")))


# ----------------------------------------------------------------------------- host rows


def batch_blocks(mesh):
  """{process_index: sorted tuple of the batch blocks its devices hold}.

  Block b (of data x fsdp blocks) is rows [b * B / n, (b + 1) * B / n) of a global batch B.
  """
  grid = np.transpose(mesh.devices, [mesh.axis_names.index(a) for a in MESH_AXES])
  d, f, t = grid.shape
  blocks = {}
  for (i, j, _), dev in np.ndenumerate(grid):
    blocks.setdefault(dev.process_index, set()).add(i * f + j)
  return {p: tuple(sorted(b)) for p, b in blocks.items()}


def data_shards(mesh):
  """The distinct block sets hosts hold, ordered by their lowest process index.

  Raises (one line) when the mesh cannot be fed: hosts' block sets overlap without being equal,
  or differ in size.
  """
  by_process = batch_blocks(mesh)
  shards = []
  for p in sorted(by_process):
    if by_process[p] not in shards:
      shards.append(by_process[p])
  seen = {}
  for shard in shards:
    for b in shard:
      if b in seen:
        raise ValueError(f"mesh {dict(mesh.shape)} cannot be fed: batch block {b} lives on hosts "
                         "that hold different blocks; put the tensor axis inside one host")
      seen[b] = shard
  if len({len(s) for s in shards}) != 1:
    raise ValueError(f"mesh {dict(mesh.shape)} cannot be fed: hosts hold unequal numbers of "
                     f"batch blocks {sorted({len(s) for s in shards})}")
  return shards


def data_shard(mesh, process_index=None):
  """(index, count) of the data shard this process reads (= process index / count when hosts
  hold disjoint blocks; hosts that are replicas on the batch share one shard)."""
  p = jax.process_index() if process_index is None else process_index
  shards = data_shards(mesh)
  return shards.index(batch_blocks(mesh)[p]), len(shards)


def process_rows(mesh, global_batch, process_index=None):
  """Rows [start, start + count) of the *logical* global batch that this process reads.

  Every process of a data shard reads the same rows; shards split the batch in order. Raises
  when the global batch does not divide the batch axes or the mesh cannot be fed.
  """
  batch_devices = mesh.shape["data"] * mesh.shape["fsdp"]
  if global_batch % batch_devices:
    raise ValueError(f"config.data.batch_size={global_batch} is not divisible by the mesh's "
                     f"batch axes data x fsdp = {mesh.shape['data']} x {mesh.shape['fsdp']}")
  index, count = data_shard(mesh, process_index)
  rows = global_batch // count
  return index * rows, rows


def device_rows(mesh, global_batch, process_index=None):
  """The global rows this process's devices hold, sorted: where `global_batch_from_local` puts
  its local rows 0, 1, ... (jax.make_array_from_process_local_data's placement)."""
  p = jax.process_index() if process_index is None else process_index
  per_block = global_batch // (mesh.shape["data"] * mesh.shape["fsdp"])
  return [b * per_block + r for b in batch_blocks(mesh)[p] for r in range(per_block)]


def global_batch_from_local(mesh, local_batch, global_batch):
  """Assembles global jax arrays [global_batch, ...] from this process's rows (numpy).

  Local row i lands on global row `device_rows(mesh, global_batch)[i]`.
  """
  shard = batch_sharding(mesh)

  def build(x):
    return jax.make_array_from_process_local_data(shard, x, (global_batch,) + x.shape[1:])

  return jax.tree.map(build, local_batch)
