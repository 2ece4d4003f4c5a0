"""The demo's config: the same keys as any run (tfusion/configlib.py) plus a `demo` block.

`representation="discrete"` (`tfusion-demo --config.model.image.representation=discrete`,
read from the command line before the config is built: the values below depend on it) is the
Chameleon baseline: a VQ-VAE (256 codes, 4x4 per 32x32 digit) instead of the KL VAE, the codes
as the last 256 ids of the vocabulary (tokenizer vocabulary + 256, rounded up to a multiple of
8), causal attention and next-token loss throughout (tfusion/discrete.py).
"""

import ml_collections

from tfusion import configlib


REPRESENTATIONS = ("continuous", "discrete")
TOKENIZER_VOCAB = 1000
VQ_CODES = 256


def _round_up(n, multiple=8):
  return -(-n // multiple) * multiple


def get_config(quick=False, representation="continuous"):
  if representation not in REPRESENTATIONS:
    raise ValueError(f"config.model.image.representation must be one of {REPRESENTATIONS}, "
                     f"got {representation!r}")
  c = configlib.base_config()
  m = c.model
  m.update(dict(vocab_size=1024, d_model=128, num_layers=4, num_heads=4, num_kv_heads=4,
                head_dim=32, mlp_dim=384, max_len=128))
  m.image.update(dict(latent_size=8, latent_channels=4, patch_size=2, encoder="linear"))

  # Rectified flow, not the paper's epsilon-DDPM: at this scale (1M parameters, 1000 steps) it
  # learns the digits several times faster (BENCHMARKS.md: judge accuracy 0.94 at 400 steps
  # vs 0.20 for DDPM; 0.37 for DDPM at 1000). `--config.diffusion.objective=ddpm` runs the paper's.
  c.diffusion.objective = "flow"

  d = c.data
  d.source = "grain"
  # --quick: half the rows per step, so its few minutes buy twice the updates (at this size
  # the number of updates, not the rows per update, is what teaches the digits' names).
  d.seq_len, d.batch_size, d.max_images = 128, 16 if quick else 32, 8
  # More image-caption than text positions: the digits are what the demo shows off; the
  # pydoc text is still a third of all positions (a quarter with --quick, where the images
  # are what is slowest to learn and text perplexity still ends well below unigram).
  d.text_weight, d.interleaved_weight = 1.0, 0.0
  d.image_caption_weight = 3.0 if quick else 2.0
  d.prefetch = 2
  # Half the pairs image-first (the paper: 20%): captioning is shown off too, and the judge's
  # accuracy is already saturated with 80% caption-first (BENCHMARKS.md, demo section).
  d.caption_first_prob = 0.5

  # --quick (about three minutes on 2 cores) must still learn something measurable
  # (tests/test_demo.py checks it): 200 short steps at 5x the learning rate. At 60 steps of
  # lr 1e-3 it ended at chance (judge 0.10, captioning 0.0, perplexity above unigram).
  c.train.steps = 200 if quick else 1000
  c.train.log_every = 10 if quick else 50
  # --quick keeps only its final checkpoint: each one is evaluated, and its time is better
  # spent training (step 0 is still evaluated as the baseline).
  c.checkpoint.every_steps = 200 if quick else 250
  c.checkpoint.keep = 10  # all of them (13 MB each): every one is evaluated for the curves
  c.optim.update(dict(lr=5e-3 if quick else 1e-3, end_lr=5e-4 if quick else 1e-4,
                      warmup_steps=10 if quick else 50,
                      decay_steps=c.train.get_ref("steps") + 1))  # follows --config.train.steps

  e = c.eval
  e.suites = "digits,digit_caption,ppl,loss"
  e.loss_rows = 128  # held-out pairs packed ~4 per row: each of the 297 scored about twice
  e.sampler, e.steps, e.guidance_scale = "", 10 if quick else 50, 3.0  # "": the objective's
  e.batch_size = 50
  e.caption_max_images = 30 if quick else 297
  e.caption_max_tokens = 8

  c.demo = ml_collections.ConfigDict()
  c.demo.quick = quick
  c.demo.tokenizer_vocab = TOKENIZER_VOCAB
  c.demo.vae_channels = (16, 32, 64)  # 4x down: 32x32 digits -> 8x8x4 latents
  c.demo.vae_groups = 16
  c.demo.vae_steps = 40 if quick else 400
  c.demo.vae_batch = 16
  # judged generations per digit (--quick: 50 in all, so accuracy moves in steps of 0.02)
  c.demo.samples_per_digit = 5 if quick else 10
  c.demo.grid_per_digit = 8  # samples per caption in samples.png
  c.demo.representation = representation  # what this config was built for (main.py checks)

  if representation == "discrete":
    # Codes are the last VQ_CODES ids (tfusion/discrete.py); text keeps [0, tokenizer vocab).
    m.image.representation = "discrete"
    m.image.codebook_size = VQ_CODES
    m.vocab_size = _round_up(TOKENIZER_VOCAB + VQ_CODES)  # 1256
    # A 4x4 code grid (8x down: one more VQ-VAE block), 16 tokens per digit, as many as the
    # continuous demo's 2x2 patches of its 8x8 latent: the same images per row and FLOPs per
    # image. With the 8x8 grid (64 tokens) a 128-position row held one digit (15 per step, a
    # sixth of the continuous demo's 96), the class is ~1% of an image's code entropy, and at
    # 200 quick steps the model ignored the caption: the held-out code CE was the same with
    # the right caption and a wrong one (3.459 vs 3.460), judge accuracy 0.06-0.10 (chance).
    # The 4x4 VQ-VAE's reconstructions still read as their digit to the judge (0.87 at 100
    # steps, 0.90 for the 8x8 one; 0.93 on the real digits). BENCHMARKS.md, issue 19.
    m.image.latent_size = 4
    c.demo.vae_channels = (16, 32, 64, 64)
    c.demo.vae_steps = 100 if quick else 400
    # Caption-first 80% of the time (the paper's rate) instead of the continuous demo's 50%:
    # the next-token model learns the caption -> codes dependence from fewer examples than
    # diffusion does. Quick runs (one each, 50 digits), judge accuracy: 0.58 at 0.8, 0.26 at
    # 0.65, 0.28 at 0.5 (temperature 1, 0.7, 1); captioning pays for it (0.10, 0.23, 0.40).
    d.caption_first_prob = 0.8
    # Codes drawn from the model's distribution (guidance 3 on the logits; generate/discrete.py;
    # the eval job reads these two keys). The quick checkpoint, 50 digits: temperature 1 gives
    # judge 0.58 and digit-FID 4.93, 0.7 the same judge and digit-FID 8.44, greedy 0.20 (at
    # caption-first 0.5).
    c.eval.image_temperature = 1.0
    c.eval.image_top_k = 0
  return c
