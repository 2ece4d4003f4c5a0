"""The `loss` eval suite: the training objective on held-out records, comparable across
checkpoints and batch sizes."""

import numpy as np
import pytest

import train_utils
from tfusion import checkpoint, train, train_state
from tfusion.data import records, samples
from tfusion.evaluate import heldout_loss, suites


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  root = tmp_path_factory.mktemp("lossrun")
  samples.sample_tokenizer(str(root), vocab_size=400)
  records.write_records(str(root / "text.array_record"), [
      records.text_record(t) for _, t in samples.pydoc_topics()[:20]])
  rng = np.random.default_rng(0)
  records.write_records(str(root / "pairs.array_record"), [
      records.image_caption_record(rng.standard_normal((4, 4, 4)).astype(np.float32),
                                   f"picture number {i}") for i in range(12)])
  config = train_utils.tiny_config(**{"train.steps": 4, "checkpoint.every_steps": 2,
                                      "checkpoint.keep": 10, "model.vocab_size": 512,
                                      "data.tokenizer": str(root / "tokenizer.model"),
                                      "model.max_len": 48})
  config.eval.loss_text = str(root / "text.array_record")
  config.eval.loss_image_caption = str(root / "pairs.array_record")
  workdir = str(root / "run")
  train.train_and_evaluate(config, workdir)
  return workdir, config


def _score(run, step, **eval_overrides):
  workdir, config = run
  params, _, _ = checkpoint.restore_params(workdir, step=step)
  config = config.copy_and_resolve_references()
  config.eval.update(eval_overrides)
  return heldout_loss.heldout_loss(train_state.build_model(config), params, config,
                                   rows=config.eval.loss_rows)


def test_scores_are_reproducible_and_follow_the_checkpoint(run):
  first, again = _score(run, 4, loss_rows=8, batch_size=4), _score(run, 4, loss_rows=8,
                                                                   batch_size=4)
  assert first == again
  assert first["loss/text_tokens"] > 0 and first["loss/images"] > 0
  assert np.isfinite(first["loss/text"]) and np.isfinite(first["loss/image"])
  assert first["loss/total"] == pytest.approx(first["loss/text"] + 5.0 * first["loss/image"])
  assert _score(run, 2, loss_rows=8, batch_size=4)["loss/text"] != first["loss/text"]


def test_text_loss_is_token_weighted_over_all_rows(run):
  """Text only (no noise involved): 8 rows scored 2 at a time or 8 at once give one number."""
  by_two = _score(run, 4, loss_rows=8, batch_size=2, loss_image_caption="")
  at_once = _score(run, 4, loss_rows=8, batch_size=8, loss_image_caption="")
  assert by_two["loss/text_tokens"] == at_once["loss/text_tokens"]
  assert by_two["loss/text"] == pytest.approx(at_once["loss/text"], rel=1e-5)
  assert np.isnan(at_once["loss/image"]) and at_once["loss/images"] == 0


def test_the_suite_runs_from_the_eval_job_and_leaves_the_run_config_alone(run):
  workdir, config = run
  params, _, _ = checkpoint.restore_params(workdir)
  ctx = suites.EvalContext(config, params, 4, workdir)
  out = suites.SUITES["loss"](ctx)
  assert out["loss/images"] > 0
  assert config.data.source == "synthetic" and config.data.text == ""


def test_no_held_out_source_is_a_clear_error(run):
  with pytest.raises(ValueError, match="config.eval.loss_text"):
    _score(run, 4, loss_text="", loss_image_caption="")
