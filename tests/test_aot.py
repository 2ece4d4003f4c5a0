"""tfusion-aot: the real train step compiled ahead of time reports per-device memory and FLOPs."""

import jax
import pytest

from tfusion import aot, configlib, flops, sharding, train_state


def _tiny(**mesh):
  config = configlib.load_config_file("experiments/configs/tiny.py")
  config.model.vocab_size = 4096  # logits [8, 128, 4096] fp32: 2 MiB per device of 8
  config.data.batch_size, config.data.seq_len = 8, 128
  config.mesh.update(mesh)
  return config


def test_cpu_compile_reports_sharded_memory_and_the_chunked_loss_saves_logits():
  devices = jax.devices()[:8]
  dense = aot.compile_step(_tiny(data=2, fsdp=4), devices, hbm=80 * aot.GIB)
  mesh = sharding.make_mesh(_tiny(data=2, fsdp=4).mesh, devices)
  state = train_state.abstract_state(_tiny(), mesh)
  # XLA's argument bytes are the state's and batch's shards: FSDP divides the state.
  expected = aot.shard_bytes(state) + aot.shard_bytes(aot.abstract_batch(_tiny(), mesh))
  assert abs(dense.argument - expected) <= 0.02 * expected
  full_state = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state))
  assert aot.shard_bytes(state) < 0.4 * full_state
  assert dense.alias > 0.9 * aot.shard_bytes(state)  # the state is donated
  assert dense.flops_per_step == flops.train_flops_per_step(_tiny(), dense.params)
  assert dense.fits and dense.verdict().startswith("fits")
  assert any(line.startswith("verdict: fits") for line in dense.lines())

  chunked_config = _tiny(data=2, fsdp=4)
  chunked_config.loss.ce_chunk_size = 16
  chunked = aot.compile_step(chunked_config, devices, hbm=80 * aot.GIB)
  assert chunked.ce_chunk_size == 16
  assert chunked.temp < dense.temp - 1.5 * 2 ** 20  # the [B, L, V] fp32 logits are gone


def test_verdict_suggests_the_next_remat_policy():
  assert aot.suggestion("none", 0) == "try --config.model.remat=minimal"
  assert aot.suggestion("qkv", 0) == "try --config.model.remat=full"
  assert aot.suggestion("full", 0) == "try --config.loss.ce_chunk_size=512"
  assert "fsdp" in aot.suggestion("full", 512)
  msg = ("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO "
         "temporaries (43.20G) exceeds available HBM (15.75G).")
  assert aot.oom_bytes(msg) == int(43.2 * 2 ** 30)
  assert aot.oom_bytes("INTERNAL: something else") is None


@pytest.mark.slow
def test_tpu_topology_compile():
  pytest.importorskip("libtpu")
  devices = aot.tpu_devices("v5e:2x2")
  report = aot.compile_step(_tiny(data=1, fsdp=-1), devices)
  assert report.device_kind.startswith("TPU v5") and report.hbm == 16 * aot.GIB
  mesh = sharding.make_mesh(_tiny(data=1, fsdp=-1).mesh, devices)
  state = train_state.abstract_state(_tiny(), mesh)
  expected = aot.shard_bytes(state) + aot.shard_bytes(aot.abstract_batch(_tiny(), mesh))
  assert expected <= report.argument <= 2 * expected  # TPU layouts pad small arrays to tiles
  assert report.fits and not report.oom


@pytest.mark.slow
def test_paper_0_37b_needs_remat_on_v5e():
  """Issue 14's finding: 0.37B at L=4096, one row per chip, does not fit a v5e without remat."""
  pytest.importorskip("libtpu")
  devices = aot.tpu_devices("v5e-16")
  reports = {}
  for remat in ("none", "full"):
    config = configlib.load_config_file("experiments/configs/paper.py:0.37B")
    config.model.remat = remat
    config.data.seq_len, config.data.batch_size = 4096, len(devices)
    config.mesh.data, config.mesh.fsdp = 1, -1
    reports[remat] = aot.compile_step(config, devices)
  assert not reports["none"].fits
  assert reports["none"].verdict() == "does not fit: try --config.model.remat=minimal"
  assert reports["full"].fits and reports["full"].peak < 8 * aot.GIB


@pytest.mark.slow  # trains and compiles: tens of seconds
def test_blocked_attention_leaves_no_square_array_in_the_compiled_step():
  """The dense reference compiles [*, L, L] scores; chunked attention (blocks < L) must not,
  in the forward or the backward of the real train step."""
  def config(impl):
    c = _tiny(data=1, fsdp=1)
    c.data.batch_size, c.data.seq_len = 2, 176  # no model dim is 176
    c.model.attention_impl, c.model.attention_block = impl, 64
    return c

  devices = jax.devices()[:1]
  dense = aot.compile_step(config("dense"), devices, hbm=80 * aot.GIB)
  assert any(",176,176]" in s for s in dense.square_arrays), dense.square_arrays
  assert any("[*, L, L] array shapes" in line for line in dense.lines())
  chunked = aot.compile_step(config("chunked"), devices, hbm=80 * aot.GIB)
  assert chunked.square_arrays == ()
  assert "attention: no [*, L, L] array in the compiled program (L=176)" in chunked.lines()
  assert aot.square_arrays("x = f32[2,4,192,192] y = pred[192,8,192] z = f32[192,64]", 192) == (
      "f32[2,4,192,192]", "pred[192,8,192]")
