"""The demo's `digits` suite on a demo checkpoint with other sampling settings.

Usage: python benchmarks/demo_sampling.py WORKDIR SAMPLES_PER_DIGIT SAMPLER:STEPS:GUIDANCE ...
       python benchmarks/demo_sampling.py /tmp/tfusion-demo 30 euler:50:3 euler:50:1
       (WORKDIR:STEP picks a checkpoint; default the newest)

Prints judge accuracy and digit-FID per setting: more samples than the demo's 100 narrow the
noise of both, and guidance 1 shows the conditional model without guidance saturating it.
Nothing is written to the workdir.
"""

import sys
import tempfile
import time

from tfusion import checkpoint
from tfusion.demo import suites as demo_suites
from tfusion.evaluate import suites as suites_lib


def main(argv):
  if len(argv) < 3:
    raise SystemExit(__doc__)
  workdir, step = (argv[0].rsplit(":", 1) + [None])[:2] if ":" in argv[0] else (argv[0], None)
  params, config, step = checkpoint.restore_params(
      f"{workdir}/run", step=int(step) if step else None)
  config.demo.samples_per_digit = int(argv[1])
  with tempfile.TemporaryDirectory() as scratch:  # the suite's side outputs
    for spec in argv[2:]:
      sampler, steps, guidance = spec.split(":")
      config.eval.sampler, config.eval.steps = sampler, int(steps)
      config.eval.guidance_scale = float(guidance)
      start = time.perf_counter()
      out = demo_suites.digits_suite(suites_lib.EvalContext(config, params, step, scratch))
      print(f"step {step} ({config.model.intra_image}) {spec}: judge accuracy "
            f"{out['t2i_accuracy']:.3f}, digit-FID {out['digit_fid']:.2f} "
            f"({int(argv[1]) * 10} samples, {time.perf_counter() - start:.0f} s)", flush=True)


if __name__ == "__main__":
  main(sys.argv[1:])
