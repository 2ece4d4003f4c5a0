"""Every host of a TPU pod is fed exactly its rows, for the meshes users pick.

Deviceless: libtpu's compile-only topologies give the devices (with their process_index) of
real slices; building meshes and index maps needs no compile (seconds).
"""

import math

import numpy as np
import pytest
from jax.sharding import Mesh

from tfusion import aot, sharding

pytest.importorskip("libtpu", reason="needs libtpu for deviceless TPU topologies")

TOPOLOGIES = [("v5e:4x4", 1), ("v5e:8x8", 1), ("v4:2x2x4", 1), ("v4:4x4x4", 1),
              ("v5p:4x4x8", 1), ("v6e:4x4", 1), ("v5e:4x4", 2), ("v5p-32", 2)]
MESHES = [dict(data=1, fsdp=-1, tensor=1), dict(data=-1, fsdp=1, tensor=1),
          dict(data=-1, fsdp=4, tensor=1), dict(data=-1, fsdp=8, tensor=2),
          dict(data=-1, fsdp=1, tensor=8)]
_devices = {}


def _topology(name, slices):
  if (name, slices) not in _devices:
    _devices[name, slices] = aot.tpu_devices(name, slices)
  return _devices[name, slices]


def check_feeding(mesh, global_batch):
  """Every process's local rows land on the rows its devices hold (jax's placement), processes
  of one data shard read the same logical rows, and shards cover the batch exactly once."""
  index_map = sharding.batch_sharding(mesh).devices_indices_map((global_batch,))
  held = {}
  for device, index in index_map.items():
    held.setdefault(device.process_index, set()).update(range(*index[0].indices(global_batch)))
  logical = {}
  for p, rows in held.items():
    assert sharding.device_rows(mesh, global_batch, p) == sorted(rows), p
    start, count = sharding.process_rows(mesh, global_batch, p)
    assert count == len(rows), p  # exactly as many rows as its devices hold
    logical.setdefault(sharding.data_shard(mesh, p), (start, count))
  # Shards' logical row ranges tile [0, B); processes sharing a shard hold the same rows.
  ranges = sorted(logical.values())
  assert [r for s, c in ranges for r in range(s, s + c)] == list(range(global_batch))
  physical = {}
  for p, rows in held.items():
    physical.setdefault(sharding.data_shard(mesh, p), set()).update(rows)
  assert sum(len(r) for r in physical.values()) == global_batch
  assert set.union(*physical.values()) == set(range(global_batch))


@pytest.mark.parametrize("name,slices", TOPOLOGIES)
def test_every_host_is_fed_its_rows(name, slices):
  devices = _topology(name, slices)
  contiguous = 0
  for mesh_config in MESHES:
    try:
      mesh = sharding.make_mesh(mesh_config, devices)
    except ValueError as e:  # FSDP over all devices cannot span slices without dcn_fsdp
      assert slices > 1 and mesh_config["data"] == 1 and "\n" not in str(e), e
      mesh = sharding.make_mesh(dict(mesh_config, dcn_fsdp=slices), devices)
    if slices > 1:  # data parallelism spans slices; FSDP and tensor stay inside one
      slice_of = np.vectorize(lambda d: d.slice_index)(mesh.devices)
      inner = [a for a in ("fsdp", "tensor") if mesh.shape[a] > 1
               and not (a == "fsdp" and mesh_config["data"] == 1)]
      for a in inner:
        assert (np.ptp(slice_of, axis=sharding.MESH_AXES.index(a)) == 0).all(), (mesh_config, a)
    batch = 2 * mesh.shape["data"] * mesh.shape["fsdp"]
    check_feeding(mesh, batch)
    # Count the meshes where each host's rows happen to be one contiguous block.
    contiguous += all(
        r == list(range(r[0], r[0] + len(r)))
        for r in (sharding.device_rows(mesh, batch, p) for p in {d.process_index for d in devices}))
  if name == "v5e:8x8":  # the finding: physical order scatters hosts' rows
    assert contiguous < len(MESHES)


def test_mesh_that_cannot_be_fed_fails_in_one_line():
  devices = sorted(_topology("v5e:4x4", 1), key=lambda d: (d.process_index, d.id))
  # tensor pairs straddle hosts at an offset: hosts hold overlapping, unequal block sets.
  mesh = Mesh(np.roll(np.array(devices), 1).reshape(8, 1, 2), sharding.MESH_AXES)
  with pytest.raises(ValueError, match="cannot be fed") as e:
    sharding.process_rows(mesh, 16, 0)
  assert "\n" not in str(e.value)
  with pytest.raises(ValueError, match="not divisible"):
    sharding.process_rows(sharding.make_mesh(dict(data=-1, fsdp=1, tensor=1), devices), 24, 0)


def test_slice_names():
  assert aot.topology_name("v5p-256") == ("v5p:4x4x8", "v5p")
  assert aot.topology_name("v4-32") == ("v4:2x2x4", "v4")
  assert aot.topology_name("v5e-16") == ("v5e:4x4", "v5e")
  assert aot.topology_name("v6e-256") == ("v6e:16x16", "v6e")
  assert aot.topology_name("v5e:2x4") == ("v5e:2x4", "v5e")
  assert math.prod(map(int, aot.topology_name("v4-1024")[0][3:].split("x"))) == 512
  with pytest.raises(ValueError):
    aot.topology_name("v5e-12")
