"""Diffusion objectives at demo scale: DDPM-eps (paper), DDPM-v, DDPM-eps + min-SNR, flow.

Usage: python benchmarks/diffusion_variants.py --dir D [--variants ddpm_eps,flow] [--steps 1000]
                                               [--samples_per_digit 20] [--ema_decay 0.99]

Each variant is the demo (tfusion/demo/config.py: same tokenizer, VAE, data, model, 1000
steps) with another `config.diffusion`, trained once with EMA weights kept beside the params
(the average never changes training). The final checkpoint is evaluated with both weights
(raw, ema) on the demo's `digits` suite (judge accuracy, digit-FID; guidance 3, the objective's
sampler, 50 steps) and the `loss` suite (held-out image loss); DDPM-eps also with the sampler
as it was before issue 16 (no x0 bound, linspace spacing). Data, VAE and tokenizer are made
once in D (as the demo makes them); each step of the work is skipped when its result exists,
so a rerun resumes. Results: D/results.jsonl and a markdown table on stdout.
"""

import argparse
import json
import os
import time

VARIANTS = {
    "ddpm_eps": {"diffusion.objective": "ddpm", "diffusion.prediction": "eps"},
    "ddpm_v": {"diffusion.objective": "ddpm", "diffusion.prediction": "v"},
    "ddpm_eps_minsnr": {"diffusion.objective": "ddpm", "diffusion.prediction": "eps",
                        "diffusion.loss_weighting": "min_snr"},
    "flow": {"diffusion.objective": "flow"},
}
# The DDPM sampler before issue 16: no bound on the clean estimate, linspace steps from 999.
OLD_SAMPLER = {"eval.x0_threshold": "none", "eval.timestep_spacing": "linspace"}


def _evaluations(variant):
  out = [("raw", {}), ("ema", {})]
  if variant == "ddpm_eps":
    out.append(("raw_old_sampler", OLD_SAMPLER))
  return out


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--dir", required=True)
  ap.add_argument("--variants", default=",".join(VARIANTS))
  ap.add_argument("--steps", type=int, default=1000)
  ap.add_argument("--samples_per_digit", type=int, default=20)
  ap.add_argument("--ema_decay", type=float, default=0.99)
  args = ap.parse_args(argv)
  from tfusion import checkpoint, configlib, logs
  from tfusion.demo import config as demo_config, main as demo, suites as demo_suites
  from tfusion.evaluate import suites as suites_lib
  logs.setup_console()
  demo_suites.register()

  p = demo.paths(args.dir)
  base = demo.configure_run(demo_config.get_config(), p)
  demo.stage_tokenizer(base, p)
  demo.stage_vae(base, p)
  demo.stage_records(base, p)
  results_path = os.path.join(args.dir, "results.jsonl")
  done = {}
  if os.path.exists(results_path):
    with open(results_path, encoding="utf-8") as f:
      for line in f:
        r = json.loads(line)
        done[(r["variant"], r["weights"])] = r

  for variant in args.variants.split(","):
    if variant not in VARIANTS:
      raise SystemExit(f"unknown variant {variant!r}; known: {', '.join(VARIANTS)}")
    config = configlib.apply_overrides(base.copy_and_resolve_references(), dict(
        VARIANTS[variant], **{"train.steps": args.steps, "train.ema_decay": args.ema_decay,
                              "optim.decay_steps": args.steps + 1}))
    config.demo.samples_per_digit = args.samples_per_digit
    run = dict(p, run=os.path.join(args.dir, "runs", variant))
    start = time.perf_counter()
    demo.stage_train(config, run)  # resumes, or returns at once when finished
    train_seconds = time.perf_counter() - start
    for name, overrides in _evaluations(variant):
      if (variant, name) in done:
        continue
      weights = "ema" if name.startswith("ema") else "raw"
      params, _, step = checkpoint.restore_params(run["run"], weights=weights)
      cfg = configlib.apply_overrides(config.copy_and_resolve_references(), overrides)
      start = time.perf_counter()
      ctx = suites_lib.EvalContext(cfg, params, step, os.path.join(args.dir, "scratch"))
      values = dict(demo_suites.digits_suite(ctx), **suites_lib.SUITES["loss"](ctx))
      record = dict(variant=variant, weights=name, step=step, settings=dict(ctx.settings),
                    train_seconds=round(train_seconds), eval_seconds=round(
                        time.perf_counter() - start), **values)
      with open(results_path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")
      done[(variant, name)] = record
      demo.say(f"{variant} {name}: judge {values['t2i_accuracy']:.3f} digit-FID "
               f"{values['digit_fid']:.2f} held-out image loss {values['loss/image']:.4f}")

  print("\n| variant | weights / sampler | judge accuracy | digit-FID | held-out image loss |")
  print("|---|---|---|---|---|")
  for (variant, name), r in sorted(done.items()):
    print(f"| {variant} | {name} | {r['t2i_accuracy']:.3f} | {r['digit_fid']:.2f} | "
          f"{r['loss/image']:.4f} |")


if __name__ == "__main__":
  main()
