"""The eval job: every suite on real checkpoints, exactly once per (step, suite), across a kill
and a restart, beside a training run."""

import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

import train_utils
from tfusion import metrics, train
from tfusion.data import records, samples
from tfusion.evaluate import job, plot


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
  """A tiny trained run (checkpoints 2 and 4) plus tokenizer, VAE and evaluation files."""
  root = tmp_path_factory.mktemp("evalrun")
  tok = samples.sample_tokenizer(str(root), vocab_size=400)
  from tfusion import vae as vae_lib
  from tfusion.vae.model import VAEConfig
  vae = vae_lib.init_vae(VAEConfig(block_out_channels=(8, 8), layers_per_block=1,
                                   latent_channels=4, norm_num_groups=4))
  vae_lib.save_vae(vae, str(root / "vae"))  # 2x down: 8x8 images <-> 4x4x4 latents
  (root / "prompts.txt").write_text("a red square\ntwo small circles\nthe number seven\n")
  (root / "held.txt").write_text("\n\n".join(t for _, t in samples.pydoc_topics()[:3]))
  # A task whose answers hold for any model: the gold choice is a prefix of the other, whose
  # extra tokens can only lower the (unnormalized) log-likelihood. acc must be 1.
  (root / "task.jsonl").write_text("\n".join(json.dumps(x) for x in [
      {"context": "Question: what is help?\nAnswer:",
       "choices": [" a function", " a function that prints the manual of a module"], "gold": 0},
      {"context": "The loop", "choices": [" ends with break and then the next line runs",
                                          " ends with break"], "gold": 1}]))
  rng = np.random.default_rng(0)
  records.write_records(str(root / "captions.array_record"), [
      records.image_caption_record(rng.standard_normal((4, 4, 4)).astype(np.float32),
                                   caption, id=f"img{i // 2}")
      for i, caption in enumerate(["a red square", "a square, red", "two circles", "circles"])])
  from tfusion.evaluate import clip
  cfg = clip.CLIPConfig(embed_dim=16, image_size=16, patch_size=8, vision_width=16,
                        vision_layers=1, vision_heads=2, text_width=16, text_layers=1,
                        text_heads=2, context_length=16)
  clip.save_weights(str(root / "clip.npz"), cfg, clip.random_params(cfg))

  config = train_utils.tiny_config(**{"train.steps": 4, "checkpoint.every_steps": 2,
                                      "checkpoint.keep": 100, "model.vocab_size": 512,
                                      "data.tokenizer": str(root / "tokenizer.model"),
                                      "vae.path": str(root / "vae"), "model.max_len": 48})
  e = config.eval
  e.prompts, e.num_samples, e.steps, e.batch_size = str(root / "prompts.txt"), 3, 4, 4
  e.ppl_files, e.ppl_max_tokens = str(root / "held.txt"), 300
  e.mc_tasks = str(root / "task.jsonl")
  e.caption_records, e.caption_max_tokens = str(root / "captions.array_record"), 6
  e.clip_weights = str(root / "clip.npz")
  workdir = str(root / "run")
  train.train_and_evaluate(config, workdir)
  assert tok.vocab_size <= 512
  return workdir, config


def _expected_caption_scores(workdir, config, step):
  """CIDEr-D and BLEU-4 of the checkpoint's greedy captions of the two held-out images (each
  id's first latent, its two captions as references), computed here from the parts."""
  from tfusion import checkpoint
  from tfusion.data import tokenizer as tokenizer_lib
  from tfusion.evaluate import caption_metrics
  from tfusion.generate import engine
  recs = records.read_records(os.path.join(os.path.dirname(workdir), "captions.array_record"))
  latents = np.stack([recs[0]["latent"], recs[2]["latent"]]).astype(np.float32)
  references = [["a red square", "a square, red"], ["two circles", "circles"]]
  tok = tokenizer_lib.load_tokenizer(config.data.tokenizer)
  params, _, _ = checkpoint.restore_params(workdir, step=step)
  gen = engine.Generator(config, params, engine.SpecialTokens.from_tokenizer(tok))
  ids = gen.caption(latents, engine.sample_keys(config.eval.seed, 2),
                    max_new_tokens=config.eval.caption_max_tokens)
  candidates = [tok.decode(i) for i in ids]
  return {"cider": caption_metrics.cider_d(candidates, references)[0],
          "bleu4": caption_metrics.bleu(candidates, references)}


