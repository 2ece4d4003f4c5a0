"""`tfusion-generate`: look at what a checkpoint does.

  tfusion-generate --workdir W --prompt "a red bird" [--prompt ...] [--num 4 --steps 250
      --cfg 5 --seed 0 --sampler ddpm] --out samples.png          text -> image (a labelled grid)
  tfusion-generate --workdir W --caption photo.png [...] [--out captions.jsonl]   image -> text
  tfusion-generate --workdir W --prompt TEXT --interleaved --num_images 2 --out F.png
  tfusion-generate --workdir W --prompt TEXT --text                               text -> text

The newest checkpoint is used unless --step names one. The tokenizer and the VAE come from
--tokenizer / --vae, or from the run's config (config.data.tokenizer, config.vae.path).
A discrete (Chameleon-baseline) model draws VQ codes token by token (--image_temperature,
--image_top_k, --cfg on logits) and --vae is its VQ-VAE, which decodes them and encodes the
images to --caption.
DDPM models sample with config.diffusion's clean-estimate bound and step spacing unless
--x0_threshold / --clip_x0 / --threshold_percentile / --timestep_spacing say otherwise.
Everything is checked (prompt lengths, sampler, image layers, files) before the model runs.
"""

import argparse
import json
import os
import sys
import time

import numpy as np

USAGE_ERRORS = (ValueError, FileNotFoundError)


def parse_args(argv):
  p = argparse.ArgumentParser(prog="tfusion-generate", description=__doc__.splitlines()[0])
  p.add_argument("--workdir", required=True, help="run directory holding checkpoints/")
  p.add_argument("--step", type=int, default=None, help="checkpoint step (default: newest)")
  p.add_argument("--prompt", action="append", default=[], help="text prompt (repeatable)")
  mode = p.add_mutually_exclusive_group()
  mode.add_argument("--caption", nargs="+", metavar="IMAGE", help="caption these image files")
  mode.add_argument("--interleaved", action="store_true",
                    help="text and images in turn after each prompt")
  mode.add_argument("--text", action="store_true", help="text continuation only")
  p.add_argument("--num", type=int, default=1, help="samples per prompt")
  p.add_argument("--sampler", default=None, help="ddpm | ddim (DDPM models), euler | heun (flow)")
  p.add_argument("--steps", type=int, default=None, help="denoising steps (default per sampler)")
  p.add_argument("--cfg", type=float, default=1.0,
                 help="classifier-free guidance scale (1: none; the paper uses 3 and 5)")
  p.add_argument("--clip_x0", type=float, default=None,
                 help="ddpm/ddim: bound C on the clean-latent estimate at each step "
                 "(default config.diffusion.clip_x0)")
  p.add_argument("--x0_threshold", default=None,
                 help="ddpm/ddim: none | static (clip at C) | dynamic (Imagen percentile, "
                 "floor C) (default config.diffusion.x0_threshold)")
  p.add_argument("--threshold_percentile", type=float, default=None,
                 help="ddpm/ddim, dynamic thresholding: percentile of |x0| per sample")
  p.add_argument("--timestep_spacing", default=None,
                 help="ddpm/ddim: linspace | leading | trailing (default "
                 "config.diffusion.timestep_spacing)")
  p.add_argument("--weights", default="auto", choices=("auto", "ema", "raw"),
                 help="auto: the checkpoint's EMA weights when it has them, else its params")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--temperature", type=float, default=0.0, help="0: greedy (the paper)")
  p.add_argument("--top_p", type=float, default=1.0)
  p.add_argument("--max_new_tokens", type=int, default=64, help="text tokens per text segment")
  p.add_argument("--num_images", type=int, default=1, help="images per document (--interleaved)")
  p.add_argument("--image_temperature", type=float, default=1.0,
                 help="discrete models: temperature of the image codes (0: greedy)")
  p.add_argument("--image_top_k", type=int, default=0,
                 help="discrete models: draw codes from the k most likely (0: all)")
  p.add_argument("--batch_size", type=int, default=16, help="rows generated together")
  p.add_argument("--tokenizer", default=None, help="SentencePiece .model (default from config)")
  p.add_argument("--vae", default=None, help="VAE directory (default config.vae.path)")
  p.add_argument("--out", default=None, help="PNG grid (images) or JSONL file (text)")
  p.add_argument("--images_dir", default=None, help="also write each image as a PNG here")
  p.add_argument("--latents", default=None, help="also write the raw latents (.npy)")
  p.add_argument("--fast_compile", action="store_true",
                 help="XLA optimisations off: faster compiles, slower sampling (CPU smoke runs)")
  args = p.parse_args(argv)
  if args.caption is None and not args.prompt:
    p.error("give --prompt TEXT (or --caption IMAGE ...)")
  if args.num < 1 or args.batch_size < 1:
    p.error("--num and --batch_size must be >= 1")
  if args.cfg < 0:
    p.error(f"--cfg must be >= 0, got {args.cfg}")
  makes_images = args.caption is None and not args.text
  if makes_images and not (args.out or args.images_dir or args.latents):
    p.error("say where the images go: --out F.png, --images_dir D or --latents F.npy")
  if args.out and makes_images and not args.out.lower().endswith(".png"):
    p.error(f"--out {args.out!r}: images are written as a .png grid")
  return args


