"""`Generator`: batched text decoding, image sampling and their interleaving for one model.

Host-side driver around the jitted pieces in context.py, text.py and image.py. Inputs are
checked (prompt lengths against the context, the sampler against the objective, image layers
in the checkpoint) before anything is compiled or run.

Randomness is per sample: callers pass one PRNG key per row (`sample_keys`), so a sample is
the same whether drawn alone or in a batch.

Data parallel over a mesh (`mesh=`, axes ('data', 'fsdp', 'tensor') as in training): the rows
of a batch (tokens, KV cache, latents, keys) are split over data x fsdp, the params placed by
the logical rules of tfusion/sharding.py (fsdp / tensor shard a model too big for one device),
and the model's activation constraints apply as in training. The task methods (text_to_image,
caption, complete, interleaved) pad a batch to a multiple of data x fsdp with copies of its
last row (and key) and drop those rows after: a real row keeps its key, so its sample does not
depend on the device count. The building blocks (prefill, decode_text, ...) need batches that
divide. Without a mesh everything runs where the params are (as before).

Discrete images (config.model.image.representation="discrete", tfusion/discrete.py): images
are n VQ codes drawn token by token with the KV cache (tfusion/generate/discrete.py; guidance on
logits, temperature, top-k); `text_to_image` returns codes int32 [B, h, w] (decode them with
the VQ-VAE: `VQVAE.decode_codes`) and `caption` reads codes.
"""

import dataclasses
import functools
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from tfusion import diffusion, sharding
from tfusion import discrete as discrete_lib
from tfusion.generate import context as context_lib
from tfusion.generate import discrete as discrete_gen
from tfusion.generate import image as image_lib
from tfusion.generate import text as text_lib
from tfusion.model import transfusion

IMAGE_LAYERS = ("time_embedding", "image_in", "image_out")
_JITS = {}  # (model config, piece, mesh) -> jitted function; compiled once per process
BATCH_AXES = ("data", "fsdp")  # mesh axes the rows of a batch are split over (as in training)


@dataclasses.dataclass(frozen=True)
class SpecialTokens:
  """Ids of the tokens generation uses."""
  bos: int
  eos: int
  boi: int
  eoi: int

  @classmethod
  def from_tokenizer(cls, tokenizer):
    return cls(bos=int(tokenizer.bos_id), eos=int(tokenizer.eos_id), boi=int(tokenizer.boi_id),
               eoi=int(tokenizer.eoi_id))


@dataclasses.dataclass
class TextResult:
  """Decoded text of B rows (numpy)."""
  tokens: np.ndarray  # int32 [B, n], 0 after a row's end
  lengths: np.ndarray  # int32 [B], tokens emitted (stop token included)
  stop_token: np.ndarray  # int32 [B], the stop token that ended the row, -1 if none
  logits: Optional[np.ndarray] = None  # float32 [B, n, V] when asked for

  def ids(self, row):
    """The row's generated ids without its stop token."""
    n = int(self.lengths[row]) - (self.stop_token[row] >= 0)
    return [int(t) for t in self.tokens[row, :n]]


def sample_keys(seed, count, start=0):
  """Per-sample PRNG keys [count, 2]: key i = fold_in(PRNGKey(seed), start + i)."""
  base = jax.random.PRNGKey(seed)
  return jax.vmap(lambda i: jax.random.fold_in(base, i))(jnp.arange(start, start + count))


def check_image_layers(params, config):
  """Raises ValueError unless the config and the checkpoint's parameters have image layers."""
  if not config.model.get("image"):
    raise ValueError("config.model has no 'image' block: this model cannot generate or read "
                     "images")
  tree = params.get("params", params) if hasattr(params, "get") else params
  missing = [name for name in IMAGE_LAYERS if name not in tree]
  if missing:
    raise ValueError(f"the checkpoint's parameters have no image layers ({', '.join(missing)} "
                     "missing): this model cannot generate or read images")


def _fold(keys, value):
  return jax.vmap(lambda k: jax.random.fold_in(k, value))(keys)


