"""Train a CIFAR-style ResNet (Flax linen) with SGD and learned SGS, resumably.

The recipe of Detkov et al. (2023) as flags: SGD with momentum 0.9, learning
rate 0.1 with cosine decay, coupled weight decay 5e-4, and the learned SGS
matrices refreshed from the mutual information of each conv's input, computed
on the first ``--sgs-batches`` (2) batches of the epoch, every
``--sgs-epochs`` epochs (default ``max(1, round(epochs / 20))``), starting at
epoch 0 on the initialised network::

  optax.chain(sgs_optax.sgs(), optax.add_decayed_weights(5e-4),
              optax.sgd(cosine(0.1), momentum=0.9))

It runs offline on scikit-learn's ``digits`` (8x8 grey images, 10 classes).
The whole train state (params, BatchNorm statistics, optimizer state with the
SGS matrices, step, PRNG key, data-order key and refresh counter) is saved with
orbax-checkpoint, so an interrupted run resumed with ``--resume`` ends
bit-identical to an uninterrupted one.

Run::

  python -m examples.train_linen                      # 40 epochs on digits
  python -m examples.train_linen --tiny               # seconds, for smoke tests
  python -m examples.train_linen --checkpoint-dir /tmp/ckpt [--resume]
  python -m examples.train_linen --sgs none           # the plain SGD baseline
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

import sgs_optax

SGS_MODES = ("learned", "acb", "repvgg", "none")


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
      here) compiles several times faster on CPU than JAX's default
      ``"threefry2x32"``, whose bits are also identical across backends.
    checkpoint_dir: where to save checkpoints (none if ``None``).
    checkpoint_every: save every this many steps (0: once per epoch); the last
      step is always saved.
    resume: continue from the latest checkpoint in ``checkpoint_dir``, if any.
    stop_after: stop (with a checkpoint) once this many steps are done, to
      simulate an interruption.
  """

  epochs: int = 40
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


# Fields that may differ between an interrupted run and its resumption.
_RUN_CONTROL_FIELDS = ("checkpoint_dir", "checkpoint_every", "resume",
                       "stop_after", "num_test")

TINY = dict(epochs=2, batch_size=32, width=4, num_train=128, num_test=64)


def refresh_period_epochs(config: Config) -> int:
  if config.sgs_epochs is not None:
    return config.sgs_epochs
  return max(1, round(config.epochs / 20))


# ----------------------------------------------------------------- the model


class BasicBlock(nn.Module):
  """Two 3x3 convs with BatchNorm and a (projected) identity shortcut."""

  features: int
  strides: int = 1

  @nn.compact
  def __call__(self, x, train: bool):
    norm = functools.partial(nn.BatchNorm, use_running_average=not train,
                             momentum=0.9)
    y = nn.Conv(self.features, (3, 3), self.strides, use_bias=False,
                name="conv1")(x)
    y = nn.relu(norm(name="bn1")(y))
    y = nn.Conv(self.features, (3, 3), use_bias=False, name="conv2")(y)
    y = norm(name="bn2")(y)
    if self.strides != 1 or x.shape[-1] != self.features:
      x = nn.Conv(self.features, (1, 1), self.strides, use_bias=False,
                  name="shortcut")(x)  # 1x1: never scaled by SGS.
      x = norm(name="shortcut_bn")(x)
    return nn.relu(x + y)


class ResNet(nn.Module):
  """A CIFAR-style ResNet: 3x3 stem, stages of basic blocks, global pool."""

  width: int = 16
  blocks: Sequence[int] = (1, 1, 1)
  num_classes: int = 10

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.Conv(self.width, (3, 3), use_bias=False, name="stem")(x)
    x = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9,
                             name="stem_bn")(x))
    for stage, count in enumerate(self.blocks):
      for index in range(count):
        x = BasicBlock(self.width * 2**stage,
                       strides=2 if stage > 0 and index == 0 else 1,
                       name=f"stage{stage + 1}_block{index + 1}")(x, train)
    return nn.Dense(self.num_classes, name="head")(x.mean(axis=(1, 2)))


