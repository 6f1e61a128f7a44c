"""The run's settings: the recipe of Detkov et al. (2023) on the digits."""

from __future__ import annotations

import dataclasses

SGS_MODES = ("learned", "acb", "repvgg", "none")

# Fields that may differ between an interrupted run and its resumption.
RUN_CONTROL_FIELDS = ("checkpoint_dir", "checkpoint_every", "resume",
                      "stop_after", "num_test")


@dataclasses.dataclass(frozen=True)
class Config:
  """Everything that defines a run.

  Attributes:
    epochs: number of passes over the training set.
    batch_size: images per step (the last partial batch of an epoch is
      dropped).
    learning_rate: peak learning rate, cosine-decayed to 0 over the run.
    momentum: heavy-ball momentum of SGD.
    weight_decay: coupled L2 weight decay (added to the scaled gradient).
    sgs: ``"learned"`` (matrices refreshed from data), ``"acb"`` or
      ``"repvgg"`` (constant presets), or ``"none"`` (plain SGD).
    sgs_epochs: refresh period in epochs of the learned mode; ``None`` is the
      paper's ``max(1, round(epochs / 20))``.
    sgs_batches: training batches whose conv inputs feed a refresh.
    width: channels of the first stage (doubled at each later stage).
    blocks: basic blocks per stage.
    num_train: use only the first ``num_train`` training images.
    num_test: use only the first ``num_test`` test images.
    augment: random 1-pixel translations of the training images.
    seed: seeds the split, the init, the augmentation and the data order.
    prng_impl: JAX PRNG implementation of every key. ``"rbg"`` (the default
      here) compiles faster on CPU than JAX's default ``"threefry2x32"``,
      whose bits are also identical across backends.
    checkpoint_dir: where to save checkpoints (none if ``None``).
    checkpoint_every: save every this many steps (0: once per epoch); the last
      step is always saved.
    resume: continue from the latest checkpoint in ``checkpoint_dir``, if any.
    stop_after: stop (with a checkpoint) once this many steps are done, to
      simulate an interruption.
  """

  epochs: int = 20
  batch_size: int = 64
  learning_rate: float = 0.1
  momentum: float = 0.9
  weight_decay: float = 5e-4
  sgs: str = "learned"
  sgs_epochs: int | None = None
  sgs_batches: int = 2
  width: int = 16
  blocks: tuple[int, ...] = (1, 1, 1)
  num_train: int | None = None
  num_test: int | None = None
  augment: bool = True
  seed: int = 0
  prng_impl: str = "rbg"
  checkpoint_dir: str | None = None
  checkpoint_every: int = 0
  resume: bool = False
  stop_after: int | None = None

  def __post_init__(self):
    if self.sgs not in SGS_MODES:
      raise ValueError(f"sgs must be one of {SGS_MODES}, got {self.sgs!r}.")


def get_config() -> Config:
  """The default run: the paper's recipe for 20 epochs."""
  return Config()


def get_tiny_config() -> Config:
  """A run of a few seconds that still learns (for tests)."""
  return dataclasses.replace(get_config(), epochs=3, batch_size=32, width=8,
                             num_train=512)


def recipe(config: Config) -> Config:
  """``config`` without the fields that only control this process's run."""
  return dataclasses.replace(
      config, **{f: getattr(Config, f) for f in RUN_CONTROL_FIELDS})


def refresh_period_epochs(config: Config) -> int:
  if config.sgs_epochs is not None:
    return config.sgs_epochs
  return max(1, round(config.epochs / 20))
