"""The launchers print the command they would run on every host."""

import os
import subprocess

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


def test_slurm_dry_run():
  out = subprocess.run(["bash", os.path.join(LAUNCH, "slurm.sbatch"), "--config", "c.py:0.76B",
                        "--workdir", "/shared/r"], capture_output=True, text=True, check=True,
                       env=dict(os.environ, DRY_RUN="1")).stdout
  srun, requeue = out.strip().splitlines()
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
