"""The paper presets have the paper's sizes (PAPER.md), computed without allocating them."""

import pytest

from tfusion import configlib, param_count

NOMINAL = {"0.16B": 0.16e9, "0.37B": 0.37e9, "0.76B": 0.76e9, "1.4B": 1.4e9, "7B": 7e9}


@pytest.mark.parametrize("size", list(NOMINAL))
def test_paper_presets_within_ten_percent_and_unet_adds_about_027b(size):
  linear = configlib.model_config(size)
  total = param_count.count(linear)["total"]
  assert abs(total - NOMINAL[size]) / NOMINAL[size] < 0.10, f"{size}: {total / 1e9:.3f}B"
  unet = configlib.model_config(size)
  unet.image.encoder = "unet"
  extra = param_count.count(unet)["total"] - total
  # The paper: +0.27B at every size. Ours grows slightly with d_model (the U-Net's projections
  # to and from the transformer width), from 0.28B at 0.16B to 0.34B at 7B.
  assert 0.25e9 < extra < 0.35e9, f"{size}: U-Net adds {extra / 1e9:.3f}B"


def test_command_prints_every_preset(capsys):
  param_count.main([])
  out = capsys.readouterr().out
  for size in NOMINAL:
    assert f"{size} linear" in out and f"{size} unet" in out
