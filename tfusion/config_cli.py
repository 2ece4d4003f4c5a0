"""Config flags for every command that takes `--config`: typos, --show_config, tfusion-config.

`tfusion-train`, `tfusion-eval` and `tfusion-demo` read their config with ml_collections'
config flags (`--config path.py[:arg]`, `--config.key=value`). Left alone, ml_collections
answers a mistyped key or a missing config file with a page of traceback. `flags_parser`
(absl's `app.run(..., flags_parser=...)` hook) loads the config first and checks every
override key against it, so a mistake ends in one line and exit code 2:

  tfusion-train: error: --config.train.stpes=3: the config has no key 'train.stpes' (did you mean 'train.steps'?)

`--show_config` (`define_show_flag`) prints the resolved config, every key with overrides
applied, and exits. `tfusion-config --show C [--config.key=value ...]` does the same without
a job to run, and `tfusion-config --workdir W [...]` shows a run's stored config.
"""

import difflib
import json
import os
import sys

CONFIG_JSON = "config.json"


class ConfigError(ValueError):
  """A config flag that cannot be honored (the message is one line)."""


# -- argv ------------------------------------------------------------------------------------


def argv_value(argv, name):
  """The value of `--name=v` / `--name v` (also one dash) in argv, or None."""
  args = list(argv[1:])
  for i, arg in enumerate(args):
    for prefix in (f"--{name}", f"-{name}"):
      if arg == prefix and i + 1 < len(args):
        return args[i + 1]
      if arg.startswith(prefix + "="):
        return arg[len(prefix) + 1:]
  return None


def override_args(argv, name="config"):
  """[(dotted key, the argument as typed)] for every `--name.key[=value]` in argv."""
  out = []
  for arg in argv[1:]:
    for prefix in (f"--{name}.", f"-{name}."):
      if arg.startswith(prefix):
        out.append((arg[len(prefix):].partition("=")[0], arg))
        break
  return out


# -- keys ------------------------------------------------------------------------------------


def _is_dict(node):
  import ml_collections
  return isinstance(node, (dict, ml_collections.ConfigDict))


def flat_items(config, prefix=""):
  """[(dotted key, value)] of every leaf, in sorted key order."""
  out = []
  for key, value in sorted(config.items()):
    if _is_dict(value):
      out.extend(flat_items(value, f"{prefix}{key}."))
    else:
      out.append((f"{prefix}{key}", value))
  return out


def check_key(config, key):
  """Raises ConfigError unless `key` (dotted, as after `--config.`) names a key of config."""
  node = config
  for part in key.split("."):
    part = part.split("[")[0]  # `a.b[0]` indexes a leaf: ml_collections checks the rest
    if not _is_dict(node):
      return
    if part not in node:
      leaves = [k for k, _ in flat_items(config)]
      close = difflib.get_close_matches(key, leaves, n=1, cutoff=0.7)
      hint = f"did you mean {close[0]!r}?" if close else (
          "valid keys here: " + ", ".join(sorted(node.keys())[:12])
          + (", ..." if len(node.keys()) > 12 else ""))
      raise ConfigError(f"the config has no key {key!r} ({hint})")
    node = node[part]


def check_overrides(config, argv, name="config"):
  """Every `--name.key=...` in argv names a key of `config`, else ConfigError (one line)."""
  for key, arg in override_args(argv, name):
    try:
      check_key(config, key)
    except ConfigError as e:
      raise ConfigError(f"{arg}: {e}") from None


def format_config(config):
  """Every key of the resolved config, one `key = value` line each (sorted)."""
  return "\n".join(f"{key} = {value!r}" for key, value in flat_items(config))


# -- loading ---------------------------------------------------------------------------------


def load_spec(spec, flag="--config"):
  """`path.py[:arg]` -> ConfigDict, or ConfigError naming the flag and file."""
  from tfusion import configlib
  try:
    return configlib.load_config_file(spec)
  except (FileNotFoundError, ValueError, KeyError, TypeError, AttributeError,
          SyntaxError, ImportError) as e:
    raise ConfigError(f"{flag} {spec}: {_first_line(e)}") from None


def load_run_config(workdir):
  """A run's resolved config: W/config.json, else the newest checkpoint's; None if neither."""
  import ml_collections
  from tfusion import paths
  path = paths.join(workdir, CONFIG_JSON)
  if paths.exists(path):
    try:
      return ml_collections.ConfigDict(json.loads(paths.read_text(path)))
    except (OSError, ValueError) as e:
      raise ConfigError(f"{path} is not a readable config ({_first_line(e)})") from None
  from tfusion import checkpoint as checkpoint_lib
  if not paths.isdir(checkpoint_lib.checkpoint_dir(workdir)):
    return None
  reader = checkpoint_lib.Checkpointer(workdir, read_only=True)
  for step in reversed(reader.all_steps()):
    try:
      return ml_collections.ConfigDict(reader.restore_config(step))
    except Exception:  # noqa: BLE001 - a damaged checkpoint: try the previous one
      continue
  return None


