"""`tfusion-demo --workdir W [--quick] [--config.key=value ...]`: Transfusion end to end on CPU.

Stages, each through the code a pod run uses, each skipped when its output exists (a rerun
resumes; nothing finished is redone or overwritten):
  1. data       digits + captions and pydoc text (tfusion/demo/data.py)
  2. tokenizer  SentencePiece BPE trained on the text and captions  -> W/data/tokenizer.model
  3. vae        a small VAE trained on the training digits           -> W/vae
  4. records    latents precomputed into ArrayRecord shards, text records -> W/data/
  5. train      tfusion-train's machinery (Grain pipeline, Orbax)    -> W/run
  6. evaluate   tfusion-eval's suites on the final checkpoint and on the untrained model
  7. report     W/samples.png, W/captions.png, W/curves.png, W/report.md
`--config.model.image.representation=discrete` is the Chameleon baseline through the same stages:
a VQ-VAE (256 codes, 4x4 per digit) in W/vae, VQ codes in the records, a causal next-token model
whose generated codes the VQ-VAE decodes for the judge and the digit-FID (tfusion/demo/config.py).
A workdir holds one representation: a run of the other one there stops with a clear error.
`--quick` runs every stage with few steps (about three minutes; it still learns: judge accuracy
0.50, captioning 0.63, perplexity well below unigram); the full demo takes about fifteen
minutes on a 2-core CPU.
"""

import errno
import json
import os
import sys
import time

import numpy as np

from tfusion.demo import data as demo_data

_START = time.perf_counter()


def say(message):
  print(f"[demo {time.perf_counter() - _START:6.0f}s] {message}", flush=True)


def paths(workdir):
  d = os.path.join(workdir, "data")
  return {
      "data": d, "tokenizer": os.path.join(d, "tokenizer.model"),
      "corpus": os.path.join(d, "tokenizer_corpus.txt"),
      "text_records": os.path.join(d, "text", "pydoc.array_record"),
      "heldout_text": os.path.join(d, "heldout_text.txt"),
      "digits_train": os.path.join(d, "digits_train"),
      "digits_heldout": os.path.join(d, "digits_heldout"),
      "vae": os.path.join(workdir, "vae"), "run": os.path.join(workdir, "run"),
  }


def check_writable(workdir):
  """Fails early, with the reason, when the workdir cannot be created or written."""
  try:
    os.makedirs(workdir, exist_ok=True)
    probe = os.path.join(workdir, ".write_probe")
    with open(probe, "w", encoding="utf-8") as f:
      f.write("ok")
    os.remove(probe)
  except OSError as e:
    raise SystemExit(f"tfusion-demo: error: cannot write to the workdir {workdir!r} "
                     f"({e.strerror or e}); choose another --workdir") from None


def _write_atomic(path, text):
  tmp = path + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    f.write(text)
  os.replace(tmp, path)


# ------------------------------------------------------------------------------ stages


def stage_tokenizer(config, p):
  if os.path.exists(p["tokenizer"]):
    say(f"tokenizer: {p['tokenizer']} exists, kept")
    return
  from tfusion.data import tokenizer as tokenizer_lib
  train_docs, _ = demo_data.text_documents()
  os.makedirs(p["data"], exist_ok=True)
  lines = [" ".join(par.split()) for doc in train_docs for par in doc.split("\n\n")]
  lines += [t.format(w) for t in demo_data.TEMPLATES for w in demo_data.WORDS] * 20
  _write_atomic(p["corpus"], "\n".join(line for line in lines if line) + "\n")
  tmp_prefix = p["tokenizer"][:-len(".model")] + ".partial"
  tokenizer_lib.train_tokenizer([p["corpus"]], config.demo.tokenizer_vocab, tmp_prefix,
                                num_threads=2)
  os.replace(tmp_prefix + ".vocab", p["tokenizer"][:-len(".model")] + ".vocab")
  os.replace(tmp_prefix + ".model", p["tokenizer"])  # last: its presence means "done"
  say(f"tokenizer: trained a {config.demo.tokenizer_vocab}-piece BPE -> {p['tokenizer']}")


