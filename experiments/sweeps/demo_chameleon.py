"""Transfusion vs Chameleon at demo scale on CPU: 2 families x 3 sizes x 2 FLOPs budgets.

  tfusion-sweep experiments/sweeps/demo_chameleon.py --dir S --run   # 42.5 min on 2 cores
  tfusion-scaling fit S --metric ppl/heldout_text --parity transfusion,chameleon
  tfusion-scaling fit S --metric digit_fid --parity transfusion,chameleon

The paper's controlled comparison (PAPER.md: Transfusion reaches Chameleon's FID with 34x less
compute) in the demo's world (tfusion/demo/config.py): `transfusion` is the demo's continuous
config (8x8x4 KL-VAE latents, 2x2 patches, rectified flow, bidirectional inside images);
`chameleon` sets model.image.representation=discrete, so its base is
get_config(representation="discrete") (tfusion/scaling/spec.py, a family's own base): a
256-code VQ-VAE with a 4x4 code grid (16 tokens per digit, as many as the continuous 2x2
patches), a 1256-id vocabulary, causal attention and next-token loss throughout. The runner
prepares each family's data in its own root: S/data, S/vae (continuous) and S/discrete/{data,
vae} (discrete: its own tokenizer, a VQ-VAE, code records).

Budgets are training FLOPs (the paper's x axis; tfusion/flops.py counts both families the same
way, attention dense), so each budget gives both families and every size the same compute (a
bigger vocabulary or smaller model gets fewer or more steps). Metrics comparable across the
families: `ppl/heldout_text` (pydoc perplexity, same tokenizer training), and the `digits`
suite's `t2i_accuracy` (the digit judge on 50 generated digits) and `digit_fid` (FID in the
judge's feature space vs the 297 held-out digits). `loss/image` is NOT comparable (flow MSE vs
code cross-entropy); `loss/text` (caption loss) is reported but its context differs (latents vs
codes). Only the final checkpoint of each run is evaluated.

Measured (shared 2-core CPU, other trainings running; BENCHMARKS.md, issue 19): 2553 s in all,
344 s preparing both data roots, 1126 s for the chameleon runs, 1083 s for the transfusion
runs (5-23 s of evaluation each). At this scale the slope and parity CIs all include the null.
"""

import ml_collections

from tfusion.scaling import spec


def get_sweep():
  rows, seq_len = 16, 128
  return ml_collections.ConfigDict({
      "name": "demo_chameleon",
      "description": "demo-scale Transfusion (continuous) vs Chameleon (discrete VQ codes)",
      "base_config": "demo",  # chameleon's base: the demo config built for "discrete"
      "base_overrides": {
          # The --quick recipe's shape: 16 rows per step, more image-caption data, a higher
          # learning rate, for runs of a few hundred steps.
          "data.batch_size": rows, "data.seq_len": seq_len,
          "data.image_caption_weight": 3.0,
          "optim.lr": 3e-3, "optim.end_lr": 3e-4,
          "train.log_every": 10,
          "demo.vae_steps": 200,  # both autoencoders (KL VAE, VQ-VAE), trained once each
          # Eval cost: 50 judged digits per checkpoint (accuracy in steps of 0.02), 20 flow
          # steps for the continuous family (the discrete one draws 16 codes).
          "demo.samples_per_digit": 5,
          "eval.steps": 20,
          "eval.loss_rows": 64,
      },
      "families": {
          "transfusion": {},  # the demo's own representation: continuous
          "chameleon": {"model.image.representation": "discrete"},
      },
      "sizes": {
          "s2": spec.model_size(64, 2, 4),
          "s3": spec.model_size(96, 3, 4),
          "s4": spec.model_size(128, 4, 4),  # the demo's own model
      },
      "budgets": {
          "1.5T": {"flops": 1.5e12},
          "4T": {"flops": 4e12},
      },
      "schedule": {"warmup_fraction": 0.05, "warmup_min": 10, "warmup_max": 4000,
                   "evals": 1, "checkpoint_every": 0},
      "eval_suites": "digits,ppl,loss",
  }, allow_dotted_keys=True)
