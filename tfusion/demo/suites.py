"""The demo's evaluation suites, registered with the eval job (tfusion/evaluate/suites.py).

  digits         text-to-image: `samples_per_digit` images per digit from "a handwritten digit
                 seven"-style prompts, judged by a digit classifier trained on real digits
                 (accuracy overall and per digit) and a digit-FID against the held-out real
                 digits in the classifier's feature space.
  digit_caption  image-to-text: greedy captions of held-out real digits; accuracy = the caption
                 names the right digit (and no other).
Side outputs (for the report's pictures) go to W/eval_samples/.
"""

import json
import os

import numpy as np

from tfusion.demo import data as demo_data
from tfusion.demo import judge as judge_lib
from tfusion.evaluate import fid
from tfusion.evaluate import suites as suites_lib

_JUDGE = {}


def judge():
  """The digit judge, trained once per process on the training split of the real digits."""
  if "judge" not in _JUDGE:
    x, y, hx, hy = demo_data.split()
    j = judge_lib.DigitJudge.train(demo_data.upscale(x), y)
    _JUDGE["judge"] = j
    _JUDGE["heldout_accuracy"] = j.accuracy(demo_data.upscale(hx), hy)
    _JUDGE["heldout_images"] = demo_data.upscale(hx)
  return _JUDGE["judge"]


def judge_heldout_accuracy():
  judge()
  return _JUDGE["heldout_accuracy"]


def _samples_dir(ctx):
  path = os.path.join(ctx.workdir, "eval_samples")
  os.makedirs(path, exist_ok=True)
  return path


def digits_suite(ctx):
  per = int(ctx.config.demo.samples_per_digit)
  labels = np.repeat(np.arange(10), per)
  images = ctx.generate_images([demo_data.eval_caption(label) for label in labels])
  j = judge()
  predicted = j.predict(images)
  out = {"t2i_accuracy": float(np.mean(predicted == labels))}
  for digit in range(10):
    out[f"t2i_accuracy/{demo_data.WORDS[digit]}"] = float(np.mean(predicted[labels == digit]
                                                                  == digit))
  real = fid.statistics_of_images(_JUDGE["heldout_images"], j, resolution=images.shape[1])
  generated = fid.statistics_of_images(images, j, resolution=images.shape[1])
  out["digit_fid"] = fid.fid(generated, real)
  np.savez_compressed(os.path.join(_samples_dir(ctx), f"digits_step{ctx.step}.npz"),
                      images=images, labels=labels, predicted=predicted)
  return out


def digit_caption_suite(ctx):
  from tfusion.generate import engine
  e = ctx.config.eval
  items = suites_lib.load_caption_references(ctx.require("caption_records"), e.caption_max_images)
  texts = []
  for start in range(0, len(items), e.batch_size):
    chunk = items[start:start + e.batch_size]
    ids = ctx.generator.caption(np.stack([lat for lat, _ in chunk]),
                                engine.sample_keys(e.seed, len(chunk), start=start),
                                max_new_tokens=e.caption_max_tokens)
    texts.extend(ctx.tokenizer.decode(i) for i in ids)
  truth = [demo_data.named_digit(refs[0]) for _, refs in items]
  correct = [demo_data.named_digit(t) == y for t, y in zip(texts, truth)]
  with open(os.path.join(_samples_dir(ctx), f"captions_step{ctx.step}.json"), "w",
            encoding="utf-8") as f:
    json.dump({"captions": texts, "labels": truth}, f)
  return {"caption_accuracy": float(np.mean(correct)), "caption_images": len(items)}


def register():
  suites_lib.register_suite("digits", digits_suite)
  suites_lib.register_suite("digit_caption", digit_caption_suite)
