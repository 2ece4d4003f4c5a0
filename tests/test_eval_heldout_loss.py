"""The `loss` eval suite: the training objective on held-out records, comparable across
checkpoints and batch sizes."""

import numpy as np
import pytest

import train_utils
from tfusion import checkpoint, train, train_state
from tfusion.evaluate import heldout_loss, suites


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  root = tmp_path_factory.mktemp("lossrun")
  train_utils.grain_data(root)  # tokenizer, text and image-caption records
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
  assert _score(run, 2, loss_rows=8, batch_size=4)["loss/text"] != first["loss/text"]


def _text_loss_by_hand(run, step, rows, batch_size):
  """Token-weighted next-token cross-entropy (numpy) of the held-out text rows, from the
  model's logits: no noise is involved when no row holds an image."""
  import jax
  from tfusion.data import pipeline
  workdir, config = run
  config = config.copy_and_resolve_references()
  config.eval.update(batch_size=batch_size, loss_image_caption="")
  params, _, _ = checkpoint.restore_params(workdir, step=step)
  apply = jax.jit(train_state.build_model(config).apply)
  it = pipeline.make_iterator(heldout_loss.heldout_config(config))
  total = count = 0.0
  for _ in range(-(-rows // batch_size)):
    b = next(it)
    assert not b["image_mask"].any()
    logits, _ = apply(params, b["tokens"], b["positions"], b["segment_ids"], b["image_index"],
                      b["images"], np.zeros(b["image_mask"].shape, np.float32))
    logits = np.asarray(logits, np.float64)
    log_probs = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1,
                                keepdims=True)) - logits.max(-1, keepdims=True)
    ce = -np.take_along_axis(log_probs, b["targets"][..., None], -1)[..., 0]
    total += ce[b["text_loss_mask"]].sum()
    count += b["text_loss_mask"].sum()
  it.close()
  return total / count, count


def test_text_loss_is_token_weighted_over_all_rows(run):
  """Text only: 8 rows scored 2 at a time or 8 at once give the cross-entropy computed here."""
  by_two = _score(run, 4, loss_rows=8, batch_size=2, loss_image_caption="")
  at_once = _score(run, 4, loss_rows=8, batch_size=8, loss_image_caption="")
  want, tokens = _text_loss_by_hand(run, 4, rows=8, batch_size=8)
  assert by_two["loss/text_tokens"] == at_once["loss/text_tokens"] == tokens
  assert at_once["loss/text"] == pytest.approx(want, rel=1e-5)
  assert by_two["loss/text"] == pytest.approx(want, rel=1e-5)
  assert np.isnan(at_once["loss/image"]) and at_once["loss/images"] == 0


def test_total_uses_the_configured_image_weight(run):
  """total = text + config.loss.image_weight * image with the run's weight (here 2, not the
  paper's 5 that the other tests use)."""
  workdir, config = run
  config = config.copy_and_resolve_references()
  config.loss.image_weight = 2.0
  two = _score((workdir, config), 4, loss_rows=8, batch_size=4)
  assert two["loss/images"] > 0
  assert two["loss/total"] == pytest.approx(two["loss/text"] + 2.0 * two["loss/image"], rel=1e-6)


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
