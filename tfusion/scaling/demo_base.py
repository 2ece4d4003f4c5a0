"""The demo's config built for a representation, as a config file taking it as its arg:

  tfusion-train --config tfusion/scaling/demo_base.py:discrete ...

tfusion/demo/config.py's get_config takes `quick` first, so `--config tfusion/demo/config.py:
discrete` would not build the discrete demo; tfusion-sweep --print-launch writes this file for
a demo family with its own representation (tfusion/scaling/spec.py, a family's own base).
"""

from tfusion.demo import config as demo_config


def get_config(representation="continuous"):
  return demo_config.get_config(representation=representation)
