"""Pods: how a process finds the others (flags, SLURM, GKE, Cloud TPU VMs), and two local
processes x 4 fake CPU devices that resume the Grain pipeline exactly (each process its own
data position), refuse another process count in one line, and stop together when only one of
them is preempted."""

import json
import os
import shutil
import signal
import socket

import numpy as np
import pytest

import train_utils

from tfusion import train

slow = pytest.mark.slow  # multi-process trainings (about a minute each on 2 cores)


SLURM = {"SLURM_JOB_ID": "7", "SLURM_NTASKS": "4", "SLURM_STEP_NODELIST": "n[1-4]",
         "SLURM_PROCID": "2", "SLURM_LOCALID": "0"}


@pytest.mark.parametrize("env,chips,why", [
    ({}, 0, None),  # a laptop / one GPU box: one process
    ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "1"}, 0, None),  # a one-task SLURM job
    (SLURM, 0, "SLURM"),
    ({"TPU_WORKER_HOSTNAMES": "t-0,t-1", "TPU_WORKER_ID": "1"}, 4, "TPU pod"),  # GKE
    ({"TPU_WORKER_HOSTNAMES": "t-0,t-1"}, 0, "TPU pod"),
    ({"MEGASCALE_COORDINATOR_ADDRESS": "t-0:8080", "MEGASCALE_NUM_SLICES": "2"}, 4, "TPU pod"),
    ({}, 4, "Cloud TPU VM"),  # a bare TPU VM of a pod: jax asks the metadata server
    ({"TPU_WORKER_HOSTNAMES": "localhost"}, 4, "Cloud TPU VM"),
    ({"TPU_SKIP_MDS_QUERY": "1"}, 4, None),
    ({"JAX_COORDINATOR_ADDRESS": "h0:1234"}, 0, "JAX_COORDINATOR_ADDRESS"),
])
def test_distributed_setup_from_the_environment(env, chips, why):
  got = train.distributed_setup(env, tpu_chips=chips)
  if why is None:
    assert got is None
  else:
    assert got is not None and got[0].startswith(why) and got[1] == {}, got


def test_distributed_setup_from_flags_and_what_to_set():
  assert train.distributed_setup(SLURM, coordinator_address="h0:1", num_processes=2,
                                 process_id=1) == (
      "flags", dict(coordinator_address="h0:1", num_processes=2, process_id=1))
  assert train.distributed_setup(SLURM, num_processes=1, tpu_chips=4) is None
  assert train.distributed_setup({"JAX_COORDINATOR_ADDRESS": "h0:1"}, num_processes=2,
                                 process_id=0) == (
      "JAX_COORDINATOR_ADDRESS", dict(num_processes=2, process_id=0))
  for flags in (dict(coordinator_address="h0:1"), dict(num_processes=2, process_id=0)):
    with pytest.raises(train.DistributedSetupError, match="pass --coordinator_address=HOST0:PORT"):
      train.distributed_setup({}, **flags)
  sbatch_only = {k: v for k, v in SLURM.items() if k != "SLURM_PROCID"}  # no srun
  with pytest.raises(train.DistributedSetupError, match="SLURM_PROCID unset.*srun") as e:
    train.distributed_setup(sbatch_only)
  assert "\n" not in str(e.value)


def test_a_pod_without_a_reachable_coordinator_is_one_line(monkeypatch):
  import types
  monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "t-0,t-1")  # a TPU pod's variable, on a CPU box
  flags = types.SimpleNamespace(coordinator_address=None, num_processes=None, process_id=None)
  with pytest.raises(train.DistributedSetupError) as e:
    train.initialize_distributed(flags)
  assert "multi-process start (TPU pod" in str(e.value) and "\n" not in str(e.value)
  assert "pass --coordinator_address=HOST0:PORT" in str(e.value)


def _write_states(directory, states):
  directory.mkdir()
  for i, state in enumerate(states):
    (directory / f"process_{i}-of-{len(states)}.json").write_text(json.dumps(state))
  return str(directory)