def _discrete(config):
  from tfusion import discrete as discrete_lib
  return discrete_lib.is_discrete(config.model)


def check_representation(config, workdir, p):
  """A workdir holds one representation: continuous outputs (KL VAE, latent records, a run)
  are not reused by a discrete run, nor the other way round. Raises SystemExit naming both."""
  from tfusion import discrete as discrete_lib
  rep = discrete_lib.representation(config.model)
  built = config.demo.get("representation", "continuous")
  if rep != built:
    raise SystemExit(f"tfusion-demo: error: config.model.image.representation={rep!r} but the "
                     f"demo config was built for {built!r} (its vocabulary, codebook and VAE "
                     f"follow it): pass --config.model.image.representation={rep} on the command "
                     f"line, or build it with tfusion.demo.config.get_config(representation="
                     f"{rep!r})")
  found = []
  vae_config = os.path.join(p["vae"], "config.json")
  if os.path.exists(vae_config):
    with open(vae_config, encoding="utf-8") as f:
      is_vq = json.load(f).get("_class_name") == "VQModel"
    found.append(("discrete" if is_vq else "continuous", vae_config))
  for records_dir in (p["digits_train"], p["digits_heldout"]):
    manifest = os.path.join(records_dir, "precompute.json")
    if os.path.exists(manifest):
      with open(manifest, encoding="utf-8") as f:
        found.append(("discrete" if "codes" in json.load(f) else "continuous", manifest))
  run_config = os.path.join(p["run"], "config.json")
  if os.path.exists(run_config):
    with open(run_config, encoding="utf-8") as f:
      model = json.load(f).get("model", {})
    found.append((model.get("image", {}).get("representation", "continuous"), run_config))
  for other, path in found:
    if other != rep:
      raise SystemExit(f"tfusion-demo: error: the workdir {workdir!r} holds a {other} demo "
                       f"({path}), and this run is {rep} (config.model.image.representation): "
                       f"a workdir holds one representation; choose another --workdir")


def _autoencoder_inputs(config):
  """The training digits in [-1, 1] and the autoencoder architecture (config.demo's): what the KL
  VAE (continuous) and the VQ-VAE (discrete) are both trained from."""
  from tfusion.vae.model import VAEConfig
  x, _, _, _ = demo_data.split()
  images = demo_data.upscale(x).astype(np.float32) / 127.5 - 1.0
  cfg = VAEConfig(block_out_channels=tuple(config.demo.vae_channels), layers_per_block=1,
                  latent_channels=config.model.image.latent_channels,
                  norm_num_groups=config.demo.vae_groups, mid_block_add_attention=False)
  return images, cfg


