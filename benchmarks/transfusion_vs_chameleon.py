"""Transfusion vs Chameleon (discrete image tokens) at matched training FLOPs on the digits demo.

Usage: python benchmarks/transfusion_vs_chameleon.py --dir D [--budgets 100,200,400,800]
           [--representations continuous,discrete] [--caption_first_prob 0.8]
           [--samples_per_digit 10] [--caption_images 100] [--vae_steps 400]

Both representations are the quick demo (tfusion/demo/config.py, `get_config(quick=True,
representation=...)`): the same digits, captions, pydoc text, tokenizer, source weights and
caption-first probability (--caption_first_prob, the paper's 0.8 by default, for both), the
same 4-layer x 128 transformer, batch 16 x 128 positions, learning-rate schedule (5e-3 peak,
cosine to 5e-4 over the run). What differs is only the image: Transfusion, a KL VAE's 8x8x4
latent as 2x2 patches (16 per digit) with rectified-flow diffusion; Chameleon, a VQ-VAE's 4x4
grid of 256 codes (16 tokens per digit) with the next-token loss. Both autoencoders get
--vae_steps steps.

Matched FLOPs: a budget is given in steps of the continuous model ("reference steps"); its
FLOPs are steps x tfusion.flops.train_flops_per_step(config, params) (6 N B L + attention, the
eval job's train_flops), and each representation trains for round(budget / its FLOPs per step)
steps. With 16 image positions per digit on both sides the rows, hence B x L, are the same; the
per-step FLOPs differ only by the parameters (the discrete output head covers 256 more ids; the
continuous model has the patch in/out layers), so the step counts differ by about 1%. (Had the
VQ grid been 8x8, a digit would cost 4x the positions: matched FLOPs per image would then mean 4x
fewer digits seen; the demo's discrete config chose 4x4, tfusion/demo/config.py explains why.)

Each trained model is evaluated once: the demo's `digits` suite (judge accuracy and digit-FID
of --samples_per_digit x 10 generations: guidance 3; continuous: flow, 50 Euler steps;
discrete: 16 codes drawn at config.eval.image_temperature, 1), `digit_caption` (greedy captions
of --caption_images held-out digits), `ppl` (held-out pydoc text) and `loss`. Data, autoencoders
and tokenizer are made once per representation under D/<representation> (as the demo makes
them); a finished run or evaluation is skipped, so a rerun resumes. Results: D/results.jsonl and
a markdown table on stdout.
"""

import argparse
import json
import os
import time

import numpy as np

REPRESENTATIONS = ("continuous", "discrete")


def base_config(representation, paths, args):
  from tfusion.demo import config as demo_config, main as demo
  c = demo_config.get_config(quick=True, representation=representation)
  c = demo.configure_run(c, paths)
  c.data.caption_first_prob = args.caption_first_prob
  c.demo.vae_steps = args.vae_steps
  c.demo.samples_per_digit = args.samples_per_digit
  c.eval.caption_max_images = args.caption_images
  c.eval.steps = 50  # the continuous sampler's steps (the full demo's); discrete ignores it
  c.checkpoint.every_steps = 10 ** 9  # the final checkpoint only
  return c


def flops_per_step(config):
  """Training FLOPs of one step, from the abstract parameters (nothing initialised)."""
  import jax
  from tfusion import flops, sharding, train_state
  mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])
  params = train_state.abstract_state(config, mesh)["params"]
  n = int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))
  return flops.train_flops_per_step(config, n), n