def test_data_states_per_process_and_onto_another_process_count(tmp_path):
  from tfusion import checkpoint
  read = checkpoint.read_data_state
  two = _write_states(tmp_path / "two", [{"next": [3]}, {"next": [5]}])
  assert read(two, where="c/4", process_index=1, process_count=2) == {"next": [5]}
  with pytest.raises(checkpoint.DataStateMismatchError) as e:  # shards' positions: refused
    read(two, where="c/4", process_index=0, process_count=1)
  assert "positions of 2 processes" in str(e.value) and "this run has 1" in str(e.value)
  assert "\n" not in str(e.value)
  same = _write_states(tmp_path / "same", [{"step": 4}, {"step": 4}])  # synthetic data
  assert read(same, where="c/4", process_index=2, process_count=4) == {"step": 4}
  os.remove(os.path.join(two, "process_1-of-2.json"))  # a file of this run's count: damage
  with pytest.raises(FileNotFoundError, match=r"processes \[1\] of 2 are missing"):
    read(two, where="c/4", process_index=1, process_count=2)


def test_checkpoints_with_one_data_item_of_earlier_versions_still_restore(tmp_path):
  import jax
  import jax.numpy as jnp
  import orbax.checkpoint as ocp
  from tfusion import checkpoint
  state = {"params": {"w": jnp.arange(3.0)}, "step": jnp.int32(2)}
  ckpt = checkpoint.Checkpointer(str(tmp_path), async_save=False)
  ckpt.manager.save(2, args=ocp.args.Composite(  # what earlier versions wrote
      state=ocp.args.PyTreeSave(state), data=ocp.args.JsonSave({"step": 2}),
      config=ocp.args.JsonSave({})))
  ckpt.close()
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
  reader = checkpoint.Checkpointer(str(tmp_path), read_only=True)
  restored = reader.restore(2, abstract, data=True)
  assert restored["data"] == {"step": 2} and int(restored["state"]["step"]) == 2
  reader.check_data_states(2)  # no per-process states: nothing to refuse


def _free_port():
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _start_two(workdir, *flags):
  port = _free_port()
  return [train_utils.start_train(workdir, *flags, f"--coordinator_address=localhost:{port}",
                                  "--num_processes=2", f"--process_id={i}", devices=4)
          for i in range(2)]


def _finish(procs, codes=(0, 0), timeout=600):
  """Waits for both processes; -> their stderr. A hung pod is killed (not left behind)."""
  errs = []
  try:
    for i, proc in enumerate(procs):
      _, err = proc.communicate(timeout=timeout)
      errs.append(err)
      assert proc.returncode == codes[i], f"process {i} ({proc.returncode}):\n{err[-3000:]}"
  finally:
    for proc in procs:
      if proc.poll() is None:
        proc.kill()
        proc.communicate()
  return errs


def _grain_flags(root):
  return [f"--config.{k}={v}" for k, v in train_utils.grain_data(root).items()]


@pytest.fixture(scope="module")
def grain_pod(tmp_path_factory):
  """A straight 2-process run on the Grain pipeline, 8 steps, checkpoints 4 and 8."""
  root = tmp_path_factory.mktemp("grain_pod")
  (root / "data").mkdir()
  flags = _grain_flags(root / "data") + ["--config.train.steps=8",
                                         "--config.checkpoint.every_steps=4"]
  straight = str(root / "straight")
  _finish(_start_two(straight, *flags))
  return straight, flags


def _resume_from_4(straight, resumed, flags):
  """Resumes a copy of `straight` on two processes; asserts steps 5..8 are the straight run's."""
  errs = _finish(_start_two(resumed, *flags), timeout=240)
  assert "resumed from" in errs[0] and "checkpoints/4" in errs[0], errs[0][-2000:]
  a, b = train_utils.losses_by_step(straight), train_utils.losses_by_step(resumed)
  assert sorted(a) == sorted(b) == list(range(1, 9))
  for step in range(5, 9):
    assert a[step] == b[step], f"step {step}"
  for x, y in zip(train_utils.final_params(straight)[1], train_utils.final_params(resumed)[1]):
    np.testing.assert_array_equal(x, y)
  return errs