# ------------------------------------------------------------------ the data


@dataclasses.dataclass(frozen=True)
class Data:
  x_train: np.ndarray
  y_train: np.ndarray
  x_test: np.ndarray
  y_test: np.ndarray


def load_data(config: Config) -> Data:
  """scikit-learn digits (shipped with the wheel), standardised, NHWC."""
  digits = load_digits()
  images = digits.images.astype(np.float32)[..., None] / 16.0
  x_train, x_test, y_train, y_test = train_test_split(
      images, digits.target.astype(np.int32), test_size=0.2,
      stratify=digits.target, random_state=config.seed)
  x_train, y_train = x_train[:config.num_train], y_train[:config.num_train]
  x_test, y_test = x_test[:config.num_test], y_test[:config.num_test]
  mean, std = x_train.mean(), x_train.std()
  return Data((x_train - mean) / std, y_train, (x_test - mean) / std, y_test)


def steps_per_epoch(config: Config, data: Data) -> int:
  steps = len(data.x_train) // config.batch_size
  if steps < 1:
    raise ValueError(f"batch_size {config.batch_size} is larger than the "
                     f"{len(data.x_train)} training images.")
  return steps


def epoch_order(config: Config, data_key: jax.Array, epoch: int,
                n: int) -> np.ndarray:
  """The permutation of the training set for one epoch.

  A pure function of the data key stored in the train state and the epoch,
  so the order of every batch is restored with the state.
  """
  key = jax.random.wrap_key_data(data_key, impl=config.prng_impl)
  key = jax.random.fold_in(key, epoch)
  return np.asarray(jax.random.permutation(key, n))


