"""Discrete images (the Chameleon baseline, config.model.image.representation="discrete").

Records with VQ codes go through the same pipeline as latents and come out as plain tokens
(<boi> offset + c_1 .. offset + c_n <eoi>), with no image slots and causal attention; the
next-token loss covers image tokens and reports them separately; image tokens are drawn with
the KV cache exactly as a whole-sequence recomputation draws them, with guidance on logits;
mismatched records, codebooks and vocabularies fail naming the file and the config keys.
"""


import jax
import jax.numpy as jnp
import numpy as np
import pytest

import train_utils
from tfusion import batch as batch_lib
from tfusion import configlib, diffusion, discrete, losses, train_state
from tfusion.data import pipeline, records, samples
from tfusion.generate import engine
from tfusion.model import attention

CODEBOOK = 16
GRID = (4, 4)  # 16 codes per image
TEXT_VOCAB = 1000  # the sample tokenizer's ids, <boi>/<eoi> included
FAST = {"xla_backend_optimization_level": 0}  # compile time dominates these tests


def jit(f, **kw):
  return jax.jit(f, compiler_options=FAST, **kw)


# ------------------------------------------------------------------------------ the data


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  d = tmp_path_factory.mktemp("discrete")
  tok = samples.sample_tokenizer(str(d), vocab_size=TEXT_VOCAB)
  samples.write_text_records(str(d / "text.array_record"), samples.pydoc_topics()[:20])
  samples.write_code_caption_records(str(d / "codes.array_record"), 40, GRID, CODEBOOK)
  samples.write_image_caption_records(str(d / "latents.array_record"), 8, (4, 4, 4))
  return {"dir": d, "tok": tok, "text": str(d / "text.array_record"),
          "codes": str(d / "codes.array_record"), "latents": str(d / "latents.array_record")}


def data_config(data, *, image_caption=None, representation="discrete", **model):
  c = configlib.base_config()
  c.model.vocab_size = 1024
  c.model.image.update(representation=representation, codebook_size=CODEBOOK,
                       latent_size=GRID[0], latent_channels=4, patch_size=1)
  c.model.update(model)
  c.data.update(source="grain", tokenizer=data["tok"].source, text=data["text"],
                image_caption=image_caption or data["codes"], seq_len=64, batch_size=4,
                prefetch=0, pack_pool=8, max_images=2)
  return c


def test_code_records_become_image_tokens_packed_like_text(data):
  c = data_config(data)
  offset = discrete.image_token_offset(c.model)
  assert offset == 1024 - CODEBOOK
  tok = data["tok"]
  it = pipeline.make_iterator(c)
  images = 0
  for _ in range(6):
    b = next(it)
    batch_lib.check_batch_structure(b)
    batch_lib.check_batch_values(b, num_patches=GRID[0] * GRID[1])
    assert b["images"].shape[1] == 0 and not b["image_mask"].size
    assert (b["image_index"] == -1).all(), "discrete images take no slots"
    tokens, seg = b["tokens"], b["segment_ids"]
    for r in range(tokens.shape[0]):
      for p in np.flatnonzero(tokens[r] == tok.boi_id):
        if p + 17 >= tokens.shape[1]:
          continue
        span = tokens[r, p + 1:p + 17]
        assert ((span >= offset) & (span < offset + CODEBOOK)).all()
        assert tokens[r, p + 17] == tok.eoi_id, "exactly n codes between <boi> and <eoi>"
        # The LM loss covers <boi> -> c_1, every code, and c_n -> <eoi>.
        assert b["text_loss_mask"][r, p:p + 17].all()
        np.testing.assert_array_equal(b["targets"][r, p:p + 17], tokens[r, p + 1:p + 18])
        images += 1
    image_tokens = (tokens >= offset) & (seg > 0)
    assert not (image_tokens & (tokens >= 1024)).any()
  assert images > 4


