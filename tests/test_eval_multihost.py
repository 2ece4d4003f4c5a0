"""The eval job on 2 local processes (2 fake CPU devices each, prompts split between the
processes, rows over each one's devices) scores the same samples as 1 process on 1 device."""

import json
import os
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest

import train_utils
from tfusion import metrics, train
from tfusion.data import samples

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "eval_worker.py")


def _free_port():
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _start(workdir, out, nproc, pid, port, devices, mesh_data):
  os.makedirs(out, exist_ok=True)
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
  return subprocess.Popen([sys.executable, WORKER, workdir, out, str(nproc), str(pid), str(port),
                           str(mesh_data)], env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)


def _wait(procs):
  for i, proc in enumerate(procs):
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, f"process {i}:\n{err[-3000:]}"


@pytest.mark.slow
def test_two_processes_score_what_one_process_scores(tmp_path):
  root = tmp_path
  samples.sample_tokenizer(str(root), vocab_size=400)
  from tfusion import vae as vae_lib
  from tfusion.vae.model import VAEConfig
  vae = vae_lib.init_vae(VAEConfig(block_out_channels=(8, 8), layers_per_block=1,
                                   latent_channels=4, norm_num_groups=4))
  vae_lib.save_vae(vae, str(root / "vae"))
  (root / "prompts.txt").write_text("a red square\ntwo small circles\nthe number seven\n"
                                    "a blue dog\nthree green trees\n")
  config = train_utils.tiny_config(**{"train.steps": 2, "checkpoint.every_steps": 2,
                                      "model.vocab_size": 512,
                                      "data.tokenizer": str(root / "tokenizer.model"),
                                      "vae.path": str(root / "vae"), "model.max_len": 48})
  e = config.eval
  # 5 prompts in batches of 3: process 0 draws rows 0-2, process 1 rows 3-4 (padded to 4
  # rows on its 2 devices).
  e.prompts, e.num_samples, e.steps, e.batch_size = str(root / "prompts.txt"), 5, 3, 3
  run = str(root / "run")
  train.train_and_evaluate(config, run)
  one, two = str(root / "one"), str(root / "two")
  shutil.copytree(run, one)
  shutil.copytree(run, two)

  _wait([_start(one, str(root / "out1"), 1, 0, 0, devices=1, mesh_data=1)])
  port = _free_port()
  _wait([_start(two, str(root / "out2"), 2, i, port, devices=2, mesh_data=-1) for i in range(2)])

  a, b = np.load(root / "out1" / "stats.npz"), np.load(root / "out2" / "stats.npz")
  assert a["latents"].shape == b["latents"].shape == (5, 4, 4, 4)
  scale = np.abs(a["latents"]).max()
  np.testing.assert_allclose(b["latents"], a["latents"], atol=1e-5 * scale, rtol=0)
  assert np.abs(b["images"].astype(int) - a["images"].astype(int)).max() <= 1
  np.testing.assert_allclose(b["mu"], a["mu"], atol=1e-3)
  np.testing.assert_allclose(b["sigma"], a["sigma"], atol=1e-3)
  # Each chunk drawn once, by the process that owns its batch.
  puts = [json.loads((root / "out2" / f"puts{i}.json").read_text()) for i in range(2)]
  assert [p["puts"] for p in puts] == [[0], [3]] and puts[0]["devices"] == 2
  # Results written once (process 0), with the split recorded.
  lines = metrics.read_jsonl(os.path.join(two, "metrics", "eval.jsonl"))
  assert [r["suite"] for r in lines] == ["genstats"]
  assert lines[0]["settings"]["processes"] == 2
  assert lines[0]["settings"]["devices_per_process"] == 2
  one_line = metrics.read_jsonl(os.path.join(one, "metrics", "eval.jsonl"))[0]
  assert one_line["settings"]["processes"] == 1
