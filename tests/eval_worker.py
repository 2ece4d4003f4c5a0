"""One process of a (possibly multi-process) eval job, for tests/test_eval_multihost.py.

argv: workdir out_dir num_processes process_id port eval_mesh_data. Runs the eval job once
with a suite that saves the generated latents, images and their pixel-feature statistics
(process 0), and records which chunks this process wrote.
"""

import json
import os
import sys

import jax

workdir, out, nproc, pid, port, mesh_data = sys.argv[1:7]
nproc, pid = int(nproc), int(pid)
if nproc > 1:
  jax.distributed.initialize(f"localhost:{port}", nproc, pid)

import numpy as np  # noqa: E402

from tfusion import config_cli  # noqa: E402
from tfusion.evaluate import fid, job, sample_cache, suites  # noqa: E402
from tfusion.generate import output  # noqa: E402

captured, puts = {}, []
decode = output.decode_latents
output.decode_latents = lambda vae, latents: captured.setdefault("latents", latents) is not None \
    and decode(vae, latents)
put = sample_cache.ChunkCache.put
sample_cache.ChunkCache.put = lambda self, start, chunk: (puts.append(int(start)),
                                                          put(self, start, chunk))[1]


def genstats(ctx):
  _, images = ctx.generated
  features = images.reshape(len(images), -1).astype(np.float64) / 255.0
  mu, sigma = fid.feature_statistics(features)
  if jax.process_index() == 0:
    np.savez(os.path.join(out, "stats.npz"), mu=mu, sigma=sigma, images=images,
             latents=captured["latents"])
  return {"mu_mean": float(mu.mean())}


suites.register_suite("genstats", genstats)
config = config_cli.load_run_config(workdir)
config.eval.mesh.data = int(mesh_data)
job.run(workdir, ["genstats"], config=config, once=True, log=print)
with open(os.path.join(out, f"puts{pid}.json"), "w") as f:
  json.dump({"puts": puts, "devices": jax.local_device_count()}, f)
