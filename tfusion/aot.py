"""`tfusion-aot`: compile the real train step ahead of time, without the devices; check fit.

  tfusion-aot --config C --topology v5p-256 [--slices 2] [--config.key=value ...]
  tfusion-aot --config C --topology v5e:4x4
  tfusion-aot --config C --platform cpu --devices 8 [--hbm_gib 80]

Builds the mesh over deviceless devices (TPU: libtpu's compile-only topology, as MaxText's
train_compile.py; CPU: N host devices standing in for a GPU node), the sharded abstract train
state and batch, and lowers and compiles `train.make_train_step` (the function tfusion-train
runs) with the target's compiler. Prints the per-device memory XLA plans (arguments, temps,
outputs, peak) against the chip's HBM, the model FLOPs per step (tfusion/flops.py: XLA's cost
analysis counts the scanned layer body once, so it is not used), whether the compiled program
still holds an O(L^2) array (dense attention scores), and a verdict.

XLA:CPU is only an approximation of a GPU: it has no memory-saving GPU passes and may keep
bf16 matmul temporaries in float32, so its numbers are an upper bound.
"""

import dataclasses
import math
import os
import re
import sys
import time

import flax.linen as nn
import jax
import numpy as np

# HBM per device (GiB) by jax device_kind prefix; v4 and v5p devices are megacore chips.
HBM_GIB = {
    "TPU v4": 32, "TPU v5 lite": 16, "TPU v5e": 16, "TPU v5p": 95, "TPU v5": 95,
    "TPU v6 lite": 32, "TPU v6e": 32, "NVIDIA H100": 80, "NVIDIA H200": 141, "NVIDIA A100": 80,
}
# Remat policies from most to least memory (tfusion/model/remat.py): what to try next.
REMAT_ORDER = ("none", "minimal", "qkv_attn", "qkv", "full")
_MEGACORE = ("v4", "v5p")
GIB = 1024 ** 3


def _doubling_shape(chips, dims):
  """Standard slice shape of `chips` chips: double the last dimension that holds the minimum."""
  shape = [2, 2, 1] if dims == 3 else [1, 1]
  if dims == 3 and chips < 4:
    raise ValueError(f"3D TPU slices have at least 4 chips, got {chips}")
  while math.prod(shape) < chips:
    i = max(j for j, s in enumerate(shape) if s == min(shape))
    shape[i] *= 2
  if math.prod(shape) != chips:
    raise ValueError(f"{chips} chips is not a standard slice size")
  return "x".join(map(str, shape))


def topology_name(topology):
  """'v5p-256' (Cloud TPU name: TensorCores for v4/v5p, chips for v5e/v6e) or 'v5e:4x4'
  -> (libtpu topology name 'v5p:4x4x8', chip generation 'v5p')."""
  m = re.fullmatch(r"(v4|v5e|v5p|v6e)[:](\d+(?:x\d+){1,2})", topology)
  if m:
    return topology, m.group(1)
  m = re.fullmatch(r"(v4|v5e|v5p|v6e|v5litepod)-(\d+)", topology)
  if not m:
    raise ValueError(f"--topology {topology!r}: expected e.g. v5p-256, v5e-16, v4:2x2x4, v5e:4x4")
  gen = "v5e" if m.group(1) == "v5litepod" else m.group(1)
  n = int(m.group(2))
  chips = n // 2 if gen in _MEGACORE else n
  return f"{gen}:{_doubling_shape(chips, 3 if gen in _MEGACORE else 2)}", gen


def tpu_devices(topology, slices=1):
  """Compile-only TPU devices of `topology` (x `slices`), with no TPU attached (needs libtpu)."""
  # Compile-only: several such processes may run at once (libtpu's lockfile is for TPU VMs).
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  from jax.experimental import topologies
  name, gen = topology_name(topology)
  kwargs = {"chip_config_name": "megacore"} if gen in _MEGACORE else {}
  if slices > 1:
    kwargs["num_slices"] = slices
  return topologies.get_topology_desc(topology_name=name, platform="tpu", **kwargs).devices


def hbm_bytes(devices):
  kind = devices[0].device_kind
  gib = next((v for k, v in HBM_GIB.items() if kind.startswith(k)), None)
  return None if gib is None else gib * GIB


def abstract_batch(config, mesh):
  """ShapeDtypeStructs of one global batch (shapes from the synthetic data's row), sharded."""
  from tfusion import sharding
  from tfusion.data import synthetic
  img = config.model.image
  row = synthetic.make_row(np.random.default_rng(0), config.data.seq_len, config.data.max_images,
                           (img.latent_size, img.latent_size, img.latent_channels),
                           img.patch_size, config.model.vocab_size)
  shard = sharding.batch_sharding(mesh)
  return {k: jax.ShapeDtypeStruct((config.data.batch_size,) + v.shape, v.dtype, sharding=shard)
          for k, v in row.items()}


