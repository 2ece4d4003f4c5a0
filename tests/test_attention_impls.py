"""Blocked attention kernels (chunked XLA, Pallas TPU / GPU interpreted) equal the dense reference.

Outputs and gradients w.r.t. q, k, v on random packed rows plus hand-made edge rows (image at
the row start / end, a padding row, a non-contiguous row as the decode cache makes), GQA, both
intra_image modes, fp32 and bf16, L not a multiple of the blocks. The block ranges are checked
to be exactly the hull of the live blocks of the dense mask (skipping is both safe and real).
The Pallas GPU kernels are also lowered to Triton IR for CUDA on the CPU (no GPU needed), which
checks the Triton constraints Pallas enforces (power-of-two tiles) but not Triton's compiler.
"""

import functools
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import layouts
from tfusion import configlib
from tfusion.model import attention, attention_chunked, attention_intervals, attention_pallas_gpu
from tfusion.model import attention_pallas_tpu
from tfusion.model import transfusion

N_PATCHES = 4


def _layout(rng, length):
  """int [B, L] segment_ids, image_index: random rows + edge rows."""
  rows = [layouts.random_row(rng, length, num_slots=4, num_patches=N_PATCHES) for _ in range(3)]
  seg = [r["segment_ids"] for r in rows]
  idx = [r["image_index"] for r in rows]
  # Image at the very start of the row (no BOI in the row), text, then an image ending at L-1.
  s, i = np.ones(length, np.int32), np.full(length, -1, np.int32)
  i[:N_PATCHES] = 0
  s[length // 2:] = 2
  i[length - N_PATCHES:] = 1
  seg.append(s), idx.append(i)
  # A row of padding only.
  seg.append(np.zeros(length, np.int32)), idx.append(np.full(length, -1, np.int32))
  # Non-contiguous ids (decode holes, an id reused): still exact, only less skipping.
  s = np.ones(length, np.int32)
  s[5:9] = 0
  s[20:30] = 2
  s[30:] = 1
  i = np.full(length, -1, np.int32)
  i[10:10 + N_PATCHES] = 0
  seg.append(s), idx.append(i)
  return np.stack(seg), np.stack(idx)


CASES = {
    # name: (dtype, intra_image, length, heads, kv_heads, head_dim, block_q, block_k)
    "f32_bidir_gqa": (jnp.float32, "bidirectional", 45, 4, 2, 8, 8, 16),
    "bf16_causal_mha": (jnp.bfloat16, "causal", 40, 2, 2, 8, 16, 8),
    # Triton-sized tiles (powers of two >= 16), multi-query, several blocks per side.
    "f32_bidir_mqa_d16": (jnp.float32, "bidirectional", 100, 4, 1, 16, 16, 32),
}
TOL = {jnp.float32: dict(atol=2e-5, rtol=2e-5), jnp.bfloat16: dict(atol=4e-2, rtol=4e-2)}


def _inputs(case):
  dtype, intra, length, heads, kv_heads, d, _, _ = CASES[case]
  rng = np.random.default_rng(len(case))
  seg, idx = _layout(rng, length)
  b = seg.shape[0]
  q = rng.standard_normal((b, length, heads, d))
  k = rng.standard_normal((b, length, kv_heads, d))
  v = rng.standard_normal((b, length, kv_heads, d))
  # Cotangent: zero at padding queries, whose output the reference leaves unspecified.
  weight = rng.standard_normal((b, length, heads, d)) * (seg > 0)[:, :, None, None]
  cast = lambda x: jnp.asarray(x, dtype)
  return (cast(q), cast(k), cast(v)), jnp.asarray(weight, jnp.float32), seg, idx, intra


def _value_and_grads(fn, qkv, weight):
  def loss(q, k, v):
    out = fn(q, k, v)
    return (out.astype(jnp.float32) * weight).sum(), out
  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(*qkv)


@functools.lru_cache(maxsize=None)
def _reference(case):
  qkv, weight, seg, idx, intra = _inputs(case)
  mask = attention.attention_mask(seg, idx, intra_image=intra)
  return _value_and_grads(lambda q, k, v: attention.dot_product_attention(q, k, v, mask),
                          qkv, weight)


def _kernel(impl, block_q, block_k):
  if impl == "chunked":
    return functools.partial(attention_chunked.chunked_attention, block_q=block_q,
                             block_k=block_k)
  if impl == "pallas_gpu":  # backward blocks swapped: they differ from the forward's
    return functools.partial(attention_pallas_gpu.flash_attention, block_q=block_q,
                             block_k=block_k, bwd_block_q=block_k, bwd_block_k=block_q,
                             interpret=True)
  return functools.partial(attention_pallas_tpu.flash_attention, block_q=block_q,
                           block_k=block_k, interpret=True)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("impl", ["chunked", "pallas_tpu", "pallas_gpu"])
def test_kernel_matches_dense_outputs_and_grads(impl, case):
  dtype, *_, block_q, block_k = CASES[case]
  qkv, weight, seg, idx, intra = _inputs(case)
  iv = attention.intervals(seg, idx, intra_image=intra)
  kernel = _kernel(impl, block_q, block_k)
  (_, out), grads = _value_and_grads(lambda q, k, v: kernel(q, k, v, iv), qkv, weight)
  (_, want_out), want_grads = _reference(case)
  keep = seg > 0
  f32 = lambda x: np.asarray(x, np.float32)
  np.testing.assert_allclose(f32(out)[keep], f32(want_out)[keep], **TOL[dtype])
  assert np.all(f32(out)[~keep] == 0), "queries with no allowed key output 0"
  for name, got, want in zip("qkv", grads, want_grads):
    scale = max(1.0, float(np.abs(f32(want)).max()))
    np.testing.assert_allclose(f32(got) / scale, f32(want) / scale, err_msg=f"d{name}",
                               **TOL[dtype])


@pytest.mark.parametrize("intra", ["bidirectional", "causal"])
def test_block_ranges_are_the_hull_of_live_blocks(intra):
  rng = np.random.default_rng(5)
  length, bq, bk = 48, 8, 16
  seg, idx = _layout(rng, length)
  contiguous = np.asarray(attention_intervals.contiguous_rows(seg))
  assert contiguous[:-1].all() and not contiguous[-1]
  iv = attention.intervals(seg, idx, intra_image=intra)
  mask = np.asarray(attention.attention_mask(seg, idx, intra_image=intra))
  live = mask.reshape(len(seg), length // bq, bq, length // bk, bk).any((2, 4))  # [B, nq, nk]
  for side, (lo, hi), blocks, other in [
      ("query", (iv.kv_lo, iv.kv_hi), live, bk),
      ("key", (iv.q_lo, iv.q_hi), live.transpose(0, 2, 1), bq)]:
    block = length // blocks.shape[1]
    first, last = map(np.asarray, attention_intervals.block_ranges(lo, hi, block, other))
    for r in range(len(seg)):
      for i in range(blocks.shape[1]):
        hits = np.flatnonzero(blocks[r, i])
        assert not hits.size or (first[r, i] <= hits[0] and hits[-1] <= last[r, i]), (side, r, i)
        if contiguous[r]:  # exact: nothing outside the live hull is visited
          want = (hits[0], hits[-1]) if hits.size else None
          got = (first[r, i], last[r, i]) if first[r, i] <= last[r, i] else None
          assert got == want, (side, r, i, got, want)


@pytest.mark.parametrize("intra", ["bidirectional", "causal"])
def test_pallas_gpu_loops_visit_exactly_the_live_blocks(intra):
  """Each GPU kernel program's loop range (fwd, dQ, dK/dV) is the hull of its live blocks."""
  rng = np.random.default_rng(7)
  length = 100  # padded to 128 by the 32-blocks
  seg, idx = _layout(rng, length)
  contiguous = np.asarray(attention_intervals.contiguous_rows(seg))
  plan = attention_pallas_gpu.make_plan((len(seg), length, 2, 16), 1, block_q=32, block_k=16,
                                        bwd_block_q=16, bwd_block_k=32, interpret=True)
  assert plan.length == 128
  iv = attention_intervals.pad_to(attention.intervals(seg, idx, intra_image=intra), plan.length)
  mask = np.asarray(attention.dense_mask(iv))
  ranges = attention_pallas_gpu.block_ranges(iv, plan)

  def live(bq, bk):  # [B, nq, nk]
    n = plan.length
    return mask.reshape(len(seg), n // bq, bq, n // bk, bk).any((2, 4))

  for name, blocks in [("fwd", live(plan.block_q, plan.block_k)),
                       ("dq", live(plan.bwd_block_q, plan.bwd_block_k)),
                       ("dkv", live(plan.bwd_block_q, plan.bwd_block_k).transpose(0, 2, 1))]:
    first, last = map(np.asarray, ranges[name])
    assert first.shape == blocks.shape[:2], name
    visited = 0
    for r in range(len(seg)):
      for i in range(blocks.shape[1]):
        hits = np.flatnonzero(blocks[r, i])
        got = (first[r, i], last[r, i]) if first[r, i] <= last[r, i] else None
        visited += 0 if got is None else got[1] - got[0] + 1
        assert not hits.size or (got[0] <= hits[0] and hits[-1] <= got[1]), (name, r, i)
        if contiguous[r]:
          assert got == ((hits[0], hits[-1]) if hits.size else None), (name, r, i, got)
    assert visited < blocks.size, f"{name}: skipping is real"


def test_pallas_gpu_lowers_to_triton_for_cuda():
  """Pallas -> Triton IR for CUDA, on the CPU: the lowering enforces power-of-two tiles."""
  seg = np.ones((2, 300), np.int32)
  seg[:, 150:] = 2
  idx = np.full((2, 300), -1, np.int32)
  idx[:, 10:30] = 0
  iv = attention.intervals(seg, idx)

  def lower(dtype, head_dim, **blocks):
    def f(q, k, v):
      loss = lambda q, k, v: attention_pallas_gpu.flash_attention(q, k, v, iv, **blocks).astype(
          jnp.float32).sum()
      return jax.value_and_grad(loss, argnums=(0, 1, 2))(q, k, v)
    sds = lambda h: jax.ShapeDtypeStruct((2, 300, h, head_dim), dtype)
    return jax.jit(f).trace(sds(4), sds(2), sds(2)).lower(lowering_platforms=("cuda",)).as_text()

  for dtype, head_dim, blocks in [(jnp.bfloat16, 128, {}), (jnp.float32, 64, {}),
                                  (jnp.bfloat16, 256, dict(block_q=128, block_k=32))]:
    text = lower(dtype, head_dim, **blocks)
    for kernel in ["tfusion_flash_fwd", "tfusion_flash_dq", "tfusion_flash_dkv"]:
      assert f'name = "{kernel}"' in text, (dtype, head_dim, kernel)
  with pytest.raises(ValueError, match="power of two"):
    lower(jnp.bfloat16, 80)
  with pytest.raises(ValueError, match="powers of two"):
    lower(jnp.bfloat16, 64, block_q=48)
  with pytest.raises(ValueError, match=">= 16"):
    lower(jnp.bfloat16, 64, block_k=8)


def test_allowed_pairs_counts_the_mask():
  rng = np.random.default_rng(2)
  rows = [layouts.random_row(rng, 64, num_slots=6, num_patches=9) for _ in range(8)]
  seg = np.stack([r["segment_ids"] for r in rows])
  idx = np.stack([r["image_index"] for r in rows])
  for intra in ["bidirectional", "causal"]:
    want = np.asarray(attention.attention_mask(seg, idx, intra_image=intra)).sum((1, 2))
    got = attention.allowed_pairs(seg, idx, intra_image=intra)
    np.testing.assert_array_equal(got, want)


def test_computed_pairs_count_the_blocks_kernels_visit():
  """Hardware work (reported apart from model FLOPs): the live-block hull of each query block,
  per row for the Pallas kernels, over the batch's union for chunked; dense computes L^2."""
  rng = np.random.default_rng(4)
  length, bq, bk = 96, 16, 32
  rows = [layouts.random_row(rng, length, num_slots=4, num_patches=9) for _ in range(4)]
  seg = np.stack([r["segment_ids"] for r in rows])
  idx = np.stack([r["image_index"] for r in rows])
  mask = np.asarray(attention.attention_mask(seg, idx))
  live = mask.reshape(4, length // bq, bq, length // bk, bk).any((2, 4))  # [B, nq, nk]

  def hull(blocks):  # live key blocks from the first to the last, per query block
    return sum(np.ptp(np.flatnonzero(b)) + 1 for b in blocks if b.any())

  per_row = sum(hull(live[r]) for r in range(4)) * bq * bk
  union = 4 * hull(live.any(0)) * bq * bk
  count = lambda impl, **kw: float(attention.computed_pairs(
      seg, idx, implementation=impl, block_q=bq, block_k=bk, head_dim=16, **kw))
  assert count("dense") == 4 * length * length
  with attention.target_platform("gpu"):  # the count of a GPU run, computed here
    assert count("pallas_gpu") == per_row
  assert count("chunked") == union
  allowed = float(np.asarray(attention.allowed_pairs(seg, idx)).sum())
  assert allowed < per_row <= union < 4 * length * length  # skipping is real


def test_dispatch_and_bad_settings(caplog):
  rng = np.random.default_rng(0)
  seg, idx = _layout(rng, 24)
  iv = attention.intervals(seg, idx)
  q = jnp.asarray(rng.standard_normal((len(seg), 24, 2, 8)), jnp.float32)
  dense = attention.dot_product_attention(q, q, q, iv, implementation="dense")
  np.testing.assert_array_equal(  # dense from intervals == dense from the reference mask
      dense, attention.dot_product_attention(q, q, q, attention.attention_mask(seg, idx)))
  keep = seg > 0
  for impl in ["chunked", "auto"]:
    out = jax.jit(functools.partial(attention.dot_product_attention, implementation=impl,
                                    block_q=8, block_k=8))(q, q, q, iv)
    np.testing.assert_allclose(np.asarray(out)[keep], np.asarray(dense)[keep], atol=1e-5)
  with pytest.raises(ValueError, match="config.model.attention_impl"):
    attention.dot_product_attention(q, q, q, iv, implementation="flash")
  with pytest.raises(ValueError, match="attention_impl='pallas_tpu' needs a TPU"):
    attention.dot_product_attention(q, q, q, iv, implementation="pallas_tpu")
  with pytest.raises(ValueError, match="attention_impl='pallas_gpu' needs a GPU"):
    attention.dot_product_attention(q, q, q, iv, implementation="pallas_gpu")
  with pytest.raises(ValueError, match="block_k % 128"):
    attention_pallas_tpu.flash_attention(q, q, q, iv, block_q=8, block_k=64)
  with pytest.raises(ValueError, match="powers of two"):
    attention_pallas_gpu.flash_attention(q, q, q, iv, block_q=8, block_k=24, interpret=True)
  assert attention.resolve_implementation("auto", head_dim=128, backend="tpu") == "pallas_tpu"
  assert attention.resolve_implementation("auto", head_dim=64, backend="tpu") == "chunked"
  on_gpu = lambda head_dim: attention.resolve_implementation("auto", head_dim=head_dim,
                                                             backend="gpu")
  assert [on_gpu(d) for d in [None, 16, 64, 128, 256]] == ["pallas_gpu"] * 5
  assert [on_gpu(d) for d in [8, 80, 96, 512]] == ["chunked"] * 4
  assert attention.resolve_implementation("pallas_gpu", head_dim=64, backend="gpu") == "pallas_gpu"
  assert attention.resolve_implementation("auto", head_dim=64, backend="cpu") == "chunked"
  with caplog.at_level(logging.WARNING):
    attention._warn_once.cache_clear()
    assert attention.resolve_implementation("jax", backend="cpu") == "chunked"
    # A dense [B, L, L] mask given to a blocked kernel: the dense reference, with a warning.
    out = attention.dot_product_attention(q, q, q, attention.attention_mask(seg, idx),
                                          implementation="chunked")
  np.testing.assert_array_equal(out, dense)
  assert "deprecated" in caplog.text and "dense [B, L, L] mask" in caplog.text


def test_transfusion_chunked_matches_dense():
  config = configlib.base_config()
  m = config.model
  m.image.latent_size, m.image.latent_channels, m.image.patch_size = 4, 2, 2
  m.vocab_size, m.num_kv_heads, m.num_layers, m.attention_block = 100, 2, 1, 16
  b, length, slots = 3, 44, 3
  batch, _ = layouts.random_batch(np.random.default_rng(1), b, length, slots, (4, 4, 2), 2)
  args = (batch["tokens"], batch["positions"], batch["segment_ids"], batch["image_index"],
          batch["images"], jnp.full((b, slots), 0.5))
  params = jax.jit(transfusion.Transfusion(m).init)(jax.random.PRNGKey(0), *args)
  keep = jnp.asarray(batch["segment_ids"] > 0)[:, :, None]
  real = jnp.asarray(batch["image_mask"])[:, :, None, None, None]

  def run(impl):
    m.attention_impl = impl
    model = transfusion.Transfusion(m)

    def loss(p):
      logits, pred = model.apply(p, *args)
      return (jnp.where(keep, logits, 0) ** 2).mean() + (jnp.where(real, pred, 0) ** 2).mean(), (
          jnp.where(keep, logits, 0), jnp.where(real, pred, 0))
    return jax.jit(jax.value_and_grad(loss, has_aux=True))(params)

  (want_loss, want_out), want_grads = run("dense")
  (got_loss, got_out), got_grads = run("chunked")
  np.testing.assert_allclose(got_loss, want_loss, rtol=1e-5)
  for got, want in zip(got_out, want_out):
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
  flat_want = jax.tree_util.tree_leaves_with_path(want_grads)
  for (path, want), got in zip(flat_want, jax.tree.leaves(got_grads)):
    np.testing.assert_allclose(got, want, atol=1e-6, rtol=1e-4, err_msg=jax.tree_util.keystr(path))


def test_kernels_see_only_their_device_shard_under_a_mesh():
  """A Pallas kernel is a custom call XLA cannot partition: per_shard hands each device its
  rows (data) and heads (tensor) and the result equals the unsharded one."""
  from tfusion import sharding
  mesh = sharding.make_mesh({"data": 2, "fsdp": 1, "tensor": 2}, devices=jax.devices()[:4])
  qkv, weight, seg, idx, intra = _inputs("f32_bidir_gqa")
  iv = attention.intervals(seg, idx, intra_image=intra)
  inner = _kernel("pallas_gpu", 8, 16)
  seen = []

  def spy(q, k, v, iv):
    seen.append((q.shape, k.shape, iv.segment_ids.shape))
    return inner(q, k, v, iv)

  with jax.set_mesh(mesh):
    (_, out), grads = _value_and_grads(
        lambda q, k, v: attention.per_shard(spy, q, k, v, iv), qkv, weight)
  b, length = seg.shape
  assert seen[0] == ((b // 2, length, 2, 8), (b // 2, length, 1, 8), (b // 2, length))
  (_, want_out), want_grads = _reference("f32_bidir_gqa")
  keep = seg > 0
  np.testing.assert_allclose(np.asarray(out)[keep], np.asarray(want_out)[keep], **TOL[jnp.float32])
  for got, want in zip(grads, want_grads):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), **TOL[jnp.float32])
  # Without a mesh the kernel gets the whole batch.
  seen.clear()
  attention.per_shard(spy, *qkv, iv)
  assert seen[0][0] == qkv[0].shape


def test_kernels_resolve_for_the_compile_target():
  """tfusion-aot compiles for a TPU topology from a CPU host: the kernel follows the target."""
  assert attention.resolve_implementation("auto", head_dim=128) == "chunked"  # CPU here
  with attention.target_platform("tpu"):
    assert attention.resolve_implementation("auto", head_dim=128) == "pallas_tpu"
    assert attention.resolve_implementation("auto", head_dim=64) == "chunked"
  with attention.target_platform("gpu"):
    assert attention.resolve_implementation("auto", head_dim=64) == "pallas_gpu"
  assert attention.resolve_implementation("auto", head_dim=128) == "chunked"