@slow
def test_grain_resume_on_two_processes_is_exact(grain_pod, tmp_path):
  straight, flags = grain_pod
  states = os.path.join(straight, "checkpoints", "4", "data_states")
  assert sorted(n for n in os.listdir(states) if n.endswith(".json")) == [
      "process_0-of-2.json", "process_1-of-2.json"]
  with open(os.path.join(states, "process_0-of-2.json"), encoding="utf-8") as f0, \
      open(os.path.join(states, "process_1-of-2.json"), encoding="utf-8") as f1:
    s0, s1 = json.load(f0), json.load(f1)
  assert s0["fingerprint"]["process"] == [0, 2] and s1["fingerprint"]["process"] == [1, 2]

  # The same run stopped after its checkpoint 4: resumed, steps 5..8 are the straight run's.
  resumed = str(tmp_path / "resumed")
  shutil.copytree(straight, resumed)
  shutil.rmtree(os.path.join(resumed, "checkpoints", "8"))
  _resume_from_4(straight, resumed, flags)

  # One process cannot take over two processes' record shards: one line, nothing written.
  before = train_utils.tree_digest(resumed)
  proc = train_utils.run_train(resumed, *flags[:-2], "--config.train.steps=12", devices=8,
                               check=False)
  assert proc.returncode == 2, proc.stderr[-3000:]
  line = [l for l in proc.stderr.splitlines() if l.startswith("tfusion-train: error:")]
  assert len(line) == 1 and "data iterator positions of 2 processes" in line[0] \
      and "this run has 1" in line[0] and "resume with 2 processes" in line[0], proc.stderr[-2000:]
  assert train_utils.tree_digest(resumed) == before


@slow
def test_damage_seen_by_one_process_sends_both_back_to_the_same_step(grain_pod, tmp_path):
  straight, flags = grain_pod
  resumed = str(tmp_path / "damaged")
  shutil.copytree(straight, resumed)
  ckpts = os.path.join(resumed, "checkpoints")
  os.remove(os.path.join(ckpts, "8", "data_states", "process_1-of-2.json"))  # only 1 reads it
  errs = _resume_from_4(straight, resumed, flags)
  assert "checkpoints/8 cannot be restored" in errs[1], errs[1][-2000:]
  assert len([n for n in os.listdir(ckpts) if n.startswith("corrupt-8-")]) == 1


@slow
def test_sigterm_to_one_process_stops_both_at_the_same_step(tmp_path):
  workdir = str(tmp_path / "pod")
  flags = ["--config.checkpoint.every_steps=100000", "--config.train.preempted_exit_code=75"]
  procs = _start_two(workdir, "--config.train.steps=100000", *flags)
  train_utils.wait_for(lambda: len(train_utils.losses_by_step(workdir)) >= 3, what="step 3",
                       proc=procs[0])
  os.kill(procs[1].pid, signal.SIGTERM)  # process 1 only
  errs = _finish(procs, codes=(75, 75), timeout=120)
  stops = [[l.split("every host saves step ")[1].split()[0] for l in err.splitlines()
            if "every host saves step" in l] for err in errs]
  assert stops[0] and stops[0] == stops[1], errs[0][-2000:]
  stop = int(stops[0][0])
  steps = sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit())
  assert steps == [stop] and stop >= 3

  # Resume is exact: one process x 8 devices (synthetic data: one state for any process
  # count; two processes train like one, tests/test_multihost.py) goes on like a straight run.
  straight = str(tmp_path / "straight")
  train_utils.run_train(straight, f"--config.train.steps={stop + 2}", devices=8)
  train_utils.run_train(workdir, f"--config.train.steps={stop + 2}", *flags, devices=8)
  a, b = train_utils.losses_by_step(straight), train_utils.losses_by_step(workdir)
  for step in (stop + 1, stop + 2):
    np.testing.assert_allclose(b[step], a[step], rtol=1e-5, err_msg=f"step {step}")
