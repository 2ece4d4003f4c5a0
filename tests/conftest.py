"""Test setup: JAX on CPU with 8 fake devices (sharding tests), before anything imports JAX."""

import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")
_flag = "--xla_force_host_platform_device_count=8"
if _flag not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _flag).strip()

sys.path.insert(0, os.path.dirname(__file__))  # tests/ helpers importable as plain modules
