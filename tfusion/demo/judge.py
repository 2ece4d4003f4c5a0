"""A digit classifier trained on real digits: judges generated digits and gives features for a
digit-FID (the demo's stand-in for GenEval's object check and Inception's FID).

Generated images are decoded to 32x32 RGB, turned gray and average-pooled to 8x8: the same
path the real (upscaled) digits take, so real and generated digits are judged alike.
"""

import dataclasses

import numpy as np


def to_features_input(images_uint8):
  """uint8 [N, 32, 32, 3] -> float [N, 64] pixels on the 8x8 grid, in [0, 1]."""
  gray = np.asarray(images_uint8, np.float32).mean(-1) / 255.0
  n, h, w = gray.shape
  pooled = gray.reshape(n, 8, h // 8, 8, w // 8).mean((2, 4))
  return pooled.reshape(n, 64)


@dataclasses.dataclass
class DigitJudge:
  """An MLP (64 -> 128 ReLU -> 10) over pooled pixels (scaled to [0, 1])."""
  model: object
  network: str = "digit-judge-mlp128"

  @classmethod
  def train(cls, images_uint8, labels, seed=0):
    from sklearn.neural_network import MLPClassifier
    model = MLPClassifier(hidden_layer_sizes=(128,), alpha=1e-3, max_iter=1000,
                          random_state=seed)
    model.fit(to_features_input(images_uint8), labels)
    return cls(model)

  def predict(self, images_uint8):
    return self.model.predict(to_features_input(images_uint8))

  def accuracy(self, images_uint8, labels):
    return float(np.mean(self.predict(images_uint8) == np.asarray(labels)))

  def features(self, images_uint8):
    """Hidden-layer activations [N, 128]: the digit-FID feature space."""
    x = to_features_input(images_uint8)
    w, b = self.model.coefs_[0], self.model.intercepts_[0]
    return np.maximum(x @ w + b, 0.0)

  def __call__(self, images):
    """fid.statistics_of_images calls extractors with [0, 1] floats or uint8."""
    images = np.asarray(images)
    if images.dtype != np.uint8:
      images = np.clip(np.round(images * 255), 0, 255).astype(np.uint8)
    return self.features(images)
