"""Final latent RMS per sampler setting: does sampling stay at the data's scale?

Usage:
  python benchmarks/sampler_rms.py [--workdir W [--step N] [--prompt TEXT ...] [--num 16]
      [--cfg 1]] [SAMPLER:STEPS[:THRESHOLD[:SPACING]] ...]
  e.g. python benchmarks/sampler_rms.py --workdir /tmp/demo-ddpm/run ddim:50:none:linspace \\
         ddim:50:static:trailing ddpm:250:dynamic:trailing

THRESHOLD is none | static | dynamic (optionally @BOUND, e.g. static@2.5); SPACING is linspace
| leading | trailing; omitted parts are config.diffusion's. With --workdir, the checkpoint's
model draws --num images per prompt (normalised latents: the data's RMS is about 1). Without
it, the imperfect denoisers of tests/test_samplers_imperfect.py stand in for a model (data
N(0.3, 0.9^2), RMS 0.949): the closed-form optimal model 5% off, and one returning 0.98 x_t at
t >= 0.9, both seeing their input saturated at +-5 as a trained network would. Prints one line
per setting; nothing is written.
"""

import argparse
import sys
import time

import numpy as np

DEFAULT_SPECS = ["ddpm:250:none:linspace", "ddpm:250:static:trailing",
                 "ddpm:250:dynamic:trailing", "ddim:50:none:linspace", "ddim:50:none:trailing",
                 "ddim:50:none:leading", "ddim:50:static:linspace", "ddim:50:static:trailing",
                 "ddim:50:dynamic:trailing"]
MU, S, INPUT_RANGE = 0.3, 0.9, 5.0


def parse_spec(spec):
  """'ddim:50:static@2.5:trailing' -> (sampler, steps, sampling overrides)."""
  parts = spec.split(":")
  if len(parts) < 2:
    raise SystemExit(f"bad setting {spec!r}: SAMPLER:STEPS[:THRESHOLD[:SPACING]]")
  overrides = {}
  if len(parts) > 2 and parts[2]:
    mode, _, bound = parts[2].partition("@")
    overrides["x0_threshold"] = mode
    if bound:
      overrides["clip_x0"] = float(bound)
  if len(parts) > 3 and parts[3]:
    overrides["timestep_spacing"] = parts[3]
  return parts[0], int(parts[1]), overrides


def denoisers(objective):
  import jax.numpy as jnp

  from tfusion import diffusion
  optimal = lambda x, t: diffusion.gaussian_optimal_prediction(objective, x, t, MU, S)

  sat = lambda x: jnp.clip(x, -INPUT_RANGE, INPUT_RANGE)
  return {"optimal+5%": lambda x, t: 1.05 * optimal(sat(x), t),
          "0.98 x_t at t>=0.9": lambda x, t: jnp.where(t >= 0.9, 0.98 * sat(x),
                                                       optimal(sat(x), t))}


def denoiser_mode(specs):
  import jax
  import jax.numpy as jnp
  from tfusion import configlib
  from tfusion.generate import image as image_lib
  config = configlib.base_config()
  keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.PRNGKey(0), i))(jnp.arange(64))
  print(f"imperfect denoisers, 64 samples of 4x4x2, data RMS {np.sqrt(MU ** 2 + S ** 2):.3f}")
  for spec in specs:
    sampler, steps, overrides = parse_spec(spec)
    image_lib.resolve_sampler(sampler, "ddpm", steps, 1000)
    objective = image_lib.sampling_objective(config, overrides)
    times = jnp.asarray(objective.sampling_times(steps))
    cells = []
    for name, predict in denoisers(objective).items():
      x = image_lib.denoising_loop(predict, keys, times, objective=objective, sampler=sampler,
                                   latent_shape=(4, 4, 2))
      cells.append(f"{name}: {float(jnp.sqrt(jnp.mean(x ** 2))):.3g}")
    print(f"{_describe(sampler, steps, objective)}  " + "  ".join(cells), flush=True)


def checkpoint_mode(args, specs):
  import jax
  from tfusion import checkpoint, sharding
  from tfusion.data import tokenizer as tokenizer_lib
  from tfusion.generate import engine
  mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])
  params, config, step = checkpoint.restore_params(args.workdir, args.step, mesh=mesh)
  tok = tokenizer_lib.load_tokenizer(args.tokenizer or config.data.tokenizer)
  gen = engine.Generator(config, params, engine.SpecialTokens.from_tokenizer(tok))
  prompts = [tok.encode(p) for p in args.prompt for _ in range(args.num)]
  keys = engine.sample_keys(0, len(prompts))
  objective = config.diffusion.objective
  if objective == "ddpm":
    objective += f" ({config.diffusion.get('prediction', 'eps')} prediction)"
  print(f"{args.workdir} step {step}, {objective} objective, {len(prompts)} samples, "
        f"cfg {args.cfg}")
  for spec in specs:
    sampler, steps, overrides = parse_spec(spec)
    settings = gen.sampling_settings(sampler, steps, None, overrides)
    start = time.perf_counter()
    x = np.asarray(gen.text_to_image(prompts, keys, sampler=sampler, steps=steps,
                                     guidance_scale=args.cfg, sampling=overrides))
    desc = " ".join(f"{k}={v}" for k, v in settings.items())
    print(f"{desc}: final latent RMS {np.sqrt(np.mean(x ** 2)):.3g}, max |x| "
          f"{np.abs(x).max():.3g} ({time.perf_counter() - start:.0f} s)", flush=True)


def _describe(sampler, steps, objective):
  s = objective.sampling_settings()
  bound = f"@{s['clip_x0']:g}" if "clip_x0" in s else ""
  return (f"{sampler:4s} {steps:3d} steps, {s['x0_threshold'] + bound:10s} "
          f"{s['timestep_spacing']:8s}")


def main(argv):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--workdir", default=None, help="run directory (default: imperfect denoisers)")
  p.add_argument("--step", type=int, default=None)
  p.add_argument("--prompt", action="append", default=None)
  p.add_argument("--num", type=int, default=16, help="samples per prompt")
  p.add_argument("--cfg", type=float, default=1.0)
  p.add_argument("--tokenizer", default=None)
  p.add_argument("specs", nargs="*", default=None)
  args = p.parse_args(argv)
  specs = args.specs or (DEFAULT_SPECS if args.workdir is None else
                         [s for s in DEFAULT_SPECS if not s.startswith("ddpm:250:dynamic")])
  if args.workdir is None:
    denoiser_mode(specs)
  else:
    args.prompt = args.prompt or ["a photo"]
    checkpoint_mode(args, specs)


if __name__ == "__main__":
  main(sys.argv[1:])