@dataclasses.dataclass
class Report:
  """Per-device memory (bytes) of the compiled step, and FLOPs."""
  devices: int
  device_kind: str
  mesh: dict
  argument: int
  output: int
  alias: int
  temp: int
  peak: int
  hbm: int | None
  params: int
  flops_per_step: float
  peak_flops_per_device: float | None
  compile_s: float
  remat: str
  ce_chunk_size: int
  oom: bool = False  # the compiler refused the plan (TPU): temps are from its error message
  seq_len: int = 0
  square_arrays: tuple = ()  # shapes in the compiled program with two dims of size seq_len

  @property
  def fits(self):
    return not self.oom and (self.hbm is None or self.peak <= self.hbm)

  def verdict(self):
    if self.hbm is None:
      return "no HBM size known for this device (pass --hbm_gib)"
    if self.fits:
      tight = "; tight: runtime buffers need some headroom" if self.peak > 0.9 * self.hbm else ""
      return f"fits ({self.peak / self.hbm:.0%} of HBM{tight})"
    return "does not fit: " + suggestion(self.remat, self.ce_chunk_size)

  def lines(self):
    g = lambda b: f"{b / GIB:7.2f} GiB" if b >= GIB / 10 else f"{b / 2 ** 20:7.2f} MiB"
    hbm = g(self.hbm) if self.hbm else "unknown"
    out = [f"{self.devices} x {self.device_kind}, mesh {self.mesh}, {self.params / 1e6:,.1f}M "
           f"params, remat={self.remat}, ce_chunk_size={self.ce_chunk_size} "
           f"(compiled in {self.compile_s:.0f}s)",
           "per-device memory:",
           f"  arguments {g(self.argument)}   (state + batch shards)",
           f"  outputs   {g(self.output)}   ({g(self.alias).strip()} aliased to donated args)",
           f"  temps     {g(self.temp)}   (activations, gradients, workspace"
           + ("; the compiler ran out of HBM)" if self.oom else ")"),
           f"  peak      {g(self.peak)}   of {hbm} HBM",
           f"model FLOPs per step {self.flops_per_step:.3e} "
           f"({self.flops_per_step / self.devices:.3e} per device)"]
    if self.peak_flops_per_device:
      t = self.flops_per_step / (self.devices * self.peak_flops_per_device)
      out.append(f"  step time at 100% / 50% MFU: {t:.2f}s / {2 * t:.2f}s")
    if self.oom:
      out.append("attention: not checked (the compiler refused the plan)")
    elif self.square_arrays:
      out.append(f"attention: {len(self.square_arrays)} [*, L, L] array shapes in the compiled "
                 f"program (L={self.seq_len}: dense scores or a block as large as L), e.g. "
                 + ", ".join(self.square_arrays[:3]))
    else:
      out.append(f"attention: no [*, L, L] array in the compiled program (L={self.seq_len})")
    out.append("verdict: " + self.verdict())
    return out


def suggestion(remat, ce_chunk_size):
  """What to try next when a step does not fit."""
  if remat in REMAT_ORDER and REMAT_ORDER.index(remat) + 1 < len(REMAT_ORDER):
    nxt = REMAT_ORDER[REMAT_ORDER.index(remat) + 1]
    return f"try --config.model.remat={nxt}"
  if not ce_chunk_size:
    return "try --config.loss.ce_chunk_size=512"
  return "try a larger config.mesh.fsdp (more devices) or fewer rows per device"