def with_steps(config, steps):
  from tfusion import configlib
  return configlib.apply_overrides(config.copy_and_resolve_references(), {
      "train.steps": steps, "optim.decay_steps": steps + 1,
      "train.log_every": max(steps // 10, 1)})


def evaluate(config, run_dir, scratch):
  from tfusion import checkpoint
  from tfusion.demo import suites as demo_suites
  from tfusion.evaluate import suites as suites_lib
  params, _, step = checkpoint.restore_params(run_dir, weights="raw")
  ctx = suites_lib.EvalContext(config, params, step, scratch)
  out = dict(demo_suites.digits_suite(ctx))
  out.update(demo_suites.digit_caption_suite(ctx))
  out.update(suites_lib.SUITES["ppl"](ctx))
  out.update(suites_lib.SUITES["loss"](ctx))
  return step, out, dict(ctx.settings)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--dir", required=True)
  ap.add_argument("--budgets", default="100,200,400,800",
                  help="FLOP budgets, in training steps of the continuous model")
  ap.add_argument("--representations", default=",".join(REPRESENTATIONS))
  ap.add_argument("--caption_first_prob", type=float, default=0.8)
  ap.add_argument("--samples_per_digit", type=int, default=10)
  ap.add_argument("--caption_images", type=int, default=100)
  ap.add_argument("--vae_steps", type=int, default=400)
  args = ap.parse_args(argv)
  from tfusion import logs
  from tfusion.demo import main as demo, suites as demo_suites
  logs.setup_console()
  demo_suites.register()
  budgets = [int(b) for b in args.budgets.split(",")]
  reps = args.representations.split(",")
  for rep in reps:
    if rep not in REPRESENTATIONS:
      raise SystemExit(f"unknown representation {rep!r}; known: {', '.join(REPRESENTATIONS)}")

  results_path = os.path.join(args.dir, "results.jsonl")
  done = {}
  if os.path.exists(results_path):
    with open(results_path, encoding="utf-8") as f:
      for line in f:
        r = json.loads(line)
        done[(r["representation"], r["budget_steps"])] = r

  # The FLOPs of one continuous step price the budgets (before anything is trained).
  reference, _ = flops_per_step(base_config("continuous", demo.paths(
      os.path.join(args.dir, "continuous")), args))
  for rep in reps:
    p = demo.paths(os.path.join(args.dir, rep))
    base = base_config(rep, p, args)
    demo.check_writable(os.path.join(args.dir, rep))
    demo.check_representation(base, os.path.join(args.dir, rep), p)
    start = time.perf_counter()
    demo.stage_tokenizer(base, p)
    demo.stage_vae(base, p)
    demo.stage_records(base, p)
    prep_seconds = time.perf_counter() - start
    per_step, num_params = flops_per_step(base)
    for budget in budgets:
      if (rep, budget) in done:
        continue
      steps = max(int(round(budget * reference / per_step)), 1)
      config = with_steps(base, steps)
      run = dict(p, run=os.path.join(args.dir, rep, "runs", f"budget{budget}"))
      start = time.perf_counter()
      demo.stage_train(config, run)  # resumes, or returns at once when finished
      train_seconds = time.perf_counter() - start
      start = time.perf_counter()
      step, values, settings = evaluate(config, run["run"], os.path.join(args.dir, "scratch"))
      record = dict(representation=rep, budget_steps=budget, steps=step,
                    train_flops=step * per_step, flops_per_step=per_step, params=num_params,
                    train_seconds=round(train_seconds), prep_seconds=round(prep_seconds),
                    eval_seconds=round(time.perf_counter() - start), settings=settings,
                    **values)
      with open(results_path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record, default=float) + "\n")
      done[(rep, budget)] = record
      demo.say(f"{rep} budget {budget}: {step} steps, {record['train_flops']:.3g} FLOPs, judge "
               f"{values['t2i_accuracy']:.3f}, digit-FID {values['digit_fid']:.2f}, captioning "
               f"{values['caption_accuracy']:.3f}, ppl {values['ppl/heldout_text']:.1f}")

  print("\n| budget (continuous steps) | representation | steps | train FLOPs | judge accuracy | "
        "digit-FID | captioning | text ppl | train s |")
  print("|---|---|---|---|---|---|---|---|---|")
  for (rep, budget), r in sorted(done.items(), key=lambda kv: (kv[0][1], kv[0][0])):
    name = "Transfusion (continuous)" if rep == "continuous" else "Chameleon (discrete)"
    print(f"| {budget} | {name} | {r['steps']} | {r['train_flops']:.3g} | "
          f"{r['t2i_accuracy']:.2f} | {r['digit_fid']:.2f} | {r['caption_accuracy']:.2f} | "
          f"{r['ppl/heldout_text']:.1f} | {r['train_seconds']} |")


if __name__ == "__main__":
  main()