def test_every_suite_runs_once_per_checkpoint(run_dir):
  workdir, config = run_dir
  suites = ["clip", "caption", "ppl", "mc"]
  assert job.run(workdir, suites, config=config, once=True, log=lambda s: None) == [2, 4]
  lines = metrics.read_jsonl(os.path.join(workdir, "metrics", "eval.jsonl"))
  assert sorted((r["step"], r["suite"]) for r in lines) == sorted(
      (s, n) for s in (2, 4) for n in suites)
  by = {(r["step"], r["suite"]): r for r in lines}
  assert 0 <= by[(4, "clip")]["clip_score"] <= 100  # the score itself: test_eval_clip.py
  assert by[(4, "clip")]["settings"]["guidance_scale"] == 5.0
  assert all(r["settings"]["weights"] == "raw" for r in lines)  # this run kept no EMA
  for step in (2, 4):
    want = _expected_caption_scores(workdir, config, step)
    assert by[(step, "caption")]["cider"] == pytest.approx(want["cider"], abs=1e-9)
    assert by[(step, "caption")]["bleu4"] == pytest.approx(want["bleu4"], abs=1e-9)
  assert by[(4, "ppl")]["ppl_tokens/held"] == 300 and by[(4, "ppl")]["ppl/held"] > 1
  assert by[(2, "mc")]["mc/task/acc"] == by[(4, "mc")]["mc/task/acc"] == 1.0
  assert by[(4, "ppl")]["train_flops"] == 2 * by[(2, "ppl")]["train_flops"] > 0
  # Nothing left to do: a second pass evaluates nothing.
  assert job.run(workdir, suites, config=config, once=True, log=lambda s: None) == []
  out = plot.plot_curves(plot.workdir_panels(workdir), os.path.join(workdir, "curves.png"))
  assert os.path.getsize(out) > 1000


def test_bad_eval_inputs_name_the_file(run_dir, tmp_path):
  from tfusion.evaluate import suites
  empty = tmp_path / "empty.txt"
  empty.write_text("\n")
  with pytest.raises(ValueError, match="empty.txt"):
    suites.sample_prompts(str(empty), 5, 0)
  with pytest.raises(FileNotFoundError, match="config.eval.prompts"):
    suites.sample_prompts(str(tmp_path / "nope.txt"), 5, 0)
  workdir, config = run_dir
  with pytest.raises(ValueError, match="unknown eval suite 'fidd'"):
    job.run(workdir, ["fidd"], config=config, once=True)


