"""Per-device memory of the real train step, compiled ahead of time (tfusion-aot), per model
size, target, remat policy and loss (dense / chunked CE). Rows go to a JSONL file as they
finish (compiles take minutes each); `--table` prints the BENCHMARKS.md table from it.

  python benchmarks/aot_memory.py --out /tmp/aot.jsonl [--cases 0.37B:v5e-16:full:0 ...]
  python benchmarks/aot_memory.py --out /tmp/aot.jsonl --table

A case is size:target:remat:ce_chunk_size; target is a TPU topology (v5e-16, v5p-32, ...) or
cpu8 (8 XLA:CPU devices checked against an 80 GiB, H100-like budget). Every case: L = 4096,
one row per device, mesh {fsdp: all devices}, linear 2x2 image layers.
"""

import argparse
import json
import os
import subprocess
import sys

DEFAULT_CASES = [
    "0.37B:v5e-16:none:0", "0.37B:v5e-16:full:0", "7B:v5p-32:full:0", "7B:v5e-16:full:0",
    "0.37B:v5e-16:full:512", "0.37B:v5e-16:minimal:0", "0.37B:v5e-16:qkv:0",
    "7B:v5p-32:full:512", "7B:v5p-32:qkv:0", "1.4B:v5p-32:full:0", "1.4B:v5e-16:full:0",
    "0.37B:cpu8:none:0", "0.37B:cpu8:full:0",
]


def run_case(case):
  """Compiles one case in this process; returns its row (dict)."""
  import jax
  jax.config.update("jax_platforms", "cpu")
  from tfusion import aot, configlib
  size, target, remat, chunk = case.split(":")
  config = configlib.load_config_file(f"experiments/configs/paper.py:{size}")
  config.model.remat = remat
  config.loss.ce_chunk_size = int(chunk)
  config.data.seq_len = 4096
  config.mesh.data, config.mesh.fsdp = 1, -1
  if target.startswith("cpu"):
    devices = aot.target_devices(platform="cpu", num_devices=int(target[3:]))
    hbm = 80 * aot.GIB
  else:
    devices = aot.target_devices(topology=target)
    hbm = None
  config.data.batch_size = len(devices)
  report = aot.compile_step(config, devices, hbm=hbm)
  row = {k: v for k, v in vars(report).items()}
  row.update(case=case, size=size, target=target, verdict=report.verdict())
  return row


def table(rows):
  g = lambda b: f"{b / 2 ** 30:.2f}"
  out = ["| model | target (HBM/device) | remat | CE | args GiB | temps GiB | peak GiB | verdict |",
         "|---|---|---|---|---|---|---|---|"]
  for r in rows:
    ce = f"chunked {r['ce_chunk_size']}" if r["ce_chunk_size"] else "dense"
    hbm = f"{r['hbm'] / 2 ** 30:.0f} GiB" if r["hbm"] else "?"
    temps = g(r["temp"]) + (" (OOM)" if r.get("oom") else "")
    out.append(f"| {r['size']} | {r['target']} ({hbm}) | {r['remat']} | {ce} | "
               f"{g(r['argument'])} | {temps} | {g(r['peak'])} | {r['verdict']} |")
  return "\n".join(out)


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--out", required=True)
  parser.add_argument("--cases", nargs="*", default=DEFAULT_CASES)
  parser.add_argument("--table", action="store_true")
  parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: one case, JSON to stdout
  args = parser.parse_args()
  if args.one:
    print("ROW " + json.dumps(run_case(args.one)), flush=True)
    return
  if args.table:
    with open(args.out) as f:
      print(table([json.loads(line) for line in f if line.strip()]))
    return
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  for case in args.cases:  # one process per case: CPU device counts and memory stay separate
    proc = subprocess.run([sys.executable, __file__, "--out", args.out, "--one", case],
                          capture_output=True, text=True, cwd=root,
                          env=dict(os.environ, PYTHONPATH=root))
    rows = [l[4:] for l in proc.stdout.splitlines() if l.startswith("ROW ")]
    if not rows:
      print(f"{case}: failed\n{proc.stderr[-2000:]}", flush=True)
      continue
    with open(args.out, "a") as f:
      f.write(rows[0] + "\n")
    print(case, json.loads(rows[0])["verdict"], flush=True)


if __name__ == "__main__":
  main()
