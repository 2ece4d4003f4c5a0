"""The training job: recovery from a corrupted checkpoint, resharding, non-finite steps, and
starts that must fail before touching the workdir."""

import os

import jax
import numpy as np
import pytest

import train_utils
from tfusion import checkpoint, sharding, train


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A tiny run of 6 steps on 8 devices (data=8) with checkpoints at 2, 4, 6."""
  workdir = str(tmp_path_factory.mktemp("trained"))
  config = train_utils.tiny_config(**{"train.steps": 6, "checkpoint.every_steps": 2})
  out = train.train_and_evaluate(config, workdir)
  assert out["step"] == 6
  return workdir, config


def test_loss_goes_down_on_synthetic_data(tmp_path):
  config = train_utils.tiny_config(**{"train.steps": 30, "checkpoint.every_steps": 100})
  train.train_and_evaluate(config, str(tmp_path))
  losses = train_utils.losses_by_step(str(tmp_path))
  first = np.mean([losses[s][0] for s in range(1, 4)])
  last = np.mean([losses[s][0] for s in range(28, 31)])
  assert last < 0.8 * first
  assert os.listdir(os.path.join(tmp_path, "tb")), "TensorBoard events written"
  assert os.path.exists(os.path.join(tmp_path, "config.json"))


def test_corrupted_latest_checkpoint_falls_back_to_previous(trained, tmp_path, caplog):
  workdir, config = trained
  copy = str(tmp_path / "copy")
  import shutil
  shutil.copytree(workdir, copy)
  latest = os.path.join(copy, "checkpoints", "6")
  for root, _, files in os.walk(os.path.join(latest, "state")):
    for name in files:  # truncate every array file of the latest checkpoint
      with open(os.path.join(root, name), "wb"):
        pass
  config.train.steps = 7
  with caplog.at_level("WARNING"):
    out = train.train_and_evaluate(config, copy)
  assert any("checkpoints/6" in r.getMessage() for r in caplog.records), caplog.text
  assert out["step"] == 7
  assert any(d.startswith("corrupt-6") for d in os.listdir(os.path.join(copy, "checkpoints")))
  # It resumed from 4: step 5's loss equals the original run's.
  assert train_utils.losses_by_step(copy)[5] == train_utils.losses_by_step(workdir)[5]


def test_restore_onto_another_mesh_and_continue(trained, tmp_path):
  workdir, config = trained
  params_8, _, step = checkpoint.restore_params(workdir)
  mesh = sharding.make_mesh({"data": 1, "fsdp": 4, "tensor": 2})
  params_42, _, _ = checkpoint.restore_params(workdir, mesh=mesh)
  kernel = params_42["params"]["trunk"]["layers"]["mlp"]["gate"]["kernel"]
  assert kernel.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
  for a, b in zip(jax.tree.leaves(params_8), jax.tree.leaves(params_42)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  import shutil
  copy = str(tmp_path / "copy")
  shutil.copytree(workdir, copy)
  config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 1, 4, 2
  config.train.steps = step + 2
  out = train.train_and_evaluate(config, copy)
  assert out["step"] == step + 2
  losses = train_utils.losses_by_step(copy)
  assert np.isfinite(losses[step + 2][0])


def test_nonfinite_steps_are_skipped_then_stop_the_run(tmp_path, monkeypatch):
  real = train.make_data_iterator

  class Poisoned:
    """Latents become NaN from step 3 on (batch validation off, as a bad source would be)."""

    def __init__(self, inner):
      self.inner, self.count = inner, 0

    def __next__(self):
      batch = next(self.inner)
      self.count += 1
      if self.count >= 3:
        batch["images"] = np.full_like(batch["images"], np.nan)
      return batch

    def get_state(self):
      return self.inner.get_state()

    def set_state(self, state):
      self.inner.set_state(state)

  monkeypatch.setattr(train, "make_data_iterator", lambda c, m: Poisoned(real(c, m)))
  config = train_utils.tiny_config(**{"train.steps": 20, "train.validate_batches": False,
                                      "train.max_nonfinite_steps": 4,
                                      "checkpoint.every_steps": 2})
  with pytest.raises(FloatingPointError, match="4 steps in a row"):
    train.train_and_evaluate(config, str(tmp_path))
  # The skipped steps left the parameters as they were after step 2.
  ckpts = checkpoint.Checkpointer(str(tmp_path), read_only=True).all_steps()
  assert 2 in ckpts
  p2, _, _ = checkpoint.restore_params(str(tmp_path), step=2)
  p_last, _, last = checkpoint.restore_params(str(tmp_path), step=max(ckpts))
  assert last > 2
  for a, b in zip(jax.tree.leaves(p2), jax.tree.leaves(p_last)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_incompatible_checkpoint_stops_before_touching_the_workdir(trained):
  workdir, config = trained
  before = train_utils.tree_digest(workdir)
  config.model.d_model = 48
  with pytest.raises(train.ConfigMismatchError, match="config.model.d_model: checkpoint has 32"):
    train.train_and_evaluate(config, workdir)
  assert train_utils.tree_digest(workdir) == before


def test_impossible_mesh_stops_before_creating_anything(tmp_path):
  config = train_utils.tiny_config(**{"mesh.data": 3})
  with pytest.raises(ValueError, match="config.mesh"):
    train.train_and_evaluate(config, str(tmp_path / "w"))
  assert not os.path.exists(tmp_path / "w")
  config = train_utils.tiny_config(**{"mesh.data": 8, "data.batch_size": 4})
  with pytest.raises(ValueError, match="config.data.batch_size=4"):
    train.train_and_evaluate(config, str(tmp_path / "w"))
  assert not os.path.exists(tmp_path / "w")


def test_unknown_config_key_is_an_error(tmp_path):
  proc = train_utils.run_train(str(tmp_path / "w"), "--config.train.stepz=3", check=False)
  assert proc.returncode != 0
  assert "stepz" in proc.stderr and "steps" in proc.stderr
  assert not os.path.exists(tmp_path / "w")


def test_keys_added_by_a_later_version_resume_at_their_default():
  """A checkpoint's config.json from before a model key existed still resumes when the key is
  at its default; set to something else, the key is a mismatch."""
  import json as json_lib
  from tfusion import configlib, train
  config = configlib.base_config()
  stored = json_lib.loads(config.to_json_best_effort())
  del stored["model"]["image"]["representation"], stored["model"]["image"]["codebook_size"]
  train.check_compatible(stored, config)
  config.model.image.representation = "discrete"
  with pytest.raises(train.ConfigMismatchError, match="model.image.representation: checkpoint "
                                                       "has '<missing>', config has 'discrete'"):
    train.check_compatible(stored, config)


def test_the_log_reports_model_and_hardware_flops(tmp_path, monkeypatch):
  """MFU counts the pairs the mask allows; HFU the pairs the kernel computes (whole visited
  blocks for chunked; L^2 for dense, tests/test_attention_impls.py), so HFU > MFU and skipped
  blocks never inflate MFU."""
  impl = "chunked"
  from tfusion import flops, metrics
  monkeypatch.setattr(flops, "peak_flops", lambda devices: 1e12)  # CPU has no known peak
  config = train_utils.tiny_config(**{"train.steps": 2, "checkpoint.every_steps": 100,
                                      "model.attention_impl": impl,
                                      "model.attention_block": 16})
  train.train_and_evaluate(config, str(tmp_path))
  (*_, r), = [metrics.read_jsonl(os.path.join(tmp_path, "metrics", "train.jsonl"))]
  length, rows = config.data.seq_len, config.data.batch_size
  assert 0 < r["attn_pairs"] < r["attn_pairs_computed"] < rows * length * length  # skipping
  dense_part = 12 * config.model.num_layers * config.model.num_heads * config.model.head_dim
  assert r["hfu"] > r["mfu"] > 0
  # hfu - mfu is exactly the attention work on masked elements.
  np.testing.assert_allclose((r["hfu"] - r["mfu"]) * r["step_time"] * 1e12,
                             dense_part * (r["attn_pairs_computed"] - r["attn_pairs"]),
                             rtol=1e-4)
