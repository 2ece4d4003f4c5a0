"""The launchers print the command they would run on every host."""

import os
import subprocess
import sys

import train_utils

LAUNCH = os.path.join(train_utils.REPO, "launch")


def test_tpu_pod_dry_run_runs_the_same_command_on_all_workers():
  out = subprocess.run(
      ["bash", os.path.join(LAUNCH, "tpu_pod.sh"), "--tpu", "pod1", "--zone", "us-x", "--dry-run",
       "--", "--config", "experiments/configs/paper.py:0.37B", "--workdir", "/gcs/b/run"],
      capture_output=True, text=True, check=True).stdout
  assert "gcloud compute tpus tpu-vm ssh pod1 --zone us-x --worker=all" in out
  assert "tfusion-train\\ --config\\ experiments/configs/paper.py:0.37B" in out


def test_tpu_pod_requires_train_flags():
  proc = subprocess.run(["bash", os.path.join(LAUNCH, "tpu_pod.sh"), "--tpu", "p", "--zone", "z"],
                        capture_output=True, text=True)
  assert proc.returncode == 2 and "after --" in proc.stderr


def slurm_dry_run(**env):
  base = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  out = subprocess.run(["bash", os.path.join(LAUNCH, "slurm.sbatch"), "--config", "c.py:0.76B",
                        "--workdir", "/shared/r"], capture_output=True, text=True, check=True,
                       env=dict(base, DRY_RUN="1", **env)).stdout
  return out.strip().splitlines()


def test_slurm_dry_run():
  _, srun, requeue = slurm_dry_run()
  assert srun.strip() == ("srun --kill-on-bad-exit=1 tfusion-train --config c.py:0.76B "
                          "--workdir /shared/r --config.train.preempted_exit_code=75")
  assert requeue == "on exit status 75: scontrol requeue ${SLURM_JOB_ID}"


def test_slurm_requeues_only_a_preempted_run(tmp_path):
  """Fake srun/scontrol on PATH: status 75 requeues (and the job exits 0), others do not."""
  for name, body in (("srun", 'echo "srun $*" >> "$LOG"; exit "$SRUN_STATUS"'),
                     ("scontrol", 'echo "scontrol $*" >> "$LOG"')):
    path = tmp_path / name
    path.write_text(f"#!/usr/bin/env bash\n{body}\n")
    path.chmod(0o755)
  for status, want_rc, requeued in ((75, 0, True), (0, 0, False), (2, 2, False)):
    log = tmp_path / f"log{status}"
    env = dict(os.environ, PATH=f"{tmp_path}:{os.environ['PATH']}", LOG=str(log),
               SRUN_STATUS=str(status), SLURM_JOB_ID="123")
    proc = subprocess.run(["bash", os.path.join(LAUNCH, "slurm.sbatch"), "--config", "c.py",
                           "--workdir", "/r"], capture_output=True, text=True, env=env)
    assert proc.returncode == want_rc, proc.stderr
    assert ("scontrol requeue 123" in log.read_text()) == requeued


def test_slurm_sets_gpu_xla_flags_this_jaxlib_accepts():
  xla, _, _ = slurm_dry_run(SLURM_JOB_NUM_NODES="4", SLURM_GPUS_ON_NODE="8")
  flags = xla.removeprefix("XLA_FLAGS=")
  assert "--xla_gpu_enable_latency_hiding_scheduler=true" in flags
  # Combine thresholds scale with the job's 32 GPUs: 1 GiB / 32 and / 64.
  assert "--xla_gpu_all_gather_combine_threshold_bytes=33554432" in flags
  assert "--xla_gpu_reduce_scatter_combine_threshold_bytes=16777216" in flags
  # XLA aborts at start-up on a flag it does not know: a renamed flag fails here, not on a
  # cluster. (GPU flags are parsed by every backend, so the CPU build checks them.)
  probe = "import jax.numpy as jnp; jnp.ones(2).block_until_ready()"
  proc = subprocess.run([sys.executable, "-c", probe],
                        env=dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu"),
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr[-500:]


def test_slurm_user_xla_flags_win_or_replace_ours():
  xla, _, _ = slurm_dry_run(XLA_FLAGS="--xla_gpu_enable_latency_hiding_scheduler=false")
  assert xla.endswith(" --xla_gpu_enable_latency_hiding_scheduler=false")  # later flags win
  assert xla.count("latency_hiding") == 2
  xla, _, _ = slurm_dry_run(XLA_FLAGS="--xla_dump_to=/d", TFUSION_GPU_XLA_FLAGS="0")
  assert xla == "XLA_FLAGS=--xla_dump_to=/d"
