"""Generation over a mesh of 8 fake CPU devices draws what one device draws: rows split over
data x fsdp (batches that do not divide are padded and the padding dropped), params sharded
by the logical rules, and each prompt's sample fixed by its own key."""

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec

import train_utils
from tfusion import configlib, sharding
from tfusion.generate import engine

SPECIAL = engine.SpecialTokens(bos=96, eos=97, boi=98, eoi=99)
# 6 prompts (8 devices: 2 padding rows) of different lengths.
PROMPTS = [list(range(5, 12)), list(range(20, 30)), list(range(40, 53)), [7, 8],
           list(range(60, 64)), list(range(70, 81))]
SEED, STEPS = 3, 3


def _config():
  c = configlib.base_config()
  c.model.update(vocab_size=100, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2,
                 head_dim=8, mlp_dim=64, max_len=32)
  c.model.image.update(latent_size=4, latent_channels=2, patch_size=2)  # 4 patches
  c.diffusion.objective = "flow"
  return c


def _draw(gen, prompts, start=0):
  keys = engine.sample_keys(SEED, len(prompts), start=start)
  return np.asarray(gen.text_to_image(prompts, keys, sampler="euler", steps=STEPS,
                                      guidance_scale=2.0))


@pytest.fixture(scope="module")
def single():
  config = _config()
  params = train_utils.random_params(config)
  gen = engine.Generator(config, jax.device_put(params, jax.devices()[0]), SPECIAL,
                         fast_compile=True)
  return config, params, _draw(gen, PROMPTS)


@pytest.mark.parametrize("mesh_shape", [dict(data=8, fsdp=1, tensor=1),
                                        dict(data=2, fsdp=2, tensor=2)])
def test_mesh_draws_what_one_device_draws(single, mesh_shape):
  assert len(jax.devices()) == 8, "conftest sets 8 fake CPU devices"
  config, params, want = single
  mesh = sharding.make_mesh(mesh_shape)
  gen = engine.Generator(config, params, SPECIAL, fast_compile=True, mesh=mesh)
  assert gen.row_multiple == mesh_shape["data"] * mesh_shape["fsdp"]
  kernel = gen.params["params"]["trunk"]["layers"]["mlp"]["gate"]["kernel"]
  # Params placed by the logical rules: [layers, embed, mlp] with embed over fsdp, mlp over
  # tensor (on data=8 alone both axes have size 1: every device holds the whole kernel).
  assert kernel.sharding.spec == PartitionSpec(None, "fsdp", "tensor")
  assert kernel.addressable_shards[0].data.shape == (
      2, 32 // mesh_shape["fsdp"], 64 // mesh_shape["tensor"])
  got = _draw(gen, PROMPTS)  # 6 rows: padded to 8 (or 4 x 2), padding dropped
  assert got.shape == want.shape
  scale = np.abs(want).max()
  np.testing.assert_allclose(got, want, atol=1e-5 * scale, rtol=0)
  if mesh_shape["data"] == 8:
    # Per prompt: a sub-batch (3 rows, 5 of padding: the same compiled shapes) drawn with its
    # own keys (start offset) gives the same rows.
    part = _draw(gen, PROMPTS[2:5], start=2)
    np.testing.assert_allclose(part, want[2:5], atol=1e-5 * scale, rtol=0)


def test_building_blocks_refuse_batches_that_do_not_divide(single):
  config, params, _ = single
  gen = engine.Generator(config, params, SPECIAL, fast_compile=True,
                         mesh=sharding.make_mesh(dict(data=8, fsdp=1, tensor=1)))
  with pytest.raises(ValueError, match="data x fsdp = 8"):
    gen.new_context(6)
