"""The digits as the run reads them: standardised, in a resumable order.

The order of every epoch is a pure function of a data key kept in the train
state and of the epoch, so a resumed run sees the same batches.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from examples import data
from examples.resnet.config import Config


def load(config: Config) -> data.Split:
  """The digits split of ``config.seed``, standardised by the train set."""
  split = data.digits(config.seed, train_size=config.num_train)
  x_test = split.x_test[:config.num_test]
  y_test = split.y_test[:config.num_test]
  mean, std = split.x_train.mean(), split.x_train.std()
  return data.Split((split.x_train - mean) / std, split.y_train,
                    (x_test - mean) / std, y_test)


def steps_per_epoch(config: Config, split: data.Split) -> int:
  steps = len(split.x_train) // config.batch_size
  if steps < 1:
    raise ValueError(f"batch_size {config.batch_size} is larger than the "
                     f"{len(split.x_train)} training images.")
  return steps


def epoch_order(config: Config, split: data.Split, data_key: jax.Array,
                step: int) -> np.ndarray:
  """The permutation of the training images in the epoch of ``step``."""
  key = jax.random.wrap_key_data(data_key, impl=config.prng_impl)
  key = jax.random.fold_in(key, step // steps_per_epoch(config, split))
  return np.asarray(jax.random.permutation(key, len(split.x_train)))


def batch_indices(config: Config, split: data.Split, data_key: jax.Array,
                  step: int) -> np.ndarray:
  """The training images of ``step``."""
  start = (step % steps_per_epoch(config, split)) * config.batch_size
  order = epoch_order(config, split, data_key, step)
  return order[start:start + config.batch_size]


def refresh_inputs(config: Config, split: data.Split, data_key: jax.Array,
                   step: int) -> jax.Array:
  """The first ``sgs_batches`` batches of ``step``'s epoch, unaugmented."""
  count = min(config.sgs_batches, steps_per_epoch(config, split))
  order = epoch_order(config, split, data_key, step)
  return jnp.asarray(split.x_train[order[:count * config.batch_size]])


def translate(key: jax.Array, images: jax.Array, shift: int = 1) -> jax.Array:
  """Random crops of the zero-padded images: translations by <= ``shift``."""
  n, h, w, c = images.shape
  padded = jnp.pad(images, ((0, 0), (shift, shift), (shift, shift), (0, 0)))
  offsets = jax.random.randint(key, (n, 2), 0, 2 * shift + 1)
  crop = lambda image, offset: jax.lax.dynamic_slice(
      image, (offset[0], offset[1], 0), (h, w, c))
  return jax.vmap(crop)(padded, offsets)