def sampling_overrides(args):
  """The DDPM sampler settings given as flags (None: config.diffusion's)."""
  return {"x0_threshold": args.x0_threshold, "threshold_percentile": args.threshold_percentile,
          "timestep_spacing": args.timestep_spacing}


def _config_path(config, block, key):
  node = config.get(block) if hasattr(config, "get") else None
  return node.get(key) if node is not None and hasattr(node, "get") else None


def _load_tokenizer(args, config):
  from tfusion.data import tokenizer as tokenizer_lib
  path = args.tokenizer or _config_path(config, "data", "tokenizer")
  if not path:
    raise ValueError("no tokenizer: pass --tokenizer PATH.model (the run's config has no "
                     "config.data.tokenizer)")
  tok = tokenizer_lib.load_tokenizer(path)
  if tok.vocab_size > config.model.vocab_size:
    raise ValueError(f"tokenizer {path} has {tok.vocab_size} ids but the model's vocabulary is "
                     f"config.model.vocab_size={config.model.vocab_size}: not this model's "
                     "tokenizer")
  return tok


def _vae_path(args, config):
  path = args.vae or _config_path(config, "vae", "path")
  if not path:
    raise ValueError("no VAE: pass --vae DIR (diffusers format; the run's config has no "
                     "config.vae.path), or write raw latents only with --latents F.npy")
  return path


def _batches(n, size):
  return [range(i, min(i + size, n)) for i in range(0, n, size)]