def shard_bytes(tree):
  """Bytes one device holds of a pytree of sharded ShapeDtypeStructs (the largest shard)."""
  total = 0
  for x in jax.tree.leaves(tree):
    total += math.prod(x.sharding.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize
  return total


_UNITS = {"": 1, "K": 2 ** 10, "M": 2 ** 20, "G": 2 ** 30, "T": 2 ** 40}


def oom_bytes(message):
  """Temporaries the TPU compiler needed, from its RESOURCE_EXHAUSTED message (else None)."""
  if "RESOURCE_EXHAUSTED" not in message:
    return None
  m = (re.search(r"HLO temporaries \(([\d.]+)([KMGT]?)\)", message)
       or re.search(r"Used ([\d.]+)([KMGT]?) of", message))
  return int(float(m.group(1)) * _UNITS[m.group(2)]) if m else None


_HLO_SHAPE = re.compile(r"\b[a-z]+[0-9]*\[([0-9,]+)\]")


def square_arrays(hlo_text, length):
  """Distinct array shapes in HLO text with at least two dims equal to `length`, e.g.
  "f32[2,4,256,256]": the O(L^2) buffers (attention scores or masks) a blocked kernel avoids."""
  found = set()
  for match in _HLO_SHAPE.finditer(hlo_text):
    dims = [int(d) for d in match.group(1).split(",") if d]
    if sum(d == length for d in dims) >= 2:
      found.add(match.group(0))
  return tuple(sorted(found))


def _peak(mem):
  peak = getattr(mem, "peak_memory_in_bytes", 0) or 0
  planned = (mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
             + mem.temp_size_in_bytes)
  return max(int(peak), int(planned))


def compile_step(config, devices, *, hbm=None):
  """Compiles the train step of `config` for `devices` (any platform). Returns a Report."""
  from tfusion.model import attention
  # The attention kernel is chosen for the target (pallas_tpu on a TPU topology), not the host.
  with attention.target_platform(devices[0].platform):
    return _compile_step(config, devices, hbm=hbm)


def _compile_step(config, devices, *, hbm=None):
  from tfusion import flops, sharding, train, train_state
  mesh = sharding.make_mesh(config.mesh, devices)
  shardings = train_state.state_shardings(config, mesh)
  state = train_state.abstract_state(config, mesh)
  batch = abstract_batch(config, mesh)
  # `run` enters the mesh and logical rules, which cannot happen under a trace: lower its jit.
  jitted = train.make_train_step(config, mesh, shardings).jitted
  start = time.perf_counter()
  args = shard_bytes(state) + shard_bytes(batch)
  try:
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_RULES):  # as train.py's run
      compiled = jitted.lower(state, batch).compile()
    mem = compiled.memory_analysis()
    memory = dict(argument=mem.argument_size_in_bytes, output=mem.output_size_in_bytes,
                  alias=mem.alias_size_in_bytes, temp=mem.temp_size_in_bytes, peak=_peak(mem),
                  square_arrays=square_arrays(compiled.as_text(), config.data.seq_len))
  except jax.errors.JaxRuntimeError as e:
    temp = oom_bytes(str(e))  # the TPU compiler refuses plans over HBM: keep its numbers
    if temp is None:
      raise
    memory = dict(argument=args, output=shard_bytes(state), alias=shard_bytes(state), temp=temp,
                  peak=args + temp, oom=True)
  seconds = time.perf_counter() - start
  params = sum(math.prod(x.shape) for x in jax.tree.leaves(state["params"]))
  peak_flops = flops.peak_flops(devices[:1])
  return Report(
      devices=len(devices), device_kind=devices[0].device_kind, mesh=dict(mesh.shape),
      **memory,
      hbm=hbm if hbm is not None else hbm_bytes(devices), params=params,
      flops_per_step=flops.train_flops_per_step(config, params),
      peak_flops_per_device=peak_flops, compile_s=seconds, remat=config.model.remat,
      ce_chunk_size=int(config.loss.get("ce_chunk_size", 0)), seq_len=config.data.seq_len)


def target_devices(topology=None, platform="cpu", num_devices=None, slices=1):
  """Devices to compile for: a deviceless TPU topology, or host CPU devices."""
  if topology:
    return list(tpu_devices(topology, slices))
  if platform != "cpu":
    raise ValueError(f"--platform {platform!r}: only cpu (or --topology for TPUs) is supported")
  if num_devices:
    try:  # before the CPU backend starts; later calls keep the count it started with
      jax.config.update("jax_num_cpu_devices", num_devices)
    except RuntimeError:
      pass
  devices = jax.devices("cpu")
  if num_devices and len(devices) < num_devices:
    raise ValueError(f"--devices {num_devices}: the CPU backend already started with "
                     f"{len(devices)} devices")
  return devices[:num_devices] if num_devices else devices


def main():
  from absl import app, flags
  from ml_collections import config_flags

  config_flags.DEFINE_config_file("config", None, "config file[:arg]", lock_config=True)
  flags.DEFINE_string("topology", None, "TPU slice: v5p-256, v5e-16, v4-32, v6e-64, v5e:4x4, ...")
  flags.DEFINE_integer("slices", 1, "number of TPU slices (multi-slice over DCN)")
  flags.DEFINE_string("platform", "cpu", "without --topology: cpu (stands in for a GPU node)")
  flags.DEFINE_integer("devices", None, "without --topology: number of CPU devices")
  flags.DEFINE_float("hbm_gib", None, "memory per device to check against (default: the chip's; "
                     "80 for --platform cpu, an H100)")
  flags.DEFINE_integer("rows_per_device", None, "sets config.data.batch_size to this many rows "
                       "per device of the batch axes (data x fsdp)")
  flags.mark_flags_as_required(["config"])
  FLAGS = flags.FLAGS

  def run(argv):
    del argv
    jax.config.update("jax_platforms", "cpu")  # deviceless: never start a local accelerator
    try:
      devices = target_devices(FLAGS.topology, FLAGS.platform, FLAGS.devices, FLAGS.slices)
      config = FLAGS.config
      if FLAGS.rows_per_device:
        from tfusion import sharding
        data, fsdp, _ = sharding.mesh_shape(config.mesh, len(devices))
        with config.unlocked():
          config.data.batch_size = FLAGS.rows_per_device * data * fsdp
      hbm = FLAGS.hbm_gib
      if hbm is None and not FLAGS.topology:
        hbm = 80.0
      report = compile_step(config, devices, hbm=None if hbm is None else int(hbm * GIB))
    except (ValueError, NotImplementedError) as e:
      print(f"tfusion-aot: error: {e}", file=sys.stderr)
      sys.exit(2)
    print("\n".join(report.lines()), flush=True)
    sys.exit(0 if report.fits else 1)

  app.run(run)


if __name__ == "__main__":
  main()