def stage_vae(config, p):
  if _discrete(config):
    return stage_vq(config, p)
  from tfusion import vae as vae_lib
  from tfusion.vae import train as vae_train
  if os.path.exists(os.path.join(p["vae"], vae_lib.CONFIG_FILE)):
    say(f"vae: {p['vae']} exists, kept")
    return
  images, cfg = _autoencoder_inputs(config)
  say(f"vae: training {cfg.block_out_channels} ({cfg.downsample_factor}x down) for "
      f"{config.demo.vae_steps} steps on {len(images)} digits")
  vae, report = vae_train.train_vae(
      images, cfg, steps=config.demo.vae_steps, batch_size=config.demo.vae_batch, lr=2e-3,
      kl_weight=1e-4, workdir=p["vae"] + ".training", log_every=max(config.demo.vae_steps // 4, 1),
      log=say)
  tmp = p["vae"] + ".partial"
  vae_lib.save_vae(vae, tmp)
  _write_atomic(os.path.join(tmp, "train_report.json"),
                json.dumps({k: v for k, v in report.items() if k != "history"}))
  os.replace(tmp, p["vae"])
  say(f"vae: held-out PSNR {report['heldout_psnr']:.2f} dB -> {p['vae']}")


def stage_vq(config, p):
  """Discrete: a small VQ-VAE (config.model.image.codebook_size codes) -> W/vae."""
  from tfusion import vae as vae_lib
  from tfusion.vae import train_vq, vq as vq_lib
  if os.path.exists(os.path.join(p["vae"], vae_lib.CONFIG_FILE)):
    say(f"vae: {p['vae']} exists, kept")
    return
  images, cfg = _autoencoder_inputs(config)
  num_codes = int(config.model.image.codebook_size)
  say(f"vae: training a VQ-VAE {cfg.block_out_channels} ({cfg.downsample_factor}x down, "
      f"{num_codes} codes) for {config.demo.vae_steps} steps on {len(images)} digits")
  vq, report = train_vq.train_vq(
      images, cfg, num_codes=num_codes, steps=config.demo.vae_steps,
      batch_size=config.demo.vae_batch, lr=2e-3, restart_every=max(config.demo.vae_steps // 8, 1),
      workdir=p["vae"] + ".training", log_every=max(config.demo.vae_steps // 4, 1), log=say)
  tmp = p["vae"] + ".partial"
  vq_lib.save_vq(vq, tmp)
  _write_atomic(os.path.join(tmp, "train_report.json"),
                json.dumps({k: v for k, v in report.items() if k != "history"}, default=float))
  os.replace(tmp, p["vae"])
  usage = report["heldout_usage"]
  say(f"vae: VQ held-out PSNR {report['heldout_psnr']:.2f} dB, code perplexity "
      f"{usage['perplexity']:.0f}, {usage['used']:.0%} of the codes used -> {p['vae']}")


def stage_records(config, p):
  from tfusion import vae as vae_lib
  from tfusion.data import precompute, records
  x, y, hx, hy = demo_data.split()
  if _discrete(config):  # codes instead of latents: the same writer, given the VQ-VAE
    from tfusion import discrete as discrete_lib
    from tfusion.vae import vq as vq_lib
    vae = vq_lib.load_vq(p["vae"])
    discrete_lib.check_codebook(config.model, vae.num_codes, f"the VQ-VAE {p['vae']}")
  else:
    vae = vae_lib.load_vae(p["vae"])
  index, caps = demo_data.captions_for(y, seed=config.seed)
  train = precompute.write_latent_records(demo_data.upscale(x)[index], caps, vae,
                                          p["digits_train"], resolution=32)
  held = precompute.write_latent_records(demo_data.upscale(hx),
                                         [demo_data.eval_caption(v) for v in hy], vae,
                                         p["digits_heldout"], resolution=32)
  train_docs, held_docs = demo_data.text_documents()
  if not os.path.exists(p["text_records"]):
    os.makedirs(os.path.dirname(p["text_records"]), exist_ok=True)
    records.write_records(p["text_records"], [records.text_record(t) for t in train_docs])
  if not os.path.exists(p["heldout_text"]):
    _write_atomic(p["heldout_text"], "\n\n".join(" ".join(d.split()) for d in held_docs))
  say(f"records: {train['written']} training image-caption pairs, {held['written']} held-out, "
      f"{len(train_docs)} text documents")


def configure_run(config, p):
  config.data.tokenizer = p["tokenizer"]
  config.data.text = os.path.dirname(p["text_records"])
  config.data.image_caption = p["digits_train"]
  config.vae.path = p["vae"]
  config.eval.caption_records = p["digits_heldout"]
  config.eval.ppl_files = p["heldout_text"]
  config.eval.loss_image_caption = p["digits_heldout"]
  return config


def stage_train(config, p):
  from tfusion import train
  say(f"train: {config.model.num_layers} layers x {config.model.d_model}, "
      f"{config.train.steps} steps of {config.data.batch_size} x {config.data.seq_len} positions "
      + ("(discrete image tokens, causal attention)" if _discrete(config) else
         f"({config.model.intra_image} attention inside images)"))
  return train.train_and_evaluate(config, p["run"])


def stage_evaluate(config, p):
  """Every kept checkpoint through the eval job; the untrained model (step 0) as the baseline."""
  import jax
  from tfusion import checkpoint, metrics, sharding, train_state
  from tfusion.demo import suites as demo_suites
  from tfusion.evaluate import job, suites as suites_lib
  demo_suites.register()
  names = suites_lib._split(config.eval.suites)
  steps = checkpoint.Checkpointer(p["run"], read_only=True).all_steps()
  done = job.load_done(p["run"])
  writer = metrics.MetricWriter(os.path.join(p["run"], "metrics", "eval.jsonl"),
                                os.path.join(p["run"], "tb", "eval"))
  try:
    baseline = [n for n in ("digits", "loss") if n in names and n not in done.get(0, set())]
    if baseline:
      say(f"evaluate: the untrained model (step 0), the baseline for {baseline}")
      mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])
      params0 = train_state.init_state(config, mesh, jax.random.PRNGKey(config.seed))["params"]
      job.run_suites(suites_lib.EvalContext(config, params0, 0, p["run"]), baseline,
                     train_flops=0, done=done, writer=writer, log=say)
    for step in steps:  # every kept checkpoint: the report's curves
      if set(names) - done.get(step, set()):
        say(f"evaluate: step {step} with suites {names}")
        job.evaluate_checkpoint(p["run"], step, names, config=config, done=done, writer=writer,
                                log=say)
  finally:
    writer.close()
  return steps[-1]


def main(argv=None):
  from absl import app, flags
  from tfusion import config_cli
  from tfusion.demo import config as demo_config

  argv = list(sys.argv if argv is None else argv)
  quick = "--quick" in argv
  # The representation decides the vocabulary, codebook and VAE (tfusion/demo/config.py), so it
  # is read before the config is built; the override itself is then applied as usual.
  representation = config_cli.argv_value(argv, "config.model.image.representation")
  try:
    config = demo_config.get_config(quick, representation=representation or "continuous")
  except ValueError as e:
    raise SystemExit(f"tfusion-demo: error: --config.model.image.representation: {e}") from None
  config_cli.define_config_dict("tfusion-demo", config,
                                "the demo's training config (tfusion/demo/config.py)", argv)
  config_cli.define_show_flag()
  flags.DEFINE_string("workdir", None, "where everything goes (rerun to resume)")
  flags.DEFINE_bool("quick", False, "few steps of every stage (about three minutes)")
  flags.mark_flags_as_required(["workdir"])

  def _run(argv):
    del argv
    from tfusion import logs
    logs.setup_console()  # warnings of every stage on screen; training also logs to run/logs/
    run_demo(flags.FLAGS.config, flags.FLAGS.workdir)

  app.run(_run, argv=argv, flags_parser=config_cli.flags_parser("tfusion-demo"))


def run_demo(config, workdir):
  """All stages (see module docstring). Returns the report's numbers."""
  from tfusion.demo import report
  check_writable(workdir)
  p = paths(workdir)
  config = configure_run(config, p)
  check_representation(config, workdir, p)
  try:
    say(f"workdir {os.path.abspath(workdir)} ({'quick' if config.demo.quick else 'full'} demo)")
    stage_tokenizer(config, p)
    stage_vae(config, p)
    stage_records(config, p)
    stage_train(config, p)
    final = stage_evaluate(config, p)
    numbers = report.write_report(config, workdir, p, final)
  except OSError as e:
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
      raise SystemExit(f"tfusion-demo: error: the disk is full ({e.filename or workdir}). "
                       "Finished stages in the workdir are intact: free space and rerun the "
                       "same command to resume.") from None
    if e.errno in (errno.EACCES, errno.EROFS, errno.EPERM):
      raise SystemExit(f"tfusion-demo: error: cannot write {e.filename or workdir} "
                       f"({e.strerror}).") from None
    raise
  say(f"done: {os.path.join(workdir, 'report.md')}")
  return numbers


if __name__ == "__main__":
  main()
