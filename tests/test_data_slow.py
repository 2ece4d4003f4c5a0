"""Slow data tests: Grain worker processes resume exactly; training on records resumes exactly.

Run with `python -m pytest -m slow tests/test_data_slow.py`.
"""

import json

import jax
import numpy as np
import pytest

import train_utils
from test_data_pipeline import assert_same, make_config, take
from tfusion import train
from tfusion.data import pipeline, samples


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  d = tmp_path_factory.mktemp("slowdata")
  tok = samples.sample_tokenizer(str(d), vocab_size=1000)
  samples.write_text_records(str(d / "text.array_record"), samples.pydoc_topics())
  samples.write_image_caption_records(str(d / "images.array_record"), 60, (8, 8, 4))
  samples.write_image_caption_records(str(d / "small.array_record"), 60, (4, 4, 4))
  return {"tok": tok, "text": str(d / "text.array_record"),
          "images": str(d / "images.array_record"), "small": str(d / "small.array_record")}


@pytest.mark.slow
def test_worker_processes_resume_exactly(data):
  config = make_config(data, worker_count=2, prefetch=1)
  it = pipeline.make_iterator(config)
  take(it, 4)
  state = json.loads(json.dumps(it.get_state()))
  expected = take(it, 3)
  it.close()
  resumed = pipeline.make_iterator(config)
  resumed.set_state(state)
  assert_same(take(resumed, 3), expected)
  resumed.close()


@pytest.mark.slow
def test_training_on_records_resumes_exactly(data, tmp_path):
  config = train_utils.tiny_config()
  config.model.vocab_size = 1024
  config.data.update(dict(source="grain", tokenizer=data["tok"].source, text=data["text"],
                          image_caption=data["small"], pack_pool=8))
  config.checkpoint.every_steps = 3
  config.checkpoint.async_save = False
  config.train.steps = 6
  straight = train.train_and_evaluate(config, str(tmp_path / "straight"))
  config.train.steps = 3
  train.train_and_evaluate(config, str(tmp_path / "split"))
  config.train.steps = 6
  resumed = train.train_and_evaluate(config, str(tmp_path / "split"))
  assert straight["step"] == resumed["step"] == 6
  for a, b in zip(jax.tree.leaves(straight["state"]["params"]),
                  jax.tree.leaves(resumed["state"]["params"])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert (train_utils.losses_by_step(str(tmp_path / "straight"))
          == train_utils.losses_by_step(str(tmp_path / "split")))