def batch_indices(config: Config, data: Data, data_key, step: int):
  spe = steps_per_epoch(config, data)
  order = epoch_order(config, data_key, step // spe, len(data.x_train))
  start = (step % spe) * config.batch_size
  return order[start:start + config.batch_size]


def translate(key: jax.Array, images: jax.Array, shift: int = 1) -> jax.Array:
  """Random crops of the zero-padded images: translations by <= ``shift``."""
  n, h, w, _ = images.shape
  padded = jnp.pad(images, ((0, 0), (shift, shift), (shift, shift), (0, 0)))
  offsets = jax.random.randint(key, (n, 2), 0, 2 * shift + 1)
  crop = lambda img, off: jax.lax.dynamic_slice(
      img, (off[0], off[1], 0), (h, w, img.shape[-1]))
  return jax.vmap(crop)(padded, offsets)


# ----------------------------------------------------------------- the state


class TrainState(flax.struct.PyTreeNode):
  """Everything a resumed run needs, as arrays (saved as one orbax tree).

  Attributes:
    step: number of train steps done, int32.
    params: the model's params.
    batch_stats: its BatchNorm running statistics.
    opt_state: the optax state, the SGS matrices and the momentum included.
    rng: key data (``jax.random.key_data``) of the augmentation key.
    data_key: key data of the data-order key (see :func:`epoch_order`).
    refresh_count: number of SGS refreshes done, int32.
  """

  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  rng: jax.Array
  data_key: jax.Array
  refresh_count: jax.Array


def make_model(config: Config) -> ResNet:
  return ResNet(width=config.width, blocks=tuple(config.blocks))


def make_optimizer(config: Config, total_steps: int):
  """The paper's chain: SGS first, then coupled weight decay, then SGD."""
  if config.sgs not in SGS_MODES:
    raise ValueError(f"sgs must be one of {SGS_MODES}, got {config.sgs!r}.")
  if config.sgs == "none":
    first = optax.identity()
  else:
    first = sgs_optax.sgs(None if config.sgs == "learned" else config.sgs)
  schedule = optax.cosine_decay_schedule(config.learning_rate, total_steps)
  return optax.chain(first, optax.add_decayed_weights(config.weight_decay),
                     optax.sgd(schedule, momentum=config.momentum))


# ------------------------------------------------------------- the functions


class Functions(NamedTuple):
  """The optimizer and the jitted pieces of a run (all stateless)."""

  tx: optax.GradientTransformation
  init: Callable[[jax.Array], TrainState]
  train_step: Callable[[TrainState, jax.Array, jax.Array],
                       tuple[TrainState, jax.Array]]
  refresh: Callable[[TrainState, jax.Array], TrainState]


def recipe(config: Config) -> Config:
  """``config`` without the fields that only control this process's run."""
  return dataclasses.replace(
      config, **{f: getattr(Config, f) for f in _RUN_CONTROL_FIELDS})


@functools.lru_cache(maxsize=4)
def make_functions(config: Config, total_steps: int) -> Functions:
  """Builds the optimizer and the jitted init, train step and refresh.

  They hold no state: caching them per recipe only saves recompiling when a
  process trains several times (e.g. a run and its resumption in a test).
  """
  model = make_model(config)
  tx = make_optimizer(config, total_steps)

  @jax.jit  # One compilation instead of hundreds of eager dispatches.
  def init(x):
    root = jax.random.key(config.seed, impl=config.prng_impl)
    init_key, rng, data_key = jax.random.split(root, 3)
    variables = model.init(init_key, x)
    params = variables["params"]
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        batch_stats=variables["batch_stats"],
        opt_state=tx.init(params),
        rng=jax.random.key_data(rng),
        data_key=jax.random.key_data(data_key),
        refresh_count=jnp.zeros((), jnp.int32),
    )

  @jax.jit
  def train_step(state: TrainState, x, y):
    rng, aug_key = jax.random.split(
        jax.random.wrap_key_data(state.rng, impl=config.prng_impl))
    if config.augment:
      x = translate(aug_key, x)

    def loss_fn(params):
      logits, new_vars = model.apply(
          {"params": params, "batch_stats": state.batch_stats}, x,
          train=True, mutable=["batch_stats"])
      loss = optax.softmax_cross_entropy_with_integer_labels(logits, y)
      return loss.mean(), new_vars["batch_stats"]

    (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    new_state = state.replace(
        step=state.step + 1,
        params=optax.apply_updates(state.params, updates),
        batch_stats=batch_stats,
        opt_state=opt_state,
        rng=jax.random.key_data(rng),
    )
    return new_state, loss

  @jax.jit
  def refresh(state: TrainState, x) -> TrainState:
    """Learned SGS: eval-mode conv inputs -> new matrices in the opt state."""
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    captured = sgs_optax.capture_conv_inputs(model, variables, x, train=False)
    return state.replace(
        opt_state=sgs_optax.refresh_scalings(state.opt_state, captured),
        refresh_count=state.refresh_count + 1)

  return Functions(tx, init, train_step, refresh)


def refreshes_due(config: Config, spe: int, step: int) -> int:
  """How many refreshes a run has done once it is about to run ``step``."""
  if config.sgs != "learned":
    return 0
  return step // (refresh_period_epochs(config) * spe) + 1


def refresh_inputs(config: Config, data: Data, data_key, step: int):
  """The first ``sgs_batches`` batches of the current epoch, unaugmented."""
  spe = steps_per_epoch(config, data)
  order = epoch_order(config, data_key, step // spe, len(data.x_train))
  count = min(config.sgs_batches, spe) * config.batch_size
  return jnp.asarray(data.x_train[order[:count]])


@functools.lru_cache(maxsize=4)
def _predict_fn(config: Config) -> Callable:
  model = make_model(config)
  return jax.jit(lambda variables, x: model.apply(variables, x, train=False))


def evaluate(config: Config, state: TrainState, data: Data) -> float:
  """Test accuracy, with BatchNorm in inference mode."""
  logits = _predict_fn(recipe(config))(
      {"params": state.params, "batch_stats": state.batch_stats},
      jnp.asarray(data.x_test))
  return float(jnp.mean(jnp.argmax(logits, -1) == data.y_test))


# ------------------------------------------------------------- checkpointing


def _config_record(config: Config) -> dict[str, Any]:
  record = dataclasses.asdict(config)
  for field in _RUN_CONTROL_FIELDS:
    record.pop(field)
  return json.loads(json.dumps(record))  # tuples -> lists, as JSON stores.


def checkpoint_manager(config: Config) -> ocp.CheckpointManager:
  return ocp.CheckpointManager(
      os.path.abspath(config.checkpoint_dir),
      options=ocp.CheckpointManagerOptions(max_to_keep=3, create=True),
  )


def save_checkpoint(manager: ocp.CheckpointManager, config: Config,
                    state: TrainState) -> None:
  manager.save(
      int(state.step),
      args=ocp.args.Composite(
          state=ocp.args.StandardSave(state),
          config=ocp.args.JsonSave(_config_record(config)),
      ),
      force=True,
  )


def restore_checkpoint(manager: ocp.CheckpointManager, config: Config,
                       target: TrainState,
                       step: int | None = None) -> TrainState:
  """Restores the state saved at ``step`` (default: the latest).

  ``target`` (a freshly initialised state) gives the tree structure, so the
  optimizer's NamedTuples, the ``None`` leaves of the SGS state and the
  dtypes come back exactly as they were.

  Raises:
    ValueError: if the checkpoint was written by a run with another recipe.
  """
  step = manager.latest_step() if step is None else step
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
  restored = manager.restore(
      step,
      args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract),
          config=ocp.args.JsonRestore(),
      ),
  )
  saved, wanted = restored.config, _config_record(config)
  different = sorted(k for k in set(saved) | set(wanted)
                     if saved.get(k) != wanted.get(k))
  if different:
    raise ValueError(
        f"checkpoint at step {step} in {config.checkpoint_dir} was written "
        f"with a different recipe: {[(k, saved.get(k)) for k in different]}.")
  return restored.state


