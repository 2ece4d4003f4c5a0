"""Two local processes x 4 fake CPU devices train like one process x 8 devices."""

import socket

import numpy as np

import train_utils

STEPS = ["--config.train.steps=4", "--config.checkpoint.every_steps=2"]


def _free_port():
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def test_two_processes_log_the_same_losses_as_one(tmp_path):
  single = str(tmp_path / "single")
  train_utils.run_train(single, *STEPS, devices=8)

  multi = str(tmp_path / "multi")
  port = _free_port()
  procs = [train_utils.start_train(multi, *STEPS, f"--coordinator_address=localhost:{port}",
                                   "--num_processes=2", f"--process_id={i}", devices=4)
           for i in range(2)]
  for i, proc in enumerate(procs):
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, f"process {i}:\n{err[-3000:]}"

  a, b = train_utils.losses_by_step(single), train_utils.losses_by_step(multi)
  assert sorted(a) == sorted(b) == [1, 2, 3, 4]
  for step in a:
    np.testing.assert_allclose(b[step], a[step], rtol=1e-5, err_msg=f"step {step}")
  step_a, params_a = train_utils.final_params(single)
  step_b, params_b = train_utils.final_params(multi)
  assert step_a == step_b == 4
  for x, y in zip(params_a, params_b):
    np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6)