def test_mixture_counts_image_tokens(data):
  """1:1 by weight = as many text positions as image tokens (captions ride along)."""
  c = data_config(data)
  offset = discrete.image_token_offset(c.model)
  it = pipeline.make_iterator(c)
  batches = [next(it) for _ in range(12)]
  tokens = np.concatenate([b["tokens"] for b in batches])
  seg = np.concatenate([b["segment_ids"] for b in batches])
  n_image = int(((tokens >= offset) & (seg > 0)).sum())
  # Text documents' positions: rows of segments that hold no <boi>.
  text_positions = 0
  for row_tokens, row_seg in zip(tokens, seg):
    for s in range(1, row_seg.max() + 1):
      doc = row_tokens[row_seg == s]
      if data["tok"].boi_id not in doc:
        text_positions += len(doc)
  assert 0.6 < n_image / text_positions < 1.6, (n_image, text_positions)


def test_discrete_records_into_a_continuous_model_name_file_and_setting(data):
  c = data_config(data, representation="continuous")
  c.model.image.patch_size = 2
  with pytest.raises(ValueError, match=r"codes\.array_record.*representation='continuous'"):
    pipeline.make_iterator(c)
  c = data_config(data, image_caption=data["latents"])
  with pytest.raises(ValueError, match=r"VAE latents.*latents\.array_record.*"
                                       r"representation='discrete'"):
    pipeline.make_iterator(c)


def test_codes_out_of_range_name_the_record_and_the_key(data, tmp_path):
  path = str(tmp_path / "bad.array_record")
  codes = np.zeros(GRID, np.int32)
  bad = codes.copy()
  bad[1, 2] = CODEBOOK + 3
  records.write_records(path, [records.image_caption_record(codes=codes, caption="ok"),
                               records.image_caption_record(codes=bad, caption="bad one")])
  c = data_config(data, image_caption=path)
  c.data.text = ""
  c.data.shuffle = False
  it = pipeline.make_iterator(c)
  with pytest.raises(records.BadRecordError, match=r"bad\.array_record: record 1: .*"
                     r"codebook_size=16.*image code 19 at index \[1, 2\]"):
    for _ in range(3):
      next(it)
  with pytest.raises(records.BadRecordError, match="negative codes"):
    records.validate(records.image_caption_record(codes=-codes - 1, caption="x"))
  with pytest.raises(records.BadRecordError, match="exactly one of 'latent' or 'codes'"):
    records.validate({"kind": "image_caption", "caption": "x"})


def test_codebook_and_vocabulary_mismatches_name_the_config_keys(data):
  c = data_config(data, vocab_size=1008 + 8)  # 1016 - 16 = 1000 text ids: just fits
  pipeline.layout_spec(c, data["tok"])
  c.model.vocab_size = 1010  # 1010 - 16 < 1000
  with pytest.raises(ValueError, match=r"config\.model\.vocab_size=1010.*"
                     r"config\.model\.image\.codebook_size=16.*at least 1016"):
    pipeline.layout_spec(c, data["tok"])
  with pytest.raises(ValueError, match=r"codebook of 256 codes but "
                     r"config\.model\.image\.codebook_size=16"):
    discrete.check_codebook(c.model, 256, "VQ-VAE /some/dir")
  small = data_config(data, vocab_size=12)
  with pytest.raises(ValueError, match="config.model.image.codebook_size=16"):
    jax.eval_shape(train_state.build_model(small).init, jax.random.PRNGKey(0),
                   *train_state.dummy_inputs(small.model))


# ------------------------------------------------------------------- the model and loss


def tiny_config(**image):
  c = configlib.base_config()
  c.model.update(vocab_size=64, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2,
                 head_dim=8, mlp_dim=64, max_len=40)
  c.model.image.update(representation="discrete", codebook_size=16, latent_size=2,
                       patch_size=1)  # 4 codes per image; image tokens are ids 48..63
  c.model.image.update(image)
  return c


SPECIAL = engine.SpecialTokens(bos=40, eos=41, boi=42, eoi=43)