def test_watcher_beside_training_survives_kill_and_restart(tmp_path):
  root = tmp_path
  samples.sample_tokenizer(str(root), vocab_size=400)
  (root / "held.txt").write_text("\n\n".join(t for _, t in samples.pydoc_topics()[:2]))
  workdir = str(root / "run")
  flags = ["--config.train.steps=12", "--config.checkpoint.every_steps=3",
           "--config.checkpoint.keep=100", "--config.model.vocab_size=512",
           f"--config.data.tokenizer={root / 'tokenizer.model'}",
           f"--config.eval.ppl_files={root / 'held.txt'}", "--config.eval.ppl_max_tokens=200",
           "--config.eval.poll_seconds=0.2", "--config.eval.suites=ppl"]
  training = train_utils.start_train(workdir, *flags)
  cmd, env = train_utils.train_command(workdir, *flags)
  watch_cmd = [sys.executable, "-m", "tfusion.evaluate.job"] + cmd[3:]  # same flags
  eval_jsonl = os.path.join(workdir, "metrics", "eval.jsonl")
  watcher = subprocess.Popen(watch_cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
  try:
    train_utils.wait_for(lambda: len(metrics.read_jsonl(eval_jsonl)) >= 1, what="a first eval",
                         proc=watcher)
  finally:  # never leave a watcher behind
    watcher.send_signal(signal.SIGKILL)
    watcher.wait()
  _, err = training.communicate(timeout=600)
  assert training.returncode == 0, err[-2000:]
  restarted = subprocess.run(watch_cmd, env=env, capture_output=True, text=True, timeout=600)
  assert restarted.returncode == 0, restarted.stderr[-2000:]  # exits after the final step
  steps = [r["step"] for r in metrics.read_jsonl(eval_jsonl)]
  assert sorted(steps) == [3, 6, 9, 12], steps  # each checkpoint exactly once


@pytest.mark.slow
def test_fid_suite_with_random_inception_weights(run_dir, tmp_path):
  from tfusion.evaluate import inception
  rng = np.random.default_rng(0)
  flat = {}
  for name, shape in inception.variable_shapes().items():
    if name.endswith("var"):
      flat[name] = np.ones(shape, np.float32)
    elif name.endswith(("mean", "bias")):
      flat[name] = np.zeros(shape, np.float32)
    else:
      flat[name] = (rng.standard_normal(shape) / np.sqrt(np.prod(shape[:-1]))).astype(np.float32)
  np.savez(tmp_path / "inception.npz", **flat)
  real = tmp_path / "real"
  real.mkdir()
  from PIL import Image
  for i in range(4):
    Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(real / f"{i}.png")
  workdir, config = run_dir
  config = config.copy_and_resolve_references()
  config.eval.fid_weights, config.eval.fid_reference = str(tmp_path / "inception.npz"), str(real)
  results = job.evaluate_checkpoint(workdir, 4, ["fid"], config=config, log=lambda s: None)
  assert np.isfinite(results["fid"]["fid"]) and results["fid"]["fid"] >= 0
  assert any(f.startswith("fid_stats_") for f in os.listdir(os.path.join(workdir, "eval_cache")))


def test_killed_sampling_resumes_from_its_chunks(run_dir, tmp_path, monkeypatch):
  """Generated latents are kept per batch: a sampling job killed after two of three batches
  generates only the third when restarted, and its images equal an uninterrupted run's."""
  from tfusion import checkpoint
  from tfusion.evaluate import suites
  from tfusion.generate import engine
  workdir, config = run_dir
  params, stored, _ = checkpoint.restore_params(workdir, step=4)
  cfg = job._with_eval_overrides(stored, config).copy_and_resolve_references()
  cfg.eval.batch_size = 1
  prompts = ["a red square", "two small circles", "the number seven"]
  straight = suites.EvalContext(cfg, params, 4, str(tmp_path / "a")).generate_images(prompts)

  calls = []
  original = engine.Generator.text_to_image

  def counted(self, *args, **kwargs):
    calls.append(1)
    if kill_after is not None and len(calls) > kill_after:
      raise KeyboardInterrupt("killed")
    return original(self, *args, **kwargs)

  monkeypatch.setattr(engine.Generator, "text_to_image", counted)
  kill_after = 2
  with pytest.raises(KeyboardInterrupt):
    suites.EvalContext(cfg, params, 4, str(tmp_path / "b")).generate_images(prompts)
  calls.clear()
  kill_after = None
  lines = []
  ctx = suites.EvalContext(cfg, params, 4, str(tmp_path / "b"), log=lines.append)
  resumed = ctx.generate_images(prompts)
  assert len(calls) == 1, "only the batch the kill interrupted is generated again"
  np.testing.assert_array_equal(resumed, straight)
  assert "3/3 images" in lines[-1] and "eta" in lines[-1]
  # Other weights (a different params fingerprint) never read these samples.
  other = {"params": __import__("jax").tree.map(lambda x: x * 1.01, params["params"])}
  calls.clear()
  suites.EvalContext(cfg, other, 4, str(tmp_path / "b")).generate_images(prompts)
  assert len(calls) == 3
  ctx.clear_samples()
  assert not os.listdir(tmp_path / "b" / "eval_cache" / "samples")
