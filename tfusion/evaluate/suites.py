"""Evaluation suites: each turns (config, params) into a dict of numbers for one checkpoint.

Built in (configured by `config.eval`, see tfusion/configlib.py):
  fid      FID of generated images against real ones (InceptionV3 pool features)
  clip     CLIP score of generated images against their prompts
  caption  CIDEr-D and BLEU-4 of greedy captions of held-out images
  ppl      token-weighted perplexity on held-out text files
  mc       multiple-choice accuracy (acc, acc_norm) on task files
  loss     the training objective (text and image loss) on held-out records
Scripts add their own with `register_suite(name, fn)`; fn(context) -> {metric: float}.
Suites share one `EvalContext` per checkpoint, so fid and clip score the same samples.

Several processes (tfusion-eval on every host of a pod): each generates a contiguous block of
the prompts' batches on its own devices (config.eval.mesh), keeps them in the resumable sample
cache (a chunk per batch, named by its first row: processes never write the same chunk), and
the latents are gathered in prompt order, so every process scores the same samples as one
process would (each prompt's noise comes from its own key, fold_in(seed, row)).
"""

import functools
import json
import os

import numpy as np

from tfusion import paths
from tfusion.evaluate import sample_cache

SUITES = {}


def register_suite(name, fn):
  """Makes `fn(context) -> dict` available as suite `name` (config.eval.suites)."""
  SUITES[name] = fn
  return fn


def _split(spec):
  return [p.strip() for p in str(spec).split(",") if p.strip()]


class EvalContext:
  """What suites need for one checkpoint, built lazily and shared between suites."""

  def __init__(self, config, params, step, workdir, log=None, mesh=None):
    """mesh: this process's generation mesh (job.local_mesh); None or one device: as is."""
    self.config, self.params, self.step, self.workdir = config, params, step, workdir
    self.mesh = mesh if mesh is not None and mesh.devices.size > 1 else None
    self.settings = {}  # recorded with the results (sampler, steps, guidance, ...)
    self.log = log or (lambda message: None)

  def require(self, key):
    value = self.config.eval.get(key) if key in self.config.eval else self.config.get(key)
    if not value:
      raise ValueError(f"config.eval.{key} is required by the suites {self.config.eval.suites!r}")
    return value

  @functools.cached_property
  def tokenizer(self):
    from tfusion.data import tokenizer as tokenizer_lib
    path = self.config.data.tokenizer
    if not path:
      raise ValueError("config.data.tokenizer is required for evaluation")
    return tokenizer_lib.load_tokenizer(path)

  @functools.cached_property
  def image_codec(self):
    """The VAE (latents) or, in discrete mode (config.model.image.representation), the VQ-VAE
    (codes) at config.vae.path: generate/output.py's ImageCodec."""
    from tfusion.generate import output
    if not self.config.vae.path:
      raise ValueError("config.vae.path (the VAE, or the VQ-VAE of a discrete model) is "
                       "required to decode generated images")
    return output.ImageCodec(self.config.vae.path, self.config)

  def image_decoder(self, images):
    """generated latents or codes -> uint8 [N, H, W, 3]."""
    return self.image_codec.decode(images)

  @functools.cached_property
  def generator(self):
    from tfusion.generate import engine
    return engine.Generator(self.config, self.params,
                            engine.SpecialTokens.from_tokenizer(self.tokenizer), mesh=self.mesh)

  @functools.cached_property
  def scorer(self):
    from tfusion.evaluate import text_scoring
    e = self.config.eval
    return text_scoring.make_scorer(self.generator.model, self.params, batch_size=e.batch_size,
                                    length=self.seq_len)

  @property
  def seq_len(self):
    return int(self.config.eval.seq_len or self.config.data.seq_len)

  @functools.cached_property
  def prompts(self):
    """The evaluation prompts: the first num_samples of a seeded shuffle of the file."""
    return sample_prompts(self.require("prompts"), self.config.eval.num_samples,
                          self.config.eval.seed)

  def generate_images(self, captions):
    """uint8 images [N, H, W, 3] for `captions`, with the config's sampler and guidance."""
    from tfusion import discrete as discrete_lib
    from tfusion.generate import engine, image as image_lib
    e = self.config.eval
    sampler, steps = image_lib.resolve_sampler(e.sampler or None, self.config.diffusion.objective,
                                               e.steps or None,
                                               self.config.diffusion.num_train_steps, None)
    # DDPM clean-estimate bound and step spacing: config.eval's, else config.diffusion's.
    sampling = {"x0_threshold": e.get("x0_threshold") or None,
                "clip_x0": e.get("clip_x0") or None,
                "threshold_percentile": e.get("threshold_percentile") or None,
                "timestep_spacing": e.get("timestep_spacing") or None}
    objective = image_lib.sampling_objective(self.config, sampling, where="config.eval.")
    self.settings.update(sampler=sampler, steps=steps, guidance_scale=e.guidance_scale,
                         num_samples=len(captions), **objective.sampling_settings())
    discrete = discrete_lib.is_discrete(self.config.model)
    if discrete:  # codes drawn token by token (no sampler); temperature and top-k on the logits
      self.settings.update(sampler="autoregressive", steps=discrete_lib.num_image_tokens(
          self.config.model), temperature=float(e.get("image_temperature", 1.0)),
                           top_k=int(e.get("image_top_k", 0)))
    ids = [self.tokenizer.encode(c) for c in captions]
    cache = sample_cache.ChunkCache(self._sample_dir(captions))
    # Recorded, not part of the cache key: chunks do not depend on who drew them.
    import jax
    self.settings.update(processes=jax.process_count(),
                         devices_per_process=1 if self.mesh is None else self.mesh.devices.size)
    starts = process_batches(len(ids), e.batch_size)[jax.process_index()]
    mine = sum(len(ids[s:s + e.batch_size]) for s in starts)
    progress = sample_cache.Progress(mine, self.log)
    latents = []
    for start in starts:
      chunk = ids[start:start + e.batch_size]
      done = cache.get(start, len(chunk))
      if done is not None:
        progress.update(len(chunk), cached=True)
      else:
        keys = engine.sample_keys(e.seed, len(chunk), start=start)
        if discrete:
          done = np.asarray(self.generator.text_to_codes(
              chunk, keys, guidance_scale=e.guidance_scale,
              temperature=self.settings["temperature"], top_k=self.settings["top_k"]))
        else:
          done = np.asarray(self.generator.text_to_image(
              chunk, keys, sampler=sampler, steps=steps, guidance_scale=e.guidance_scale,
              sampling=sampling))
        cache.put(start, done)
        progress.update(len(chunk))
      latents.append(done)
    # A process with no batch of its own (fewer batches than processes) sends zero rows.
    local = (np.concatenate(latents) if latents
             else np.zeros((0, *self.generator.latent_shape), np.float32))
    return self.image_decoder(gather_rows(local, len(ids), e.batch_size))

  def clear_samples(self):
    """Deletes this checkpoint's kept samples (once every suite that reads them is done; with
    several processes, once all are done: each deletes, whichever finds the files)."""
    import jax
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      multihost_utils.sync_global_devices(f"tfusion:eval-clear-samples-{self.step}")
    if self.workdir:
      root = paths.join(self.workdir, "eval_cache", "samples")
      for name in (paths.listdir(root) if paths.isdir(root) else []):
        if name.startswith(f"step{self.step}-"):
          paths.rmtree(paths.join(root, name))

  def _sample_dir(self, captions):
    """Where this checkpoint's samples for `captions` are kept (None without a workdir)."""
    if not self.workdir:
      return None
    e = self.config.eval
    key = sample_cache.cache_key(step=self.step, captions=captions, settings=self.settings,
                                 seed=e.seed, batch_size=e.batch_size,
                                 params=sample_cache.params_fingerprint(self.params))
    return paths.join(self.workdir, "eval_cache", "samples", f"step{self.step}-{key}")

  @functools.cached_property
  def generated(self):
    """(captions, uint8 images) of the evaluation prompts, shared by fid and clip."""
    captions = self.prompts
    return captions, self.generate_images(captions)