def _first_line(error):
  text = str(error).strip()
  if isinstance(error, KeyError) and text[:1] in "'\"" and text[-1:] == text[:1]:
    text = text[1:-1]  # str(KeyError) quotes its message
  return (text.splitlines() or [type(error).__name__])[0]


# -- absl hooks -----------------------------------------------------------------------------


def define_show_flag(flag_values=None):
  from absl import flags
  flags.DEFINE_bool("show_config", False, "print the resolved config (every key) and exit",
                    flag_values=flag_values or flags.FLAGS)


def define_config_dict(prog, config, help_string, argv=None, name="config", **kwargs):
  """DEFINE_config_dict whose override keys are checked first (one line, exit 2 on a typo):
  ml_collections resolves a config dict's overrides when the flag is defined, not parsed."""
  from ml_collections import config_flags
  argv = list(sys.argv if argv is None else argv)
  try:
    check_overrides(config, argv, name)
  except ConfigError as e:
    fail(prog, str(e))
  return config_flags.DEFINE_config_dict(name, config, help_string, sys_argv=argv, **kwargs)


def fail(prog, message):
  print(f"{prog}: error: {message}", file=sys.stderr)
  sys.exit(2)


def flags_parser(prog, name="config", flag_values=None):
  """An absl flags_parser: config mistakes end in one line naming them and exit code 2.

  The config to check overrides against is the file given as `--name` (loaded here, so a
  missing or broken file is reported before ml_collections defers it), else the flag's
  default (DEFINE_config_dict). With `--show_config` (when defined) prints the resolved config
  and exits 0, even when other required flags (--workdir) are absent.
  """
  from absl import flags

  def parse(argv):
    fv = flag_values or flags.FLAGS
    show = "show_config" in fv and any(a in ("--show_config", "-show_config") for a in argv)
    try:
      spec = argv_value(argv, name)
      base = load_spec(spec, f"--{name}") if spec else fv[name].value
      if base is not None:
        check_overrides(base, argv, name)
      elif override_args(argv, name):
        raise ConfigError(f"--{name}.* overrides need a config: give --{name}")
      try:
        rest = fv(argv)
      except flags.IllegalFlagValueError:
        if not (show and fv.is_parsed()):  # only required-flag checks fail after parsing
          raise
        rest = None
    except ConfigError as e:
      fail(prog, str(e))
    except flags.Error as e:
      fail(prog, _first_line(e))
    except (KeyError, AttributeError, TypeError, ValueError, OSError) as e:
      fail(prog, f"--{name}: {_first_line(e)}")
    if show:
      if fv[name].value is None:
        fail(prog, f"--show_config needs --{name}")
      print(format_config(fv[name].value))
      sys.exit(0)
    return rest

  return parse


# -- tfusion-config ----------------------------------------------------------------------------


def main(argv=None):
  """`tfusion-config --show C [--config.key=value ...]` or `tfusion-config --workdir W [...]`."""
  from absl import app, flags
  from ml_collections import config_flags
  argv = list(sys.argv if argv is None else argv)
  argv = [a.replace("--show", "--config", 1) if a == "--show" or a.startswith("--show=") else a
          for a in argv]
  workdir = argv_value(argv, "workdir")
  stored = None
  if workdir and argv_value(argv, "config") is None:
    try:
      stored = load_run_config(workdir)
    except ConfigError as e:
      fail("tfusion-config", str(e))
    if stored is None:
      fail("tfusion-config", f"{workdir} holds no {CONFIG_JSON} and no checkpoint")
  if stored is not None:
    define_config_dict("tfusion-config", stored, "the run's stored config", argv)
  else:
    config_flags.DEFINE_config_file("config", None, "config file[:arg] to show (or --show)",
                                    sys_argv=argv)
  flags.DEFINE_string("workdir", None, "show this run's stored config (W/config.json)")
  parser = flags_parser("tfusion-config")

  def run(_):
    config = flags.FLAGS.config
    if config is None:
      fail("tfusion-config", "give --show C (a config file[:arg]) or --workdir W")
    print(format_config(config))

  app.run(run, argv=argv, flags_parser=parser)


if __name__ == "__main__":
  main()
