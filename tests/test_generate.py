"""Generation: the cached paths compute what the whole sequence computes, the samplers do
what their definitions say (the references below write noise, updates and guidance out
independently of tfusion/generate/image.py), sampling is per sample, intra_image is honoured,
and bad requests fail before any compute."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import train_utils
from tfusion import configlib, diffusion, train_state
from tfusion.generate import context as context_lib
from tfusion.generate import engine, image as image_lib, reference, text as text_lib

SPECIAL = engine.SpecialTokens(bos=96, eos=97, boi=98, eoi=99)
# Different lengths, so rows hold different numbers of holes; all fit one 16-slot prefill chunk.
PROMPTS = [list(range(5, 12)), list(range(20, 30)), list(range(40, 53))]
MAX_LEN = 48
FAST = {"xla_backend_optimization_level": 0}  # compile time dominates these tests


def _config(objective="ddpm"):
  c = configlib.base_config()
  c.model.update(vocab_size=100, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2,
                 head_dim=8, mlp_dim=64, max_len=MAX_LEN)
  c.model.image.update(latent_size=4, latent_channels=2, patch_size=2)  # 4 patches
  c.diffusion.objective = objective
  if objective == "ddpm" and "x0_threshold" in c.diffusion:
    # The textbook sampler (no bound on the clean estimate, evenly spaced steps): what
    # `reference_sample` writes out.
    c.diffusion.update(x0_threshold="none", timestep_spacing="linspace")
  return c


@pytest.fixture(scope="module")
def setup():
  config = _config()
  model = train_state.build_model(config)
  params = train_utils.random_params(config)
  gen = engine.Generator(config, params, SPECIAL, fast_compile=True)
  # The uncached reference: the training forward pass over whole documents (one compilation:
  # every reference call below uses rows of MAX_LEN positions and 2 image slots).
  forward = jax.jit(functools.partial(reference.forward_last_image_at, model),
                    compiler_options=FAST)
  return config, params, gen, forward


def _rows(gen, docs):
  return {k: jnp.asarray(v) for k, v in reference.layout_rows(
      docs, MAX_LEN, gen.num_patches, gen.latent_shape, num_slots=2).items()}


def _latents(seed, b, gen):
  return np.random.default_rng(seed).standard_normal((b, *gen.latent_shape)).astype(np.float32)


def _blank(gen):
  return (np.zeros(gen.latent_shape, np.float32), 0.0)


def _assert_close(got, want, rtol=1e-5):
  """Close relative to the largest value (DDPM samples of a random model reach ~1e5)."""
  want = np.asarray(want)
  np.testing.assert_allclose(got, want, rtol=0, atol=rtol * max(1.0, np.abs(want).max()))


def reference_greedy(forward, params, rows, n):
  """Greedy decoding that reruns the whole sequence for every token."""
  rows = {k: np.array(v) for k, v in rows.items()}
  assert (rows["image_time"] == 0).all()
  last_images = rows["images"][np.arange(len(rows["lengths"])), rows["last_slot"]]  # unchanged
  tokens, logits = [], []
  for _ in range(n):
    all_logits, _ = forward(params, rows, last_images, 0.0)
    at = rows["lengths"]
    step = np.asarray(all_logits)[np.arange(len(at)), at - 1]
    tok = step.argmax(-1)
    for key, value in (("tokens", tok), ("segment_ids", 1), ("positions", at)):
      rows[key][np.arange(len(at)), at] = value
    rows["lengths"] = at + 1
    tokens.append(tok)
    logits.append(step)
  return np.stack(tokens, 1), np.stack(logits, 1)


def _contract_noise(keys, step, shape):
  """The noise image.py's docstring promises: sample i starts from normal(fold_in(key_i, 0)),
  and denoising step s draws normal(fold_in(key_i, s + 1))."""
  return np.stack([np.asarray(jax.random.normal(jax.random.fold_in(k, step), shape))
                   for k in np.asarray(keys)])


def reference_sample(forward, params, cond_rows, uncond_rows, keys, objective, sampler, steps,
                     scale):
  """The sampler written out from its definition (not the library's step code), with
  predictions of the whole sequence at every step.

  DDPM/DDIM (eta 1/0): S training steps evenly spaced from T-1 to 0, then clean;
  x' = sqrt(ab') x0 + sqrt(1 - ab' - sigma^2) eps + sigma z with x0 = (x - sqrt(1 - ab) eps) /
  sqrt(ab), sigma = eta sqrt((1 - ab') / (1 - ab) (1 - ab / ab')). Flow: Euler on t = 1 -> 0;
  Heun averages the velocities at both ends, its last step Euler. Guidance:
  uncond + scale * (cond - uncond).
  """
  shape = cond_rows["images"].shape[2:]

  def predict(x, t):
    cond = np.asarray(forward(params, cond_rows, x, np.float32(t))[1])
    if scale == 1:
      return cond
    uncond = np.asarray(forward(params, uncond_rows, x, np.float32(t))[1])
    return uncond + np.float32(scale) * (cond - uncond)

  x = _contract_noise(keys, 0, shape)
  if sampler in ("ddpm", "ddim"):
    num_train = objective.num_steps
    alpha_bars = diffusion.cosine_alpha_bars(num_train).astype(np.float32)
    eta = {"ddpm": 1.0, "ddim": 0.0}[sampler]
    idx = np.linspace(num_train - 1, 0, steps).round().astype(int)
    for s, i in enumerate(idx):
      ab = alpha_bars[i]
      ab_next = alpha_bars[idx[s + 1]] if s + 1 < steps else np.float32(1.0)
      eps = predict(x, i / num_train)
      x0 = (x - np.sqrt(1 - ab) * eps) / np.sqrt(ab)
      sigma = np.float32(eta * np.sqrt((1 - ab_next) / (1 - ab) * (1 - ab / ab_next)))
      z = _contract_noise(keys, s + 1, shape) if eta else 0.0
      x = np.sqrt(ab_next) * x0 + np.sqrt(max(1 - ab_next - sigma ** 2, 0.0)) * eps + sigma * z
  else:
    times = np.linspace(1.0, 0.0, steps + 1).astype(np.float32)
    for s, (t, t_next) in enumerate(zip(times[:-1], times[1:])):
      v = predict(x, t)
      if sampler == "heun" and s < steps - 1:
        v = 0.5 * (v + predict(x + (t_next - t) * v, t_next))
      x = x + (t_next - t) * v
  return np.asarray(x, np.float32)


def test_cached_decoding_gives_the_logits_of_the_full_sequence(setup):
  """Prompts of different lengths (holes), an image in the prefix, then greedy decoding."""
  _, params, gen, forward = setup
  images = _latents(1, 3, gen)
  ctx, _ = gen.prefill([[SPECIAL.bos, *p, SPECIAL.boi] for p in PROMPTS])
  ctx, logits = gen.append_image(ctx, images)
  keys = engine.sample_keys(0, 3)
  result, _, _ = gen.decode_text(ctx, logits, keys, max_new_tokens=6, stop_ids=[-1],
                                 return_logits=True)
  docs = [[SPECIAL.bos, *p, SPECIAL.boi, (images[i], 0.0), SPECIAL.eoi]
          for i, p in enumerate(PROMPTS)]
  want_tokens, want_logits = reference_greedy(forward, params, _rows(gen, docs), 6)
  np.testing.assert_allclose(result.logits, want_logits, atol=2e-5, rtol=1e-5)
  np.testing.assert_array_equal(result.tokens, want_tokens)
  assert (result.lengths == 6).all() and (result.stop_token == -1).all()

  # A row that stops early writes holes: the other rows go on exactly as before.
  stop = int(result.tokens[0, 2])
  stopped, _, _ = gen.decode_text(ctx, logits, keys, max_new_tokens=6, stop_ids=[stop],
                                  return_logits=True)
  assert stopped.lengths[0] == 3 and stopped.stop_token[0] == stop
  assert stopped.ids(0) == [int(t) for t in result.tokens[0, :2]]
  assert (stopped.tokens[0, 3:] == 0).all()
  for row in (1, 2):
    if stop not in result.tokens[row]:
      np.testing.assert_array_equal(stopped.tokens[row], result.tokens[row])
      np.testing.assert_allclose(stopped.logits[row], result.logits[row], atol=2e-5, rtol=1e-5)


def test_cached_prefix_denoiser_matches_the_full_sequence(setup):
  """Two images per row: the second one is predicted from its 4 positions + the cache."""
  _, params, gen, forward = setup
  first, noisy = _latents(2, 3, gen), _latents(3, 3, gen)
  ctx, _ = gen.prefill([[SPECIAL.bos, *p, SPECIAL.boi] for p in PROMPTS])
  ctx, _ = gen.append_image(ctx, first)
  between = np.array([[40, 41, SPECIAL.boi], [42, SPECIAL.boi, 0], [SPECIAL.boi, 0, 0]])
  active = between > 0
  ctx, _ = gen.append_tokens(ctx, between, active)
  predict = jax.jit(lambda p, c, x, tt: gen.model.apply(
      p, c, x, tt, jnp.ones(3, bool), method=lambda m, *a: context_lib.predict_image(
          m, *a, intra_image="bidirectional")), compiler_options=FAST)
  docs = [[SPECIAL.bos, *p, SPECIAL.boi, (first[i], 0.0), SPECIAL.eoi,
           *[int(x) for x in between[i][active[i]]], _blank(gen)]
          for i, p in enumerate(PROMPTS)]
  for t in (0.9, 0.3):
    got = predict(params, ctx, noisy, jnp.full((3,), t))
    _, want = forward(params, _rows(gen, docs), noisy, t)
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-5)


def _text_to_image_rows(gen, prompts):
  cond = _rows(gen, [[SPECIAL.bos, *p, SPECIAL.boi, _blank(gen)] for p in prompts])
  uncond = _rows(gen, [[SPECIAL.bos, SPECIAL.boi, _blank(gen)]] * len(prompts))
  return cond, uncond


@pytest.mark.parametrize("sampler", [
    "ddpm", "heun",
    # Same paths as ddpm (eta = 0) and heun (its first half); checked in the slow suite.
    pytest.param("ddim", marks=pytest.mark.slow), pytest.param("euler", marks=pytest.mark.slow)])
def test_guided_sampling_matches_recomputing_the_whole_sequence(setup, sampler):
  _, params, gen, forward = setup
  if image_lib.SAMPLERS[sampler].objective != "ddpm":
    gen = engine.Generator(_config(objective="flow"), params, SPECIAL, fast_compile=True)
  keys = engine.sample_keys(7, 3)
  got = gen.text_to_image(PROMPTS, keys, sampler=sampler, steps=3, guidance_scale=3.0)
  want = reference_sample(forward, params, *_text_to_image_rows(gen, PROMPTS), keys,
                          diffusion.from_config(gen.config), sampler, 3, 3.0)
  assert np.isfinite(got).all()
  _assert_close(got, want)


def test_batched_sampling_equals_one_by_one(setup):
  _, _, gen, _ = setup
  keys = engine.sample_keys(3, 3)
  batched = gen.text_to_image(PROMPTS, keys, sampler="ddpm", steps=3, guidance_scale=3.0)
  for i, p in enumerate(PROMPTS):
    alone = gen.text_to_image([p], keys[i:i + 1], sampler="ddpm", steps=3, guidance_scale=3.0)
    _assert_close(alone[0], batched[i])
  # Different seeds give different images.
  assert np.abs(batched[0] - batched[1]).max() > 0.1


def test_guidance_scale_one_is_the_conditional_model(setup):
  _, params, gen, forward = setup
  keys = engine.sample_keys(5, 3)
  ctx, _ = gen.prefill([[SPECIAL.bos, *p, SPECIAL.boi] for p in PROMPTS],
                       reserve=gen.num_patches + 1)
  conditional = gen.sample_image(ctx, keys, sampler="ddpm", steps=3, guidance_scale=1.0)
  through_guidance = gen._draw(ctx, keys, None, "ddpm", 3, 1.0, True, None)  # cond and uncond
  _assert_close(through_guidance, conditional, rtol=1e-6)
  cond_rows, _ = _text_to_image_rows(gen, PROMPTS)
  want = reference_sample(forward, params, cond_rows, None, keys, gen.objective, "ddpm", 3, 1.0)
  _assert_close(conditional, want)
  guided = gen._draw(ctx, keys, None, "ddpm", 3, 3.0, True, None)
  assert np.abs(guided - conditional).max() > 1e-3, "guidance must change the samples"


def test_clip_x0_reaches_the_sampler(setup):
  _, _, gen, _ = setup
  keys = engine.sample_keys(5, 3)
  free = gen.text_to_image(PROMPTS, keys, sampler="ddim", steps=3)
  clipped = gen.text_to_image(PROMPTS, keys, sampler="ddim", steps=3, clip_x0=2.0)
  assert np.abs(free).max() > 2.0 and np.abs(clipped).max() <= 2.0 + 1e-5


def test_guide_formula():
  cond, uncond = jnp.array([1.0, -2.0]), jnp.array([0.5, 1.0])
  np.testing.assert_array_equal(image_lib.guide(cond, uncond, 1.0), cond)
  np.testing.assert_allclose(image_lib.guide(cond, uncond, 5.0), uncond + 5.0 * (cond - uncond))


def test_interleaved_images_see_everything_before_them(setup):
  """text -> image -> text -> image -> text; each piece checked against the whole sequence."""
  _, params, gen, forward = setup
  keys = engine.sample_keys(11, 3)
  out = gen.interleaved(PROMPTS, keys, num_images=2, max_text_tokens=3, sampler="ddpm", steps=3)
  for row, segments in enumerate(out):
    assert [kind for kind, _ in segments] == ["text", "image", "text", "image", "text"], row

  def document(row, upto):
    doc = [SPECIAL.bos, *PROMPTS[row]]
    for kind, value in out[row][:upto]:
      doc += value if kind == "text" else [SPECIAL.boi, (value, 0.0), SPECIAL.eoi]
    return doc

  # Each image: the full-sequence sampler given the whole document before it.
  for k, seg in ((0, 1), (1, 3)):
    rows = _rows(gen, [document(r, seg) + [SPECIAL.boi, _blank(gen)] for r in range(3)])
    image_keys = jax.vmap(jax.random.fold_in, (0, None))(keys, 2 * k + 1)
    want = reference_sample(forward, params, rows, None, image_keys, gen.objective, "ddpm", 3, 1.0)
    _assert_close(np.stack([segments[seg][1] for segments in out]), want)
  # Each text token: the greedy choice given the whole document before it (images clean).
  for seg in (0, 2, 4):
    rows = _rows(gen, [document(r, seg) for r in range(3)])
    want, _ = reference_greedy(forward, params, rows, 3)
    np.testing.assert_array_equal([segments[seg][1] for segments in out], want)


def test_generation_honours_intra_image(setup):
  """The causal-inside-images ablation samples what the causal model computes over the whole
  sequence, which differs from the bidirectional model's samples (same weights, same keys)."""
  config, params, gen, _ = setup
  causal = _config()
  causal.model.intra_image = "causal"
  gen_causal = engine.Generator(causal, params, SPECIAL, fast_compile=True)
  forward = jax.jit(functools.partial(reference.forward_last_image_at,
                                      train_state.build_model(causal)), compiler_options=FAST)
  keys = engine.sample_keys(13, 3)
  got = gen_causal.text_to_image(PROMPTS, keys, sampler="ddim", steps=2)
  cond_rows, _ = _text_to_image_rows(gen, PROMPTS)
  want = reference_sample(forward, params, cond_rows, None, keys, gen.objective, "ddim", 2, 1.0)
  _assert_close(got, want)
  bidirectional = gen.text_to_image(PROMPTS, keys, sampler="ddim", steps=2)
  assert np.abs(np.asarray(bidirectional) - np.asarray(got)).max() > 1e-3 * np.abs(want).max()


def test_captioning_reads_the_image(setup):
  _, _, gen, _ = setup
  images = _latents(4, 3, gen)
  keys = engine.sample_keys(0, 3)
  a = gen.caption(images, keys, max_new_tokens=6)
  b = gen.caption(images[::-1], keys, max_new_tokens=6)
  assert a == b[::-1], "a caption depends on its image only"
  assert a[0] != a[1] or a[1] != a[2], "different images, different captions"


def test_top_p_sampling_keeps_the_nucleus():
  logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
  top_p_filter = jax.jit(text_lib.top_p_filter)
  kept = lambda p: np.isfinite(top_p_filter(logits, p))
  np.testing.assert_array_equal(kept(0.7), [[True, True, False, False]])
  np.testing.assert_array_equal(kept(1.0), [[True] * 4])
  np.testing.assert_array_equal(kept(1e-3), [[True, False, False, False]])
  n = 4000
  keys = engine.sample_keys(0, n)
  choose = jax.jit(functools.partial(text_lib.choose_tokens, greedy=False))
  tokens = choose(jnp.tile(logits, (n, 1)), keys, 0, temperature=1.0, top_p=0.9)
  freq = np.bincount(np.asarray(tokens), minlength=4) / n
  np.testing.assert_allclose(freq, [0.5 / 0.95, 0.3 / 0.95, 0.15 / 0.95, 0], atol=0.03)


# ------------------------------------------------------------------ bad input, before compute


@pytest.fixture(scope="module")
def abstract_generator():
  """A Generator whose parameters are shapes only: any computation would fail."""
  config = _config()
  model = train_state.build_model(config)
  params = nn.meta.unbox(jax.eval_shape(model.init, jax.random.PRNGKey(0),
                                        *train_state.dummy_inputs(config.model)))
  return engine.Generator(config, params, SPECIAL)


def test_prompt_longer_than_the_context_is_an_error(abstract_generator):
  gen = abstract_generator
  keys = engine.sample_keys(0, 2)
  with pytest.raises(ValueError, match=r"prompt 1 has 44 tokens.*max_len=48"):
    gen.text_to_image([[5], [5] * 44], keys)
  with pytest.raises(ValueError, match=r"prompt 0 has 48 tokens.*max_len=48"):
    gen.complete([[5] * 48], keys[:1])
  with pytest.raises(ValueError, match="prompt 0 has 45 tokens"):
    gen.interleaved([[5] * 45], keys[:1], num_images=1)
  with pytest.raises(ValueError, match=r"prompt 1 holds token ids \[100, -1\] outside"):
    gen.text_to_image([[5], [100, 5, -1]], keys)


def test_unknown_or_mismatched_sampler_is_an_error(abstract_generator):
  gen = abstract_generator
  keys = engine.sample_keys(0, 1)
  with pytest.raises(ValueError, match=r"unknown sampler 'dpm\+\+'.*ddpm"):
    gen.text_to_image([[5]], keys, sampler="dpm++")
  with pytest.raises(ValueError, match="sampler 'heun' is for the 'flow' objective"):
    gen.text_to_image([[5]], keys, sampler="heun")
  with pytest.raises(ValueError, match="exceed the 1000 DDPM training steps"):
    gen.text_to_image([[5]], keys, sampler="ddim", steps=2000)


def test_checkpoint_without_image_layers_is_an_error(abstract_generator):
  gen = abstract_generator
  keys = engine.sample_keys(0, 1)
  text_only = {"params": {k: v for k, v in gen.params["params"].items() if k != "image_in"}}
  bad = engine.Generator(gen.config, text_only, SPECIAL)
  for call in (lambda: bad.text_to_image([[5]], keys),
               lambda: bad.caption(np.zeros((1, 4, 4, 2)), keys),
               lambda: bad.interleaved([[5]], keys)):
    with pytest.raises(ValueError, match=r"no image layers \(image_in missing\)"):
      call()
  config = _config()
  del config.model["image"]
  with pytest.raises(ValueError, match="config.model has no 'image' block"):
    engine.Generator(config, gen.params, SPECIAL).text_to_image([[5]], keys)


def test_bad_sampling_parameters_are_errors(abstract_generator):
  gen = abstract_generator
  ctx = gen.new_context(1)
  keys = engine.sample_keys(0, 1)
  with pytest.raises(ValueError, match="temperature"):
    gen.decode_text(ctx, None, keys, max_new_tokens=2, temperature=-1.0)
  with pytest.raises(ValueError, match="top_p"):
    gen.decode_text(ctx, None, keys, max_new_tokens=2, top_p=0.0)
  with pytest.raises(ValueError, match="outside the model's vocabulary"):
    engine.Generator(gen.config, gen.params, engine.SpecialTokens(1, 2, 3, 100))


@pytest.mark.slow
@pytest.mark.parametrize("encoder,intra_image", [("unet", "bidirectional"), ("linear", "causal")])
def test_cached_paths_for_the_unet_and_the_causal_ablation(encoder, intra_image):
  config = _config()
  config.model.image.update(encoder=encoder, unet_channels=(8, 16, 16, 16))
  config.model.intra_image = intra_image
  model = train_state.build_model(config)
  params = train_utils.random_params(config)
  gen = engine.Generator(config, params, SPECIAL, fast_compile=True)
  forward = jax.jit(functools.partial(reference.forward_last_image_at, model),
                    compiler_options=FAST)
  first, noisy = _latents(2, 3, gen), _latents(3, 3, gen)
  ctx, _ = gen.prefill([[SPECIAL.bos, *p, SPECIAL.boi] for p in PROMPTS])
  ctx, logits = gen.append_image(ctx, first)
  ctx, _ = gen.append_tokens(ctx, np.full((3, 1), SPECIAL.boi))
  predict = jax.jit(lambda p, c, x, tt: model.apply(
      p, c, x, tt, jnp.ones(3, bool), method=lambda m, *a: context_lib.predict_image(
          m, *a, intra_image=intra_image)))
  got = predict(params, ctx, noisy, jnp.full((3,), 0.4))
  docs = [[SPECIAL.bos, *p, SPECIAL.boi, (first[i], 0.0), SPECIAL.eoi]
          for i, p in enumerate(PROMPTS)]
  _, want = forward(params, _rows(gen, [d + [SPECIAL.boi, _blank(gen)] for d in docs]), noisy, 0.4)
  np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-5)
  _, want_logits = reference_greedy(forward, params, _rows(gen, docs), 1)
  np.testing.assert_allclose(logits, want_logits[:, 0], atol=2e-5, rtol=1e-5)