def process_batches(count, batch_size, num_processes=None):
  """First rows of the batches each process generates: [per process: [start, ...]].

  Batches of `batch_size` rows (as on one process, so chunks and samples do not depend on
  the process count), dealt out in contiguous blocks: process 0 the first ones.
  """
  import jax
  n = jax.process_count() if num_processes is None else num_processes
  starts = np.arange(0, count, batch_size)
  return [[int(s) for s in block] for block in np.array_split(starts, n)]


def gather_rows(local, count, batch_size):
  """Every process's rows (from `process_batches`) in prompt order, on every process."""
  import jax
  n = jax.process_count()
  if n == 1:
    return local
  from jax.experimental import multihost_utils
  sizes = [sum(min(batch_size, count - s) for s in block)
           for block in process_batches(count, batch_size, n)]
  if len(local) != sizes[jax.process_index()]:
    raise RuntimeError(f"process {jax.process_index()} holds {len(local)} rows, expected "
                       f"{sizes[jax.process_index()]}")
  padded = np.zeros((max(sizes), *local.shape[1:]), local.dtype)
  padded[:len(local)] = local
  everyone = np.asarray(multihost_utils.process_allgather(padded))  # [processes, max, ...]
  return np.concatenate([everyone[p, :size] for p, size in enumerate(sizes)])