# ------------------------------------------------------------------ training


def train(config: Config, *, log: Callable[[str], Any] | None = None,
          data: Data | None = None) -> TrainState:
  """Trains (or resumes training) and returns the final train state.

  Args:
    config: the run.
    log: called with one line per epoch (e.g. ``print``); silent if ``None``.
    data: the dataset (default: :func:`load_data`).

  Returns:
    The train state after ``epochs * steps_per_epoch`` steps, or after
    ``stop_after`` steps.
  """
  log = log or (lambda _: None)
  if config.checkpoint_dir is None and (config.resume or
                                        config.stop_after is not None):
    raise ValueError("resume and stop_after need a checkpoint_dir.")
  data = load_data(config) if data is None else data
  spe = steps_per_epoch(config, data)
  total_steps = config.epochs * spe
  last_step = total_steps if config.stop_after is None else min(
      total_steps, config.stop_after)
  fns = make_functions(recipe(config), total_steps)
  # Committed to the device like restored arrays are, so that a resumed run
  # reuses the compiled functions of the run it resumes (same cache key).
  state = jax.device_put(fns.init(jnp.asarray(data.x_train[:1])),
                         jax.devices()[0])

  manager = None
  if config.checkpoint_dir is not None:
    manager = checkpoint_manager(config)
  try:
    if config.resume and manager.latest_step() is not None:
      state = restore_checkpoint(manager, config, target=state)
      log(f"resumed from step {int(state.step)}")
    every = config.checkpoint_every or spe
    losses = []
    for step in range(int(state.step), last_step):
      if int(state.refresh_count) < refreshes_due(config, spe, step):
        state = fns.refresh(
            state, refresh_inputs(config, data, state.data_key, step))
      idx = batch_indices(config, data, state.data_key, step)
      state, loss = fns.train_step(state, jnp.asarray(data.x_train[idx]),
                                   jnp.asarray(data.y_train[idx]))
      losses.append(loss)
      done = step + 1
      if manager is not None and (done % every == 0 or done == last_step):
        save_checkpoint(manager, config, state)
      if done % spe == 0:
        log(f"epoch {done // spe}/{config.epochs} step {done} "
            f"loss {float(jnp.mean(jnp.stack(losses))):.4f} "
            f"refreshes {int(state.refresh_count)}")
        losses = []
  finally:
    if manager is not None:
      manager.wait_until_finished()
      manager.close()
  return state


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  defaults = Config()
  parser = argparse.ArgumentParser(
      description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--epochs", type=int, default=defaults.epochs)
  parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
  parser.add_argument("--lr", type=float, default=defaults.learning_rate,
                      help="peak learning rate (cosine decay)")
  parser.add_argument("--momentum", type=float, default=defaults.momentum)
  parser.add_argument("--wd", type=float, default=defaults.weight_decay,
                      help="coupled weight decay")
  parser.add_argument("--sgs", choices=SGS_MODES, default=defaults.sgs)
  parser.add_argument("--sgs-epochs", type=int, default=None,
                      help="refresh period (default max(1, round(epochs/20)))")
  parser.add_argument("--sgs-batches", type=int, default=defaults.sgs_batches)
  parser.add_argument("--width", type=int, default=defaults.width)
  parser.add_argument("--blocks", type=int, nargs="+",
                      default=list(defaults.blocks))
  parser.add_argument("--no-augment", action="store_true")
  parser.add_argument("--num-train", type=int, default=None,
                      help="use only the first N training images")
  parser.add_argument("--num-test", type=int, default=None,
                      help="use only the first N test images")
  parser.add_argument("--seed", type=int, default=defaults.seed)
  parser.add_argument("--prng-impl", default=defaults.prng_impl,
                      help="rbg, unsafe_rbg or threefry2x32")
  parser.add_argument("--checkpoint-dir", default=None)
  parser.add_argument("--checkpoint-every", type=int, default=0,
                      help="steps between checkpoints (0: every epoch)")
  parser.add_argument("--resume", action="store_true",
                      help="continue from the latest checkpoint, if any")
  parser.add_argument("--stop-after", type=int, default=None,
                      help="stop after this many steps (with a checkpoint)")
  parser.add_argument("--tiny", action="store_true",
                      help=f"a seconds-long smoke run: {TINY}")
  args = parser.parse_args(argv)
  config = Config(
      epochs=args.epochs, batch_size=args.batch_size, learning_rate=args.lr,
      momentum=args.momentum, weight_decay=args.wd, sgs=args.sgs,
      sgs_epochs=args.sgs_epochs, sgs_batches=args.sgs_batches,
      width=args.width, blocks=tuple(args.blocks),
      num_train=args.num_train, num_test=args.num_test,
      augment=not args.no_augment, seed=args.seed,
      prng_impl=args.prng_impl,
      checkpoint_dir=args.checkpoint_dir,
      checkpoint_every=args.checkpoint_every, resume=args.resume,
      stop_after=args.stop_after)
  if args.tiny:
    config = dataclasses.replace(config, **TINY)
  data = load_data(config)
  state = train(config, log=print, data=data)
  accuracy = evaluate(config, state, data)
  print(f"step {int(state.step)}: test accuracy {accuracy:.4f} "
        f"({len(data.x_test)} images), {int(state.refresh_count)} SGS "
        "refreshes")
  if config.sgs != "none":
    scalings = sgs_optax.get_scalings(state.opt_state)
    for path, matrix in jax.tree_util.tree_leaves_with_path(scalings):
      name = jax.tree_util.keystr(path, simple=True, separator="/")
      print(f"SGS matrix of {name}:\n{np.round(np.asarray(matrix), 3)}")
  return {"accuracy": accuracy, "step": int(state.step),
          "refresh_count": int(state.refresh_count), "state": state}


if __name__ == "__main__":
  main(sys.argv[1:])
