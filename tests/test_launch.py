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
  assert out.strip() == "srun --kill-on-bad-exit=1 tfusion-train --config c.py:0.76B --workdir /shared/r"
