"""Config flags: a mistyped key is one line naming it and the closest valid key (exit 2, nothing
written); --show_config / tfusion-config print every resolved key; relative paths are stored
absolute in W/config.json."""

import json
import os
import subprocess
import sys

import pytest

import train_utils
from tfusion import config_cli, configlib


def _run(args, cwd=None):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-m", *args], env=env, capture_output=True, text=True,
                        timeout=300, cwd=cwd)


def test_train_typo_is_one_line_with_the_closest_key(tmp_path):
  work = tmp_path / "w"
  proc = _run(["tfusion.train", f"--config={train_utils.TINY}", f"--workdir={work}",
               "--config.train.stpes=3"])
  assert proc.returncode == 2
  assert proc.stderr.strip() == ("tfusion-train: error: --config.train.stpes=3: the config has no "
                                 "key 'train.stpes' (did you mean 'train.steps'?)")
  assert not work.exists()


def test_show_config_prints_every_key_with_overrides():
  proc = _run(["tfusion.train", f"--config={train_utils.TINY}", "--show_config",
               "--config.train.steps=7"])  # no --workdir needed to look
  assert proc.returncode == 0, proc.stderr
  shown = dict(line.split(" = ", 1) for line in proc.stdout.splitlines())
  want = configlib.load_config_file(train_utils.TINY)
  assert set(shown) == {k for k, _ in config_cli.flat_items(want)}
  assert shown["train.steps"] == "7" and shown["model.image.patch_size"] == repr(
      want.model.image.patch_size)

  proc = _run(["tfusion.config_cli", "--show", f"{train_utils.REPO}/experiments/configs/"
               "paper.py:0.37B", "--config.optim.lr=0.001"])
  assert proc.returncode == 0, proc.stderr
  lines = proc.stdout.splitlines()
  assert "optim.lr = 0.001" in lines and "model.d_model = 1024" in lines


def test_tfusion_config_shows_a_runs_stored_config(tmp_path):
  config = configlib.load_config_file(train_utils.TINY)
  config.train.steps = 11
  (tmp_path / "config.json").write_text(config.to_json_best_effort())
  proc = _run(["tfusion.config_cli", f"--workdir={tmp_path}", "--config.seed=3"])
  assert proc.returncode == 0, proc.stderr
  assert "train.steps = 11" in proc.stdout.splitlines()
  assert "seed = 3" in proc.stdout.splitlines()
  proc = _run(["tfusion.config_cli", f"--workdir={tmp_path}", "--config.sed=3"])
  assert proc.returncode == 2 and "did you mean 'seed'?" in proc.stderr
  assert len(proc.stderr.strip().splitlines()) == 1


def _parse(argv, config=None):
  """flags_parser on a fresh FlagValues; returns (exit code, stderr line) or the config."""
  from absl import flags
  from ml_collections import config_flags
  fv = flags.FlagValues()
  if config is None:
    config_flags.DEFINE_config_file("config", None, "c", flag_values=fv, sys_argv=argv)
  else:
    config_flags.DEFINE_config_dict("config", config, "c", flag_values=fv, sys_argv=argv)
  config_cli.flags_parser("prog", flag_values=fv)(argv)
  return fv.config


@pytest.mark.parametrize("argv, message", [
    (["--config=/nope/c.py"], "prog: error: --config /nope/c.py: config file '/nope/c.py' "
                              "does not exist"),
    ([f"--config={train_utils.TINY}", "--config.train.steps=abc"],
     "prog: error: flag --config.train.steps=abc: invalid literal for int() with base 10: 'abc'"),
    ([f"--config={train_utils.TINY}", "--config.model.zzz=1"],
     "prog: error: --config.model.zzz=1: the config has no key 'model.zzz' (valid keys here: "
     "a"),  # the start of the sorted model keys (a list others extend)
    ([f"--config={train_utils.TINY}", "--config.trian.steps=1"],
     "prog: error: --config.trian.steps=1: the config has no key 'trian.steps' (did you mean "
     "'train.steps'?)"),
    ([f"--config={train_utils.REPO}/experiments/configs/paper.py:0.3B"],
     "prog: error: --config {}/experiments/configs/paper.py:0.3B: unknown model size '0.3B'; "
     "choose from ['0.16B', '0.37B', '0.76B', '1.4B', '7B']".format(train_utils.REPO)),
])
def test_config_mistakes_are_one_line(argv, message, capsys):
  with pytest.raises(SystemExit) as e:
    _parse(["prog", *argv])
  assert e.value.code == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith(message), err


def test_good_overrides_apply(capsys):
  config = _parse(["prog", f"--config={train_utils.TINY}", "--config.train.steps=5",
                   "--config.model.image.patch_size=4"])
  assert config.train.steps == 5 and config.model.image.patch_size == 4
  stored = configlib.base_config()
  assert _parse(["prog", "--config.eval.num_samples=9"], config=stored).eval.num_samples == 9


def test_relative_paths_are_made_absolute(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  c = configlib.base_config()
  c.data.tokenizer = "tok.model"
  c.data.text = "a/*.array_record, b"
  c.vae.path = "~/vae"
  c.eval.ppl_files = "gs://bucket/x.txt,/abs/y.txt"
  c.eval.prompts = ""
  configlib.absolute_paths(c)
  assert c.data.tokenizer == str(tmp_path / "tok.model")
  assert c.data.text == f"{tmp_path}/a/*.array_record,{tmp_path}/b"
  assert c.vae.path == os.path.expanduser("~/vae")
  assert c.eval.ppl_files == "gs://bucket/x.txt,/abs/y.txt" and c.eval.prompts == ""
  for key in configlib.PATH_KEYS:  # every listed key exists (a renamed key is caught here)
    config_cli.check_key(c, key)


def test_train_stores_absolute_paths(tmp_path):
  cmd, env = train_utils.train_command(str(tmp_path / "w"), "--config.train.steps=0",
                                       "--config.data.tokenizer=tok.model",
                                       "--config.eval.ppl_files=held/a.txt,b.txt")
  proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  stored = json.loads((tmp_path / "w" / "config.json").read_text())
  assert stored["data"]["tokenizer"] == str(tmp_path / "tok.model")
  assert stored["eval"]["ppl_files"] == f"{tmp_path}/held/a.txt,{tmp_path}/b.txt"