def run(args):
  """The job behind the console script (returns what it wrote, for tests)."""
  import jax
  from tfusion import checkpoint, discrete as discrete_lib, sharding
  from tfusion.generate import engine, image as image_lib, output as output_lib

  # One device: params replicated on every device would make every device do the same work.
  mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])
  try:
    params, config, step, source = checkpoint.restore_params(
        args.workdir, args.step, mesh=mesh, weights=args.weights, with_source=True)
  except checkpoint.NoEMAWeightsError as e:
    raise SystemExit(f"tfusion-generate: error: --weights ema: {e}") from None
  tok = _load_tokenizer(args, config)
  gen = engine.Generator(config, params, engine.SpecialTokens.from_tokenizer(tok),
                         fast_compile=args.fast_compile)
  prompts = [tok.encode(p) for p in args.prompt]
  wrote = {}

  if (args.caption is not None or not args.text) and not gen.discrete:
    engine.check_image_layers(params, config)  # all but text-only need the image layers
  image_sampling = dict(image_temperature=args.image_temperature, image_top_k=args.image_top_k)
  if gen.discrete and args.caption is None and not args.text:
    if args.interleaved:
      gen.check_interleaved(prompts, args.num_images)
    else:
      gen.check_text_to_image(prompts)
    codebook = discrete_lib.codebook_size(config.model)
    if args.image_temperature < 0 or not 0 <= args.image_top_k <= codebook:
      raise ValueError(f"--image_temperature must be >= 0 and --image_top_k in [0, "
                       f"{codebook}] (config.model.image.codebook_size), got "
                       f"{args.image_temperature} and {args.image_top_k}")
    wrote["settings"] = dict(sampler="autoregressive", steps=gen.num_patches,
                             temperature=args.image_temperature, top_k=args.image_top_k,
                             weights=source)
  elif args.caption is None and not args.text:
    args.sampler, args.steps = image_lib.resolve_sampler(
        args.sampler, config.diffusion.objective, args.steps, config.diffusion.num_train_steps,
        args.clip_x0)
    sampling = sampling_overrides(args)
    if args.interleaved:
      gen.check_interleaved(prompts, args.num_images, args.sampler, args.steps, args.clip_x0,
                            sampling)
    else:
      gen.check_text_to_image(prompts, args.sampler, args.steps, args.clip_x0, sampling)
    wrote["settings"] = dict(gen.sampling_settings(args.sampler, args.steps, args.clip_x0,
                                                   sampling), weights=source)
  needs_vae = args.caption is not None or (not args.text and (args.out or args.images_dir))
  vae = output_lib.ImageCodec(_vae_path(args, config), config) if needs_vae else None
  # Every prompt --num times, one seeded key per row (all modes but --caption).
  rows_prompts = [p for p in prompts for _ in range(args.num)]
  row_keys = engine.sample_keys(args.seed, len(rows_prompts))
  print(f"checkpoint {args.workdir} step {step} ({source} weights); {config.model.num_layers}x"
        f"{config.model.d_model} model, " + ("discrete images (VQ codes)" if gen.discrete else
                                             f"{config.diffusion.objective} objective"),
        flush=True)
  start = time.perf_counter()

  if args.caption is not None:
    from tfusion.vae import images as images_lib
    size = config.model.image.latent_size * vae.downsample_factor
    pixels = np.stack([images_lib.load_image(f, size) for f in args.caption])
    latents = vae.encode(pixels)  # VAE latents, or a discrete model's VQ codes
    keys = engine.sample_keys(args.seed, len(latents))
    captions = []
    for rows in _batches(len(latents), args.batch_size):
      captions += gen.caption(latents[rows.start:rows.stop], keys[rows.start:rows.stop],
                              max_new_tokens=args.max_new_tokens,
                              temperature=args.temperature, top_p=args.top_p)
    records = [{"image": f, "caption": tok.decode(ids)} for f, ids in zip(args.caption, captions)]
    for r in records:
      print(f"{r['image']}: {r['caption']}")
    wrote["captions"] = records
    if args.out:
      _write_jsonl(args.out, records)

  elif args.text:
    records = []
    for rows in _batches(len(rows_prompts), args.batch_size):
      result = gen.complete([rows_prompts[i] for i in rows], row_keys[rows.start:rows.stop],
                            max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                            top_p=args.top_p)
      for j, i in enumerate(rows):
        records.append({"prompt": args.prompt[i // args.num],
                        "text": tok.decode(result.ids(j))})
    for r in records:
      print(f"{r['prompt']!r} -> {r['text']!r}")
    wrote["texts"] = records
    if args.out:
      _write_jsonl(args.out, records)

  elif args.interleaved:
    docs = []
    for rows in _batches(len(rows_prompts), args.batch_size):
      docs += gen.interleaved([rows_prompts[i] for i in rows], row_keys[rows.start:rows.stop],
                              num_images=args.num_images, max_text_tokens=args.max_new_tokens,
                              temperature=args.temperature, top_p=args.top_p,
                              sampler=args.sampler, steps=args.steps, guidance_scale=args.cfg,
                              clip_x0=args.clip_x0, sampling=sampling_overrides(args),
                              **image_sampling)
    latents, labels = [], []
    for i, doc in enumerate(docs):
      pieces = [args.prompt[i // args.num]]
      for kind, value in doc:
        if kind == "text":
          pieces.append(tok.decode(value))
        else:
          pieces.append(f"[image {len(latents)}]")
          latents.append(value)
      labels.append(" ".join(pieces))
      print(labels[-1])
    wrote["documents"] = labels
    _write_images(args, vae, gen, np.asarray(latents), labels, docs, wrote)

  else:
    latents = []
    for rows in _batches(len(rows_prompts), args.batch_size):
      latents.append(np.asarray(gen.text_to_image(
          [rows_prompts[i] for i in rows], row_keys[rows.start:rows.stop], sampler=args.sampler,
          steps=args.steps, guidance_scale=args.cfg, clip_x0=args.clip_x0,
          sampling=sampling_overrides(args), **image_sampling)))
    latents = np.concatenate(latents)
    docs = [[("image", x)] for x in latents]
    labels = [args.prompt[i // args.num] for i in range(len(latents))]
    _write_images(args, vae, gen, latents, labels, docs, wrote)
    settings = wrote["settings"]
    extra = "".join(f", {k} {v}" for k, v in settings.items() if k not in ("sampler", "steps"))
    print(f"{len(latents)} images ({len(prompts)} prompts x {args.num}), sampler "
          f"{settings['sampler']} {settings['steps']} steps, cfg {args.cfg}{extra}", flush=True)
  print(f"done in {time.perf_counter() - start:.1f}s", flush=True)
  return wrote


def _write_jsonl(path, records):
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w", encoding="utf-8") as f:
    for r in records:
      f.write(json.dumps(r) + "\n")
  print(f"wrote {path}")


def _write_images(args, vae, gen, latents, labels, docs, wrote):
  """Latents or codes (all images, in document order) -> --latents .npy, PNGs and the labelled
  grid; `vae` is the ImageCodec that decodes them."""
  from tfusion.generate import output
  if args.latents:
    os.makedirs(os.path.dirname(os.path.abspath(args.latents)), exist_ok=True)
    np.save(args.latents, latents)
    wrote["latents"] = args.latents
    print(f"wrote {args.latents} ({latents.shape})")
  if vae is None or not len(latents):
    return
  pixels = vae.decode(latents)
  if args.images_dir:
    k = 0
    for row, doc in enumerate(docs):
      for j, (kind, _) in enumerate(d for d in doc if d[0] == "image"):
        output.save_png(os.path.join(args.images_dir, f"{row:04d}_{j:02d}.png"), pixels[k])
        k += 1
    wrote["images_dir"] = args.images_dir
    print(f"wrote {k} PNGs to {args.images_dir}")
  if args.out:
    if args.interleaved:  # one grid row per document, its images in order
      per_doc = [sum(kind == "image" for kind, _ in d) for d in docs]
      cols = max(per_doc) if per_doc else 0
      tiles = np.full((len(docs), max(cols, 1), *pixels.shape[1:]), 255, np.uint8)
      k = 0
      for row, n in enumerate(per_doc):
        tiles[row, :n] = pixels[k:k + n]
        k += n
      grid = output.labelled_grid(tiles, labels)
    else:  # one grid row per prompt, its samples side by side
      tiles = pixels.reshape(len(args.prompt), args.num, *pixels.shape[1:])
      grid = output.labelled_grid(tiles, args.prompt)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    grid.save(args.out)
    wrote["out"] = args.out
    print(f"wrote {args.out}")


def main(argv=None):
  args = parse_args(sys.argv[1:] if argv is None else argv)
  from tfusion import logs
  logs.setup_console()
  try:
    run(args)
  except USAGE_ERRORS as e:
    print(f"tfusion-generate: error: {e}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  main()