@pytest.fixture(scope="module")
def tiny():
  config = tiny_config()
  model = train_state.build_model(config)
  params = train_utils.random_params(config)
  return config, model, params


def _doc_batch(docs, length=24):
  """One document per row -> a contract batch (targets/loss mask by the packer's rule)."""
  from tfusion.data import packing
  b = len(docs)
  tokens = np.zeros((b, length), np.int32)
  seg = np.zeros((b, length), np.int32)
  pos = np.zeros((b, length), np.int32)
  for r, d in enumerate(docs):
    tokens[r, :len(d)] = d
    seg[r, :len(d)] = 1
    pos[r, :len(d)] = np.arange(len(d))
  return packing.finish_rows(tokens=tokens, segment_ids=seg, positions=pos,
                             image_index=np.full((b, length), -1, np.int32),
                             images=np.zeros((b, 0, 2, 2, 1), np.float32),
                             image_mask=np.zeros((b, 0), bool),
                             image_max_t=np.ones((b, 0), np.float32))


DOCS = [[40, 5, 6, 7, 42, 50, 61, 49, 55, 43, 41], [40, 42, 63, 48, 48, 52, 43, 9, 10, 41]]


def test_image_tokens_attend_causally(tiny):
  """A later code never changes an earlier position, even when a (wrong) image_index marks
  the codes as an image block: discrete mode has no bidirectional blocks."""
  config, model, params = tiny
  b = _doc_batch(DOCS)
  spans = np.full_like(b["image_index"], -1)
  spans[0, 5:9] = 0  # what a Transfusion layout would mark for the codes
  spans[1, 2:6] = 0
  images = np.zeros((2, 1, 2, 2, 4), np.float32)

  apply = jit(lambda t: model.apply(params, t, b["positions"], b["segment_ids"],
                                     jnp.asarray(spans), images, np.zeros((2, 1)))[0])

  def logits(tokens):
    return np.asarray(apply(jnp.asarray(tokens)))

  base = logits(b["tokens"])
  changed = b["tokens"].copy()
  changed[0, 7] = 62  # the third code of row 0's image
  changed[1, 4] = 62  # the third code of row 1's image
  after = logits(changed)
  np.testing.assert_allclose(after[0, :7], base[0, :7], atol=1e-6)  # before it: unchanged
  np.testing.assert_allclose(after[1, :4], base[1, :4], atol=1e-6)
  assert np.abs(after[0, 7:] - base[0, 7:]).max() > 1e-4  # from it on: it is seen
  # The step's attention pairs are the causal ones (FLOPs counted as for text).
  causal = attention.allowed_pairs(b["segment_ids"], np.full_like(spans, -1))
  n = [len(d) for d in DOCS]
  assert int(causal.sum()) == sum(k * (k + 1) // 2 for k in n)


def _numpy_ce(logits, targets):
  logits = np.asarray(logits, np.float64)
  m = logits.max(-1, keepdims=True)
  lse = (m + np.log(np.exp(logits - m).sum(-1, keepdims=True)))[..., 0]
  return lse - np.take_along_axis(logits, targets[..., None], -1)[..., 0], lse


def test_image_tokens_get_the_lm_loss_reported_separately(tiny):
  config, model, params = tiny
  b = _doc_batch(DOCS)
  loss_fn = jit(losses.make_loss_fn(model, diffusion.from_config(config), z_loss=1e-3))
  loss, m = loss_fn(params, b, jax.random.PRNGKey(0))
  logits = np.asarray(jit(model.apply)(params, b["tokens"], b["positions"], b["segment_ids"],
                                       b["image_index"], b["images"], b["image_max_t"])[0])
  ce, lse = _numpy_ce(logits, b["targets"])
  mask = b["text_loss_mask"]
  is_image = (b["targets"] >= 48) & (b["targets"] < 64)
  # 4 codes per image are image targets; <boi> -> c_1 counts (its target is a code).
  assert (mask & is_image).sum() == 8
  np.testing.assert_allclose(m["image_token_loss"], ce[mask & is_image].mean(), rtol=1e-5)
  np.testing.assert_allclose(m["image_loss"], ce[mask & is_image].mean(), rtol=1e-5)
  np.testing.assert_allclose(m["text_loss"], ce[mask & ~is_image].mean(), rtol=1e-5)
  np.testing.assert_allclose(m["z_loss"], (lse[mask] ** 2).mean(), rtol=1e-5)
  np.testing.assert_allclose(loss, ce[mask].mean() + 1e-3 * (lse[mask] ** 2).mean(), rtol=1e-5)
  assert float(m["image_tokens"]) == 8 and float(m["images"]) == 2
  assert float(m["text_tokens"]) == mask.sum() - 8
  # Changing one image token's target changes the loss (and only the image part).
  b2 = dict(b)
  b2["targets"] = b["targets"].copy()
  b2["targets"][0, 6] = 48 + (b["targets"][0, 6] - 48 + 5) % 16
  loss2, m2 = loss_fn(params, b2, jax.random.PRNGKey(0))
  assert abs(float(loss2) - float(loss)) > 1e-6
  assert abs(float(m2["image_token_loss"]) - float(m["image_token_loss"])) > 1e-6
  np.testing.assert_allclose(m2["text_loss"], m["text_loss"], rtol=1e-7)
  # The chunked CE path gives the same numbers.
  chunked = jit(losses.make_loss_fn(model, diffusion.from_config(config), z_loss=1e-3,
                                        ce_chunk_size=8))
  _, mc = chunked(params, b, jax.random.PRNGKey(0))
  for k in ("loss", "text_loss", "image_token_loss", "z_loss"):
    np.testing.assert_allclose(mc[k], m[k], rtol=1e-5, err_msg=k)


def test_z_loss_in_the_continuous_objective():
  c = configlib.base_config()
  c.model.update(vocab_size=64, d_model=32, num_layers=1, num_heads=2, num_kv_heads=2,
                 head_dim=8, mlp_dim=32)
  c.model.image.update(latent_size=2, latent_channels=2, patch_size=1)
  model = train_state.build_model(c)
  params = train_utils.random_params(c)
  b = _doc_batch([[1, 2, 3, 4, 5]], length=8)
  b.update(images=np.zeros((1, 1, 2, 2, 2), np.float32), image_mask=np.zeros((1, 1), bool),
           image_max_t=np.ones((1, 1), np.float32))
  objective = diffusion.from_config(c)
  run = lambda **kw: jit(losses.make_loss_fn(model, objective, **kw))(
      params, b, jax.random.PRNGKey(0))
  base, m0 = run()
  with_z, m1 = run(z_loss=0.1)
  assert "z_loss" not in m0
  np.testing.assert_allclose(with_z, base + 0.1 * m1["z_loss"], rtol=1e-6)
  _, mc = run(z_loss=0.1, ce_chunk_size=4)
  np.testing.assert_allclose(mc["z_loss"], m1["z_loss"], rtol=1e-5)


# ------------------------------------------------------------------------- generation


@pytest.fixture(scope="module")
def gen(tiny):
  config, model, params = tiny
  return engine.Generator(config, params, SPECIAL, fast_compile=True)


PROMPTS = [[5, 6, 7], [9, 10, 11, 12, 13], [20]]


def reference_codes(model, params, prompts, keys, *, scale, temperature, top_k, n=4,
                    offset=48, k=16):
  """Image tokens drawn by rerunning the whole sequence (no cache) at every code, with the
  guidance, temperature and top-k written out here."""
  forward = jit(lambda t, p, s: model.apply(params, t, p, s, method=model.text_forward))
  length = 32
  codes = np.zeros((len(prompts), n), np.int32)
  for r, prompt in enumerate(prompts):
    cond = [SPECIAL.bos, *prompt, SPECIAL.boi]
    uncond = [SPECIAL.bos, SPECIAL.boi]
    for i in range(n):
      rows = []
      for doc in (cond, uncond):
        t = np.zeros((1, length), np.int32)
        t[0, :len(doc)] = doc
        seg = (np.arange(length) < len(doc)).astype(np.int32)[None]
        out = np.asarray(forward(t, np.arange(length, dtype=np.int32)[None], seg))
        rows.append(out[0, len(doc) - 1, offset:offset + k])
      c_logits, u_logits = rows
      logits = c_logits if scale == 1 else u_logits + scale * (c_logits - u_logits)
      if temperature == 0:
        code = int(np.argmax(logits))
      else:
        logits = logits / temperature
        if top_k:
          logits = np.where(logits >= np.sort(logits)[-top_k], logits, -np.inf)
        code = int(jax.random.categorical(jax.random.fold_in(keys[r], i), jnp.asarray(logits)))
      codes[r, i] = code
      cond = cond + [offset + code]
      uncond = uncond + [offset + code]
  return codes


@pytest.mark.parametrize("scale,temperature,top_k", [(1.0, 0.0, 0), (3.0, 1.0, 5)])
def test_cached_image_tokens_equal_recomputing_the_sequence(tiny, gen, scale, temperature,
                                                            top_k):
  config, model, params = tiny
  keys = engine.sample_keys(3, len(PROMPTS))
  got = gen.text_to_codes(PROMPTS, keys, guidance_scale=scale, temperature=temperature,
                          top_k=top_k)
  assert got.shape == (3, 2, 2) and got.dtype == np.int32
  assert ((got >= 0) & (got < 16)).all()
  want = reference_codes(model, params, PROMPTS, np.asarray(keys), scale=scale,
                         temperature=temperature, top_k=top_k)
  np.testing.assert_array_equal(got.reshape(3, -1), want)
  # One by one = batched (per-row keys).
  alone = gen.text_to_codes(PROMPTS[1:2], keys[1:2], guidance_scale=scale,
                            temperature=temperature, top_k=top_k)
  np.testing.assert_array_equal(alone[0], got[1])


def test_guidance_scale_one_is_conditional_sampling(gen):
  keys = engine.sample_keys(7, len(PROMPTS))
  conditional = gen.text_to_codes(PROMPTS, keys, guidance_scale=1.0, temperature=1.0)
  through_guidance = gen.text_to_codes(PROMPTS, keys, guidance_scale=1.0, temperature=1.0,
                                       guided=True)  # cond and uncond rows, mixed at scale 1
  np.testing.assert_array_equal(through_guidance, conditional)
  guided = [gen.text_to_codes(PROMPTS, engine.sample_keys(s, 3), guidance_scale=8.0,
                              temperature=1.0) for s in range(3)]
  plain = [gen.text_to_codes(PROMPTS, engine.sample_keys(s, 3), temperature=1.0)
           for s in range(3)]
  assert any((g != p).any() for g, p in zip(guided, plain)), "guidance must change samples"


class _Ids:
  """A tokenizer stand-in whose captions are already ids ("5 6 7" -> [5, 6, 7])."""

  def encode(self, text):
    return [int(t) for t in text.split()]


@pytest.mark.parametrize("temperature,top_k", [(0.0, 0), (0.5, 3)])
def test_eval_draws_codes_with_the_configured_temperature_and_top_k(tiny, gen, temperature,
                                                                    top_k):
  """The eval job's image generation (digits/fid suites) samples codes with
  config.eval.image_temperature / image_top_k (the demo's 0.7), not a fixed temperature 1."""
  from tfusion.evaluate import suites as suites_lib
  config, _, params = tiny
  config = config.copy_and_resolve_references()
  config.eval.update(image_temperature=temperature, image_top_k=top_k, guidance_scale=3.0,
                     batch_size=2, seed=5)
  ctx = suites_lib.EvalContext(config, params, 1, None)
  ctx.__dict__.update(generator=gen, tokenizer=_Ids(), image_decoder=lambda codes: codes)
  got = ctx.generate_images([" ".join(map(str, p)) for p in PROMPTS])
  assert ctx.settings["temperature"] == temperature and ctx.settings["top_k"] == top_k
  want = np.concatenate([gen.text_to_codes(PROMPTS[s:s + 2], engine.sample_keys(5, len(
      PROMPTS[s:s + 2]), start=s), guidance_scale=3.0, temperature=temperature, top_k=top_k)
                         for s in (0, 2)])
  np.testing.assert_array_equal(got, want)
  if temperature == 0:  # greedy: what temperature 1 (the old fixed value) would not give
    hot = np.concatenate([gen.text_to_codes(PROMPTS[s:s + 2], engine.sample_keys(5, len(
        PROMPTS[s:s + 2]), start=s), guidance_scale=3.0, temperature=1.0) for s in (0, 2)])
    assert (hot != got).any()


def test_the_context_after_an_image_holds_exactly_n_codes_and_eoi(tiny, gen):
  """Captioning reads codes: the cached caption equals greedy decoding of the full sequence."""
  config, model, params = tiny
  codes = np.array([[[1, 2], [3, 15]], [[0, 0], [7, 7]]], np.int32)
  keys = engine.sample_keys(0, 2)
  captions = gen.caption(codes, keys, max_new_tokens=5)
  forward = jit(lambda t, p, s: model.apply(params, t, p, s, method=model.text_forward))
  for r in range(2):
    doc = [40, 42, *(48 + codes[r].reshape(-1)).tolist(), 43]
    want = []
    for _ in range(5):
      t = np.zeros((1, 32), np.int32)
      t[0, :len(doc)] = doc
      seg = (np.arange(32) < len(doc)).astype(np.int32)[None]
      nxt = int(np.argmax(np.asarray(forward(t, np.arange(32, dtype=np.int32)[None], seg))
                          [0, len(doc) - 1]))
      if nxt in (SPECIAL.eos, SPECIAL.boi):
        break
      want.append(nxt)
      doc.append(nxt)
    assert captions[r] == want
  with pytest.raises(ValueError, match="outside the codebook"):
    gen.caption(codes + 16, keys)


def reference_interleaved(model, params, prompt, key, *, num_images, max_text, temperature,
                          n=4, offset=48, k=16):
  """The interleaved document by recomputing the whole sequence at every token: greedy text
  that stops at <eos>/<boi> or after max_text tokens, <boi> added when the text did not end
  with it, n codes from the image slice (greedy, or at temperature 1 with key
  fold_in(key, 2i + 1))."""
  forward = jit(lambda t, p, s: model.apply(params, t, p, s, method=model.text_forward))

  def next_logits(doc):
    t = np.zeros((1, 40), np.int32)
    t[0, :len(doc)] = doc
    seg = (np.arange(40) < len(doc)).astype(np.int32)[None]
    return np.asarray(forward(t, np.arange(40, dtype=np.int32)[None], seg))[0, len(doc) - 1]

  doc, out = [SPECIAL.bos, *prompt], []
  for i in range(num_images + 1):
    text, stop = [], None
    for _ in range(max_text):
      token = int(np.argmax(next_logits(doc)))
      doc.append(token)
      if token in (SPECIAL.eos, SPECIAL.boi):
        stop = token
        break
      text.append(token)
    if text:
      out.append(("text", text))
    if stop == SPECIAL.eos or i == num_images:
      break
    if stop != SPECIAL.boi:
      doc.append(SPECIAL.boi)
    image_key = jax.random.fold_in(key, 2 * i + 1)
    codes = []
    for j in range(n):
      logits = jnp.asarray(next_logits(doc)[offset:offset + k])
      codes.append(int(np.argmax(logits)) if temperature == 0 else
                   int(jax.random.categorical(jax.random.fold_in(image_key, j), logits)))
      doc.append(offset + codes[-1])
    doc.append(SPECIAL.eoi)
    out.append(("image", codes))
  return out


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_interleaved_discrete_documents_equal_recomputing_the_sequence(tiny, gen, temperature):
  """text -> <boi> codes <eoi> -> text ...: every text token and code as the whole sequence
  gives it, so each image sees the text before it and the text after sees the codes."""
  _, model, params = tiny
  keys = engine.sample_keys(5, len(PROMPTS))
  got = gen.interleaved(PROMPTS, keys, num_images=2, max_text_tokens=3,
                        image_temperature=temperature)
  for r, prompt in enumerate(PROMPTS):
    want = reference_interleaved(model, params, prompt, np.asarray(keys)[r], num_images=2,
                                 max_text=3, temperature=temperature)
    assert [kind for kind, _ in got[r]] == [kind for kind, _ in want], r
    for (kind, value), (_, expected) in zip(got[r], want):
      value = np.asarray(value)
      if kind == "image":
        assert value.shape == (2, 2) and value.dtype == np.int32
      np.testing.assert_array_equal(value.reshape(-1), expected)
  assert sum(kind == "image" for doc in got for kind, _ in doc) >= 3  # images were drawn


def test_generation_requests_are_checked(tiny, gen):
  config, _, params = tiny
  with pytest.raises(ValueError, match="top_k"):
    gen.text_to_codes(PROMPTS, engine.sample_keys(0, 3), top_k=17)
  with pytest.raises(ValueError, match="config.model.max_len"):
    gen.text_to_codes([list(range(1, 36))], engine.sample_keys(0, 1))
  bad = engine.SpecialTokens(bos=40, eos=41, boi=50, eoi=43)  # <boi> inside the image ids
  with pytest.raises(ValueError, match="config.model.image.codebook_size"):
    engine.Generator(config, params, bad)


def test_heldout_total_is_the_training_loss_over_text_and_code_tokens(data):
  """The loss suite's total for a discrete run is the token-weighted CE over text and image
  tokens (what training minimises), not text + image_weight * image."""
  from tfusion.evaluate import heldout_loss
  c = data_config(data, d_model=32, num_layers=1, num_heads=2, num_kv_heads=2, head_dim=16,
                  mlp_dim=64, max_len=64)
  c.eval.update(loss_text=data["text"], loss_image_caption=data["codes"], batch_size=4)
  model = train_state.build_model(c)
  params = train_utils.random_params(c)
  got = heldout_loss.heldout_loss(model, params, c, rows=8, tokenizer=data["tok"])
  tokens_per_image = GRID[0] * GRID[1]
  image_tokens = got["loss/images"] * tokens_per_image
  want = ((got["loss/text"] * got["loss/text_tokens"] + got["loss/image"] * image_tokens)
          / (got["loss/text_tokens"] + image_tokens))
  assert got["loss/images"] > 0 and got["loss/text_tokens"] > 0
  assert got["loss/total"] == pytest.approx(want, rel=1e-5)
  assert min(got["loss/text"], got["loss/image"]) <= got["loss/total"] <= max(
      got["loss/text"], got["loss/image"])


# --------------------------------------------------------------------------- precompute


def test_precompute_with_a_vq_writes_codes_the_pipeline_reads(data, tmp_path):
  from tfusion.data import precompute
  from tfusion.vae import vq as vq_lib
  from tfusion.vae.model import VAEConfig
  cfg = VAEConfig(block_out_channels=(8, 8, 8), layers_per_block=1, latent_channels=4,
                  norm_num_groups=4, mid_block_add_attention=False)  # 4x down: 16x16 -> 4x4
  params = jax.tree.map(
      lambda x: np.random.default_rng(0).standard_normal(x.shape).astype(np.float32) * 0.1,
      vq_lib.abstract_params(cfg, 3))
  images = np.random.default_rng(2).integers(0, 256, (6, 16, 16, 3), dtype=np.uint8)
  # A codebook of encoder vectors of these images: the codes vary.
  z = np.asarray(vq_lib.VQAutoencoder(cfg, 3).apply(
      {"params": params}, images.astype(np.float32) / 127.5 - 1.0,
      method=vq_lib.VQAutoencoder.encode)).reshape(-1, 3)
  vq = vq_lib.VQVAE(cfg, params, z[np.random.default_rng(1).choice(len(z), CODEBOOK, False)])
  captions = [samples.caption_for(i) for i in range(6)]
  out = str(tmp_path / "codes")
  summary = precompute.write_latent_records(images, captions, vq, out, resolution=16,
                                            batch_size=4)
  assert summary["written"] == 6
  shard = records.resolve_paths(out)[0]
  recs = records.read_records(shard)
  want = np.asarray(vq.encode_codes(images.astype(np.float32) / 127.5 - 1.0))
  assert want.std() > 0  # not all one code
  for r, w, cap in zip(recs, want, captions):
    assert "latent" not in r and r["caption"] == cap
    np.testing.assert_array_equal(r["codes"], w)
  import json
  manifest = json.load(open(f"{out}/precompute.json"))
  assert manifest["codes"] == {"shape": [4, 4], "codebook_size": CODEBOOK}
  # The pipeline reads them as image tokens; a config with another codebook is refused.
  c = data_config(data, image_caption=out)
  next(pipeline.make_iterator(c))
  c = data_config(data, image_caption=out)
  c.model.image.codebook_size = 8
  with pytest.raises(ValueError, match=r"codebook of 16 codes but "
                     r"config\.model\.image\.codebook_size=8"):
    pipeline.make_iterator(c)


# ------------------------------------------------------------------------ end to end


@pytest.mark.slow
def test_data_train_generate_vertical_slice(data):
  """Code records -> packed batches -> the train step (image-token loss falls) -> the
  cached sampler draws codes of the trained model -> captions from codes."""
  from tfusion import sharding, train
  c = data_config(data, d_model=64, num_layers=2, num_heads=4, num_kv_heads=4, head_dim=16,
                  mlp_dim=128, max_len=64)
  c.mesh.data = 1
  c.optim.update(lr=3e-3, warmup_steps=5, decay_steps=60)
  c.loss.z_loss = 1e-4
  c.model.qk_norm = True
  mesh = sharding.make_mesh(c.mesh, devices=jax.devices()[:1])
  shardings = train_state.state_shardings(c, mesh)
  state = train_state.init_state(c, mesh, jax.random.PRNGKey(0))
  step = train.make_train_step(c, mesh, shardings)
  it = pipeline.make_iterator(c)
  history = []
  for _ in range(60):
    local = next(it)
    batch = sharding.global_batch_from_local(mesh, local, c.data.batch_size)
    state, out = step(state, batch)
    history.append({k: float(v) for k, v in jax.device_get(out).items()})
  first, last = history[0], history[-1]
  assert first["image_tokens"] > 0 and "z_loss" in last
  # Random codes: the image-token loss falls to about log(16) from log(1024)-ish.
  assert last["image_token_loss"] < first["image_token_loss"] - 2, (first, last)
  assert last["image_token_loss"] < np.log(CODEBOOK) + 0.5
  tok = data["tok"]
  special = engine.SpecialTokens.from_tokenizer(tok)
  gen = engine.Generator(c, jax.device_get(state["params"]), special, fast_compile=True)
  prompts = [tok.encode(samples.caption_for(i)) for i in range(3)]
  codes = gen.text_to_image(prompts, engine.sample_keys(0, 3), guidance_scale=3.0)
  assert codes.shape == (3, *GRID) and ((codes >= 0) & (codes < CODEBOOK)).all()
  captions = gen.caption(codes, engine.sample_keys(1, 3), max_new_tokens=6)
  assert len(captions) == 3 and all(len(cap) <= 6 for cap in captions)