class Generator:
  """Generation with one Transfusion model.

  Args:
    config: the full run config (uses config.model and config.diffusion).
    params: model variables {"params": ...} (e.g. from tfusion.checkpoint.restore_params).
    special: SpecialTokens.
    max_len: cache length; default config.model.max_len (the model's context).
    fast_compile: compile with XLA's backend optimisations off (about 3x faster compiles on
      CPU, slower runs: tests and smoke runs).
    mesh: a jax Mesh with axes ('data', 'fsdp', 'tensor') (tfusion.sharding.make_mesh) to
      generate on: rows over data x fsdp, params placed by the logical rules. None: one device.
  """

  def __init__(self, config, params, special, *, max_len=None, fast_compile=False, mesh=None):
    self.config = config
    self.fast_compile = bool(fast_compile)
    self.mesh = mesh
    self.row_multiple = 1 if mesh is None else int(np.prod([mesh.shape[a] for a in BATCH_AXES]))
    if mesh is not None:
      from tfusion import train_state
      params = jax.device_put(params, train_state.param_shardings(config, mesh))
    self.params = params
    self.special = special
    self.max_len = int(max_len or config.model.max_len)
    self.model = transfusion.Transfusion(config.model)
    vocab = config.model.vocab_size
    bad = {k: v for k, v in dataclasses.asdict(special).items() if not 0 <= v < vocab}
    if bad:
      raise ValueError(f"special token ids {bad} are outside the model's vocabulary "
                       f"(config.model.vocab_size={vocab})")
    img = config.model.get("image") or None
    self.discrete = bool(img) and discrete_lib.is_discrete(config.model)
    if self.discrete:
      discrete_lib.check_vocab(config.model, max(dataclasses.asdict(special).values()) + 1,
                               what="the special tokens")
      self.latent_shape = discrete_lib.code_shape(config.model)  # the code grid
      self.num_patches = discrete_lib.num_image_tokens(config.model)
    else:
      self.latent_shape = (img.latent_size, img.latent_size, img.latent_channels) if img else None
      self.num_patches = (img.latent_size // img.patch_size) ** 2 if img else 0
    self._intra = config.model.intra_image
    self._model_key = config.model.to_json()  # Generators of equal models share compilations

  # ------------------------------------------------------------------ jitted pieces

  def _jit(self, name, fn, static=()):
    """jax.jit of `model.apply(params, *args, method=fn)`, shared by Generators of one model
    (and mesh); with a mesh, traced and run under it and the logical rules."""
    key = (self._model_key, name, self.fast_compile, self.mesh)
    if key not in _JITS:
      model, intra, mesh = self.model, self._intra, self.mesh

      def run(params, *args, **static_kwargs):
        method = functools.partial(fn, intra_image=intra, **static_kwargs)
        return model.apply(params, *args, method=method)

      options = {"xla_backend_optimization_level": 0} if self.fast_compile else None
      jitted = jax.jit(run, static_argnames=static, compiler_options=options)
      if mesh is None:
        _JITS[key] = jitted
      else:
        def on_mesh(*args, **kwargs):
          with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_RULES):
            return jitted(*args, **kwargs)
        _JITS[key] = on_mesh
    return _JITS[key]

  # ------------------------------------------------------------------ rows on the mesh

  def _rows(self, x, axis=0):
    """Puts an array's rows (dimension `axis`) on the mesh's batch axes (no mesh: as is)."""
    if self.mesh is None:
      return x
    if x.shape[axis] % self.row_multiple:
      raise ValueError(f"a batch of {x.shape[axis]} rows does not divide the mesh's batch axes "
                       f"data x fsdp = {self.row_multiple} (the task methods pad; the building "
                       "blocks do not)")
    spec = [None] * x.ndim
    spec[axis] = BATCH_AXES
    return jax.device_put(x, NamedSharding(self.mesh, PartitionSpec(*spec)))

  def _padding(self, batch_size):
    """Rows to add so that `batch_size` divides the batch axes."""
    return -batch_size % self.row_multiple

  @staticmethod
  def _pad_rows(x, pad):
    """x with its last row repeated `pad` more times (numpy or jax; lists: the last item)."""
    if not pad:
      return x
    if isinstance(x, list):
      return x + [x[-1]] * pad
    xp = np if isinstance(x, np.ndarray) else jnp
    return xp.concatenate([x, xp.repeat(x[-1:], pad, axis=0)])

  def _objective_name(self):
    return self.config.diffusion.objective

  @property
  def objective(self):
    """The diffusion objective the model was trained with (tfusion.diffusion)."""
    return diffusion.from_config(self.config)

  # ------------------------------------------------------------------ building blocks

  def new_context(self, batch_size):
    ctx = context_lib.init_context(self.config.model, batch_size, self.max_len)
    if self.mesh is None:
      return ctx
    replicated = NamedSharding(self.mesh, PartitionSpec())
    return ctx._replace(cache=jax.tree.map(lambda x: self._rows(x, 1), ctx.cache),
                        segment_ids=self._rows(ctx.segment_ids),
                        positions=self._rows(ctx.positions),
                        image_index=self._rows(ctx.image_index),
                        next_position=self._rows(ctx.next_position),
                        cursor=jax.device_put(ctx.cursor, replicated))

  def room(self, ctx):
    """Free cache slots of `ctx` (a host int)."""
    return self.max_len - int(ctx.cursor)

  def append_tokens(self, ctx, tokens, active=None):
    """Writes a chunk of tokens: int [B, T] (active: bool [B, T]) -> (ctx, logits [B, V])."""
    self._check_ids(np.asarray(tokens))
    tokens = jnp.asarray(tokens, jnp.int32)
    if tokens.shape[1] > self.room(ctx):
      raise ValueError(f"{tokens.shape[1]} tokens do not fit in the {self.room(ctx)} free slots "
                       f"of the context (config.model.max_len={self.max_len})")
    active = jnp.ones(tokens.shape, bool) if active is None else jnp.asarray(active, bool)
    logits, ctx = self._jit("append_tokens", context_lib.append_tokens)(
        self.params, ctx, self._rows(tokens), self._rows(active))
    return ctx, logits

  def prefill(self, prompts, *, reserve=0, pad_multiple=8, ctx=None):
    """Writes one prompt per row, left-padded with holes to a common length.

    Args:
      prompts: B sequences of token ids (each as given: add <bos> yourself).
      reserve: slots that must stay free after the prompts (e.g. for an image).
      pad_multiple: the chunk length is rounded up to this (fewer compilations).
      ctx: context to continue (default: a new one).
    Returns:
      (ctx, float32 logits [B, V] for each row's next token).
    """
    self._check_ids(prompts)
    ctx = self.new_context(len(prompts)) if ctx is None else ctx
    room = self.room(ctx) - reserve
    for i, p in enumerate(prompts):
      if len(p) == 0:
        raise ValueError(f"prompt {i} is empty")
      if len(p) > room:
        raise ValueError(f"prompt {i} has {len(p)} tokens; the context holds {room} "
                         f"(config.model.max_len={self.max_len}"
                         + (f", {reserve} kept for what follows)" if reserve else ")"))
    longest = max(len(p) for p in prompts)
    length = min(-(-longest // pad_multiple) * pad_multiple, room)
    tokens = np.zeros((len(prompts), length), np.int32)
    active = np.zeros((len(prompts), length), bool)
    for i, p in enumerate(prompts):
      tokens[i, length - len(p):] = p
      active[i, length - len(p):] = True
    return self.append_tokens(ctx, tokens, active)

  def decode_text(self, ctx, logits, keys, *, max_new_tokens, temperature=0.0, top_p=1.0,
                  stop_ids=None, done=None, return_logits=False):
    """Decodes up to `max_new_tokens` per row (fewer if the context fills up).

    Args:
      ctx, logits: from `prefill` / `append_image` / a previous call.
      keys: [B, 2] per-row keys. temperature 0 is greedy. top_p in (0, 1].
      stop_ids: tokens that end a row (default <eos> and <boi>).
      done: bool [B], rows that take no part.
    Returns:
      (TextResult, ctx, logits after the last token).
    """
    if temperature < 0:
      raise ValueError(f"temperature must be >= 0, got {temperature}")
    if not 0 < top_p <= 1:
      raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    b = ctx.batch_size
    stop_ids = (self.special.eos, self.special.boi) if stop_ids is None else tuple(stop_ids)
    done = jnp.zeros((b,), bool) if done is None else jnp.asarray(done, bool)
    n = min(int(max_new_tokens), self.room(ctx))
    if n <= 0:
      empty = np.zeros((b, 0), np.int32)
      return TextResult(empty, np.zeros(b, np.int32), np.full(b, -1, np.int32)), ctx, logits
    fn = self._jit("decode", text_lib.decode,
                   static=("max_new_tokens", "greedy", "return_logits"))
    out = fn(self.params, ctx, logits, self._rows(jnp.asarray(keys)), self._rows(done),
             jnp.asarray(stop_ids, jnp.int32),
             jnp.float32(max(temperature, 1e-6)), jnp.float32(top_p), max_new_tokens=n,
             greedy=temperature == 0, return_logits=return_logits)
    result = TextResult(np.asarray(out["tokens"]), np.asarray(out["lengths"]),
                        np.asarray(out["stop_token"]),
                        np.asarray(out["all_logits"]) if return_logits else None)
    return result, out["ctx"], out["logits"]

  def sample_image(self, ctx, keys, *, active=None, sampler=None, steps=None,
                   guidance_scale=1.0, uncond_prompt=None, clip_x0=None, sampling=None):
    """Draws an image per row at the context's cursor (the slot after <boi>).

    Args:
      ctx: the context, ending with <boi>. keys: [B, 2] per-sample keys.
      active: bool [B], rows that draw (others write nothing).
      sampler: ddpm | ddim | euler | heun (default: the objective's); steps: default per sampler.
      guidance_scale: classifier-free guidance (1 = none, the paper uses 3 and 5).
      uncond_prompt: the unconditional context (default <bos> <boi>).
      clip_x0: DDPM/DDIM only, bound on the clean estimate (see CosineDDPM.step); None:
        config.diffusion's (a bound turns static clipping on if the config has it off).
      sampling: DDPM/DDIM only, overrides of config.diffusion's sampler settings
        {x0_threshold, clip_x0, threshold_percentile, timestep_spacing} (None values: keep).
    Returns:
      float32 latents [B, h, w, c].
    """
    check_image_layers(self.params, self.config)
    name, steps, objective = self._resolve(sampler, steps, clip_x0, sampling)
    guided = float(guidance_scale) != 1.0
    return self._draw(ctx, keys, active, name, steps, float(guidance_scale), guided, uncond_prompt,
                      objective=objective)

  def _resolve(self, sampler, steps, clip_x0, sampling=None):
    """Checks the sampler settings -> (sampler, steps, objective carrying the settings)."""
    name, steps = image_lib.resolve_sampler(sampler, self._objective_name(), steps,
                                            self.config.diffusion.num_train_steps, clip_x0)
    overrides = dict(sampling or {})
    if clip_x0 is not None:
      overrides["clip_x0"] = clip_x0
    return name, steps, image_lib.sampling_objective(self.config, overrides)

  def sampling_settings(self, sampler=None, steps=None, clip_x0=None, sampling=None):
    """What a draw with these arguments uses: {sampler, steps, and the DDPM settings}."""
    name, steps, objective = self._resolve(sampler, steps, clip_x0, sampling)
    return {"sampler": name, "steps": steps, **objective.sampling_settings()}

  def _with_unconditional(self, ctx, uncond_prompt):
    """For guidance: ctx [B] followed by B unconditional rows (default <bos> <boi>) that end at
    the same cursor. Returns (context [2B], the unconditional rows' last logits [B, V])."""
    b = ctx.batch_size
    uncond = list(uncond_prompt or (self.special.bos, self.special.boi))
    cursor = int(ctx.cursor)
    if len(uncond) > cursor:
      raise ValueError(f"the unconditional context ({len(uncond)} tokens) is longer than the "
                       f"conditional one ({cursor} slots)")
    uctx = self.new_context(b)._replace(cursor=jnp.int32(cursor - len(uncond)))
    uctx, ulogits = self.append_tokens(uctx, np.tile(np.asarray(uncond, np.int32), (b, 1)))
    return context_lib.concat_contexts(ctx, uctx), ulogits

  def _draw(self, ctx, keys, active, sampler, steps, scale, guided, uncond_prompt, clip_x0=None,
            objective=None):
    b = ctx.batch_size
    if self.num_patches > self.room(ctx):
      raise ValueError(f"an image needs {self.num_patches} slots; the context has "
                       f"{self.room(ctx)} left (config.model.max_len={self.max_len})")
    active = jnp.ones((b,), bool) if active is None else jnp.asarray(active, bool)
    if guided:
      ctx, _ = self._with_unconditional(ctx, uncond_prompt)
    if objective is None:
      objective = image_lib.sampling_objective(self.config, {"clip_x0": clip_x0})
    times = jnp.asarray(objective.sampling_times(steps))
    fn = self._jit("sample", image_lib.sample,
                   static=("objective", "sampler", "guided", "latent_shape", "clip_x0"))
    return fn(self.params, ctx, self._rows(jnp.asarray(keys)), self._rows(active), times,
              jnp.float32(scale),
              objective=objective, sampler=sampler, guided=guided,
              latent_shape=self.latent_shape, clip_x0=None)

  def append_image(self, ctx, latents, active=None):
    """Writes clean latents [B, h, w, c] and <eoi>. -> (ctx, logits [B, V] after <eoi>)."""
    check_image_layers(self.params, self.config)
    latents = jnp.asarray(latents, jnp.float32)
    if tuple(latents.shape[1:]) != self.latent_shape:
      raise ValueError(f"latents of shape {tuple(latents.shape[1:])} do not match the model's "
                       f"{self.latent_shape} (config.model.image)")
    if self.num_patches + 1 > self.room(ctx):
      raise ValueError(f"an image and <eoi> need {self.num_patches + 1} slots; the context has "
                       f"{self.room(ctx)} left (config.model.max_len={self.max_len})")
    b = latents.shape[0]
    active = jnp.ones((b,), bool) if active is None else jnp.asarray(active, bool)
    fn = self._jit("append_image", context_lib.append_image, static=("eoi_id",))
    logits, ctx = fn(self.params, ctx, self._rows(latents), self._rows(active),
                     eoi_id=self.special.eoi)
    return ctx, logits

  def _check_ids(self, prompts):
    """Token ids must index the embedding (out of range they would silently become NaN)."""
    vocab = self.config.model.vocab_size
    for i, p in enumerate(prompts):
      p = np.asarray(p, np.int64).reshape(-1)
      bad = p[(p < 0) | (p >= vocab)].tolist()
      if bad:
        raise ValueError(f"prompt {i} holds token ids {bad[:5]} outside the model's vocabulary "
                         f"[0, {vocab}) (config.model.vocab_size): another tokenizer?")

  # ------------------------------------------------------------------ tasks

  def text_to_image(self, prompts, keys, *, sampler=None, steps=None, guidance_scale=1.0,
                    clip_x0=None, sampling=None, image_temperature=1.0, image_top_k=0):
    """One image per prompt: <bos> prompt <boi> -> latents [B, h, w, c] (discrete: codes
    int32 [B, h, w], drawn with image_temperature / image_top_k).

    Args:
      prompts: B sequences of text token ids (without <bos>/<boi>).
      keys: [B, 2] per-sample keys (`sample_keys`).
    """
    if self.discrete:
      return self.text_to_codes(prompts, keys, guidance_scale=guidance_scale,
                                temperature=image_temperature, top_k=image_top_k)
    self.check_text_to_image(prompts, sampler, steps, clip_x0, sampling)
    s, b = self.special, len(prompts)
    pad = self._padding(b)  # copies of the last row, dropped below; real rows keep their keys
    prompts, keys = self._pad_rows(list(prompts), pad), self._pad_rows(jnp.asarray(keys), pad)
    ctx, _ = self.prefill([[s.bos, *p, s.boi] for p in prompts], reserve=self.num_patches + 1)
    latents = self.sample_image(ctx, keys, sampler=sampler, steps=steps,
                                guidance_scale=guidance_scale, clip_x0=clip_x0, sampling=sampling)
    return latents[:b] if pad else latents

  def check_text_to_image(self, prompts, sampler=None, steps=None, clip_x0=None, sampling=None):
    """The checks of `text_to_image` (ValueError), without running anything."""
    if self.discrete:
      self._check_lengths(prompts, extra=3 + self.num_patches, what="with <bos>, <boi>, the "
                          f"image's {self.num_patches} codes and <eoi>")
      return
    check_image_layers(self.params, self.config)
    self._resolve(sampler, steps, clip_x0, sampling)
    self._check_lengths(prompts, extra=3 + self.num_patches, what="with <bos>, <boi>, the "
                        f"image's {self.num_patches} patches and <eoi>")

  def caption(self, latents, keys, *, max_new_tokens=32, temperature=0.0, top_p=1.0):
    """Text for each image: <bos> <boi> image <eoi> -> generated ids (lists, without <eos>).
    Discrete: `latents` are VQ codes int [B, h, w]."""
    if self.discrete:
      return self.caption_codes(latents, keys, max_new_tokens=max_new_tokens,
                                temperature=temperature, top_p=top_p)
    check_image_layers(self.params, self.config)
    latents = np.asarray(latents, np.float32)
    s, b = self.special, latents.shape[0]
    pad = self._padding(b)
    latents, keys = self._pad_rows(latents, pad), self._pad_rows(jnp.asarray(keys), pad)
    ctx, _ = self.prefill([[s.bos, s.boi]] * latents.shape[0], pad_multiple=1,
                          reserve=self.num_patches + 1)
    ctx, logits = self.append_image(ctx, latents)
    result, _, _ = self.decode_text(ctx, logits, keys, max_new_tokens=max_new_tokens,
                                    temperature=temperature, top_p=top_p)
    return [result.ids(i) for i in range(b)]

  def complete(self, prompts, keys, *, max_new_tokens=32, temperature=0.0, top_p=1.0,
               stop_ids=None):
    """Text continuation of <bos> prompt. -> TextResult."""
    self._check_lengths(prompts, extra=1, what="with <bos>")
    b = len(prompts)
    pad = self._padding(b)
    prompts, keys = self._pad_rows(list(prompts), pad), self._pad_rows(jnp.asarray(keys), pad)
    ctx, logits = self.prefill([[self.special.bos, *p] for p in prompts])
    result, _, _ = self.decode_text(ctx, logits, keys, max_new_tokens=max_new_tokens,
                                    temperature=temperature, top_p=top_p, stop_ids=stop_ids)
    if pad:
      result = TextResult(*(None if x is None else x[:b] for x in (
          result.tokens, result.lengths, result.stop_token, result.logits)))
    return result

  def interleaved(self, prompts, keys, *, num_images=1, max_text_tokens=32, temperature=0.0,
                  top_p=1.0, sampler=None, steps=None, guidance_scale=1.0, clip_x0=None,
                  sampling=None, image_temperature=1.0, image_top_k=0):
    """text -> <boi> image <eoi> -> text ..., each image conditioned on all before it.

    A text segment ends at <boi>, <eos> or after `max_text_tokens`; while a row has images
    left to draw (`num_images`) a segment that ends without <boi> gets one (the row asked for
    an image there), and <eos> ends the row's document. After the last image, one more text
    segment. Stops early when the context is full.

    Args:
      prompts: B sequences of text ids (without <bos>). keys: [B, 2] per-row keys (text
        segment k uses fold_in(key, 2k), image k fold_in(key, 2k + 1)).
      image_temperature, image_top_k: discrete models only, how codes are drawn (the
        sampler settings are for continuous images).
    Returns:
      per row, a list of ("text", ids) and ("image", latents [h, w, c], or for a discrete
      model codes int32 [h, w]) segments.
    """
    self.check_interleaved(prompts, num_images, sampler, steps, clip_x0, sampling)
    s, n = self.special, self.num_patches
    need = 1 + (n + 2 if num_images else 0)
    real = len(prompts)
    pad = self._padding(real)
    prompts, keys = self._pad_rows(list(prompts), pad), self._pad_rows(jnp.asarray(keys), pad)
    b = len(prompts)
    ctx, logits = self.prefill([[s.bos, *p] for p in prompts], reserve=need - 1)
    out = [[] for _ in range(b)]
    done = np.zeros(b, bool)
    for k in range(num_images + 1):
      last = k == num_images
      budget = self.room(ctx) - (0 if last else n + 2)
      if budget < 0:
        break
      result, ctx, logits = self.decode_text(
          ctx, logits, _fold(keys, 2 * k), max_new_tokens=min(max_text_tokens, budget),
          temperature=temperature, top_p=top_p, done=done)
      for i in np.flatnonzero(~done):
        if result.lengths[i] > int(result.stop_token[i] >= 0):
          out[i].append(("text", result.ids(i)))
      done |= result.stop_token == s.eos
      if last or done.all():
        break
      force_boi = ~done & (result.stop_token != s.boi)
      if force_boi.any():
        ctx, boi_logits = self.append_tokens(ctx, np.full((b, 1), s.boi, np.int32),
                                             force_boi[:, None])
        logits = jnp.where(force_boi[:, None], boi_logits, logits)  # what follows <boi>
      drawing = ~done
      if self.discrete:  # codes token by token from the logits after <boi>; <eoi> written
        latents, ctx, logits = self.sample_image_tokens(
            ctx, logits, _fold(keys, 2 * k + 1), active=drawing, guidance_scale=guidance_scale,
            temperature=image_temperature, top_k=image_top_k)
      else:
        latents = self.sample_image(ctx, _fold(keys, 2 * k + 1), active=drawing,
                                    sampler=sampler, steps=steps, guidance_scale=guidance_scale,
                                    clip_x0=clip_x0, sampling=sampling)
        ctx, logits = self.append_image(ctx, latents, active=drawing)
      latents = np.asarray(latents)
      for i in np.flatnonzero(drawing):
        out[i].append(("image", latents[i]))
    return out[:real]

  def check_interleaved(self, prompts, num_images, sampler=None, steps=None, clip_x0=None,
                        sampling=None):
    """The checks of `interleaved` (ValueError), without running anything."""
    if num_images < 0:
      raise ValueError(f"num_images must be >= 0, got {num_images}")
    if num_images and not self.discrete:
      check_image_layers(self.params, self.config)
      self._resolve(sampler, steps, clip_x0, sampling)
    n = self.num_patches
    unit = "codes" if self.discrete else "patches"
    self._check_lengths(prompts, extra=1 + (n + 2 if num_images else 0), what="with <bos>" + (
        f" and room for one image (<boi>, {n} {unit}, <eoi>)" if num_images else ""))

  # ------------------------------------------------------------------ discrete images

  def _require_discrete(self, what):
    if not self.discrete:
      raise ValueError(f"{what} needs config.model.image.representation='discrete' (this model "
                       "is continuous: use sample_image / text_to_image)")

  def sample_image_tokens(self, ctx, logits, keys, *, active=None, guidance_scale=1.0,
                          temperature=1.0, top_k=0, uncond_prompt=None, guided=None):
    """Draws n codes per row at the context's cursor (the slot after <boi>), then <eoi>.

    Args:
      ctx, logits: the context ending with <boi> and its next-token logits [B, V].
      keys: [B, 2] per-sample keys. active: bool [B], rows that draw.
      guidance_scale: classifier-free guidance on logits (1 = none); uncond_prompt: the
        unconditional context (default <bos> <boi>). guided: force the guided path (default:
        guidance_scale != 1; the guided path at scale 1 is the conditional model).
      temperature: 0 = greedy; top_k: 0 = no cut.
    Returns:
      (codes int32 [B, h, w], ctx after <eoi>, logits [B, V] after <eoi>).
    """
    self._require_discrete("sample_image_tokens")
    if temperature < 0:
      raise ValueError(f"temperature must be >= 0, got {temperature}")
    k = discrete_lib.codebook_size(self.config.model)
    if not 0 <= int(top_k) <= k:
      raise ValueError(f"top_k must be in [0, {k}] (config.model.image.codebook_size), got "
                       f"{top_k}")
    b, n = ctx.batch_size, self.num_patches
    if n + 1 > self.room(ctx):
      raise ValueError(f"an image needs {n} codes and <eoi>: {n + 1} slots; the context has "
                       f"{self.room(ctx)} left (config.model.max_len={self.max_len})")
    active = jnp.ones((b,), bool) if active is None else jnp.asarray(active, bool)
    guided = float(guidance_scale) != 1.0 if guided is None else bool(guided)
    if guided:
      ctx, ulogits = self._with_unconditional(ctx, uncond_prompt)
      logits = jnp.concatenate([logits, ulogits], 0)
    fn = self._jit("sample_codes", discrete_gen.sample_codes,
                   static=("guided", "num_tokens", "offset", "codebook_size", "top_k", "greedy",
                           "eoi_id"))
    codes, ctx, logits = fn(
        self.params, ctx, logits, self._rows(jnp.asarray(keys)), self._rows(active),
        jnp.float32(guidance_scale), jnp.float32(max(temperature, 1e-6)), guided=guided,
        num_tokens=n, offset=discrete_lib.image_token_offset(self.config.model),
        codebook_size=k, top_k=int(top_k), greedy=temperature == 0, eoi_id=self.special.eoi)
    return np.asarray(codes).reshape((b,) + self.latent_shape), ctx, logits

  def text_to_codes(self, prompts, keys, *, guidance_scale=1.0, temperature=1.0, top_k=0,
                    guided=None):
    """One discrete image per prompt: <bos> prompt <boi> c_1..c_n <eoi> -> codes [B, h, w]."""
    self._require_discrete("text_to_codes")
    self.check_text_to_image(prompts)
    s, b = self.special, len(prompts)
    pad = self._padding(b)
    prompts, keys = self._pad_rows(list(prompts), pad), self._pad_rows(jnp.asarray(keys), pad)
    ctx, logits = self.prefill([[s.bos, *p, s.boi] for p in prompts],
                               reserve=self.num_patches + 1)
    codes, _, _ = self.sample_image_tokens(ctx, logits, keys, guidance_scale=guidance_scale,
                                           temperature=temperature, top_k=top_k, guided=guided)
    return codes[:b]

  def caption_codes(self, codes, keys, *, max_new_tokens=32, temperature=0.0, top_p=1.0):
    """Text for each discrete image: <bos> <boi> c_1..c_n <eoi> -> ids (without <eos>)."""
    self._require_discrete("caption_codes")
    codes = np.asarray(codes)
    if tuple(codes.shape[1:]) != self.latent_shape:
      raise ValueError(f"codes of shape {tuple(codes.shape[1:])} do not match the model's "
                       f"{self.latent_shape} (config.model.image.latent_size)")
    from tfusion.vae import quantizer
    quantizer.check_codes(codes, discrete_lib.codebook_size(self.config.model),
                          "codes to caption (config.model.image.codebook_size)")
    s, b = self.special, codes.shape[0]
    pad = self._padding(b)
    codes, keys = self._pad_rows(codes, pad), self._pad_rows(jnp.asarray(keys), pad)
    image = discrete_lib.codes_to_tokens(codes, self.config.model)
    prompts = [[s.bos, s.boi, *row.tolist(), s.eoi] for row in image]
    ctx, logits = self.prefill(prompts, pad_multiple=1)
    result, _, _ = self.decode_text(ctx, logits, keys, max_new_tokens=max_new_tokens,
                                    temperature=temperature, top_p=top_p)
    return [result.ids(i) for i in range(b)]

  def _check_lengths(self, prompts, *, extra, what):
    if not len(prompts):
      raise ValueError("no prompts given")
    self._check_ids(prompts)
    for i, p in enumerate(prompts):
      if len(p) + extra > self.max_len:
        raise ValueError(f"prompt {i} has {len(p)} tokens; {what} it needs {len(p) + extra} "
                         f"positions but the model's context is config.model.max_len="
                         f"{self.max_len}")