def sample_prompts(path, count, seed):
  """Captions from a .txt (one per line) or .jsonl ({"caption": ...}) file."""
  if not os.path.exists(path):
    raise FileNotFoundError(f"prompt file {path!r} does not exist (config.eval.prompts)")
  captions = []
  with open(path, encoding="utf-8") as f:
    for line_no, line in enumerate(f, start=1):
      if not line.strip():
        continue
      if path.endswith(".jsonl"):
        try:
          text = json.loads(line)["caption"]
        except (json.JSONDecodeError, KeyError, TypeError):
          raise ValueError(f"{path}:{line_no}: expected a JSON object with a 'caption'") from None
      else:
        text = line.strip()
      if not isinstance(text, str) or not text.strip():
        raise ValueError(f"{path}:{line_no}: empty caption")
      captions.append(text.strip())
  if not captions:
    raise ValueError(f"prompt file {path} holds no captions (config.eval.prompts)")
  order = np.random.default_rng(seed).permutation(len(captions))[:count]
  return [captions[i] for i in order]


def fid_suite(ctx):
  from tfusion.evaluate import fid, inception
  network = inception.FIDInception(ctx.require("fid_weights"))
  _, images = ctx.generated
  resolution = images.shape[1]
  reference, _ = fid.reference_statistics(
      ctx.require("fid_reference"), network, resolution=resolution,
      cache_dir=paths.join(ctx.workdir, "eval_cache"))
  generated = fid.statistics_of_images(images, network, resolution=resolution)
  return {"fid": fid.fid(generated, reference)}


def clip_suite(ctx):
  from tfusion.evaluate import clip
  scorer = clip.CLIPScorer(ctx.require("clip_weights"))
  captions, images = ctx.generated
  return {"clip_score": scorer(images, captions)}


def load_caption_references(spec, max_images):
  """Held-out (latent, [reference captions]) from image-caption records, grouped by id."""
  from tfusion.data import records
  groups = {}
  for path in records.resolve_paths(spec, key="config.eval.caption_records"):
    for i, rec in enumerate(records.read_records(path)):
      if rec["kind"] != "image_caption":
        raise ValueError(f"{path}: record {i} is {rec['kind']!r}, not image_caption "
                         "(config.eval.caption_records)")
      key = rec.get("id") or f"{path}:{i}"
      image = (np.asarray(rec["codes"], np.int32) if "codes" in rec  # discrete: VQ codes
               else np.asarray(rec["latent"], np.float32))
      latent, refs = groups.setdefault(key, (image, []))
      refs.append(rec["caption"])
      if len(groups) > max_images:
        groups.pop(key)
        break
  return list(groups.values())


def caption_suite(ctx):
  from tfusion.evaluate import caption_metrics
  from tfusion.generate import engine
  e = ctx.config.eval
  items = load_caption_references(ctx.require("caption_records"), e.caption_max_images)
  candidates = []
  for start in range(0, len(items), e.batch_size):
    chunk = items[start:start + e.batch_size]
    latents = np.stack([lat for lat, _ in chunk])
    ids = ctx.generator.caption(latents, engine.sample_keys(e.seed, len(chunk), start=start),
                                max_new_tokens=e.caption_max_tokens)
    candidates.extend(ctx.tokenizer.decode(i) for i in ids)
  references = [refs for _, refs in items]
  ctx.settings.update(caption_images=len(items))
  return {"cider": caption_metrics.cider_d(candidates, references)[0],
          "bleu4": caption_metrics.bleu(candidates, references)}


def ppl_suite(ctx):
  from tfusion.evaluate import perplexity
  e = ctx.config.eval
  out = {}
  for path in _split(ctx.require("ppl_files")):
    name = os.path.splitext(os.path.basename(path))[0]
    result = perplexity.perplexity(ctx.scorer, ctx.tokenizer, perplexity.read_documents(path),
                                   length=ctx.seq_len, max_tokens=e.ppl_max_tokens or None)
    out[f"ppl/{name}"] = result["ppl"]
    out[f"ppl_tokens/{name}"] = result["tokens"]
  return out


def mc_suite(ctx):
  from tfusion.evaluate import multiple_choice
  out = {}
  for path in _split(ctx.require("mc_tasks")):
    name = os.path.splitext(os.path.basename(path))[0]
    result = multiple_choice.evaluate_task(ctx.scorer, ctx.tokenizer,
                                           multiple_choice.load_task(path), max_len=ctx.seq_len)
    out.update({f"mc/{name}/acc": result["acc"], f"mc/{name}/acc_norm": result["acc_norm"]})
  return out


def loss_suite(ctx):
  from tfusion import train_state
  from tfusion.evaluate import heldout_loss
  return heldout_loss.heldout_loss(train_state.build_model(ctx.config), ctx.params, ctx.config,
                                   rows=ctx.config.eval.loss_rows, tokenizer=ctx.tokenizer)


for _name, _fn in (("fid", fid_suite), ("clip", clip_suite), ("caption", caption_suite),
                   ("ppl", ppl_suite), ("mc", mc_suite), ("loss", loss_suite)):
  register_suite(_name, _fn)
