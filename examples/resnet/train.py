"""The train state, the jitted steps and the resumable training loop.

The optimizer is the paper's chain, SGS first::

  optax.chain(sgs_optax.sgs(), optax.add_decayed_weights(5e-4),
              optax.sgd(cosine(0.1), momentum=0.9))

and in the learned mode the SGS matrices are refreshed from the mutual
information of each conv's eval-mode input, on the first ``sgs_batches``
batches of the epoch, every ``refresh_period_epochs`` epochs, starting at
epoch 0 on the initialised network.
"""

from __future__ import annotations

from collections.abc import Callable
import functools
from typing import Any, NamedTuple

import flax.struct
import jax
import jax.numpy as jnp
import optax

from examples import data
from examples import models
from examples.resnet import checkpointing
from examples.resnet import input_pipeline
from examples.resnet.config import Config
from examples.resnet.config import recipe
from examples.resnet.config import refresh_period_epochs
import sgs_optax


class TrainState(flax.struct.PyTreeNode):
  """Everything a resumed run needs, as arrays (saved as one orbax tree).

  Attributes:
    step: number of train steps done, int32.
    params: the model's params.
    batch_stats: its BatchNorm running statistics.
    opt_state: the optax state, the SGS matrices and the momentum included.
    rng: key data (``jax.random.key_data``) of the augmentation key.
    data_key: key data of the data-order key.
    refresh_count: number of SGS refreshes done, int32.
  """

  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  rng: jax.Array
  data_key: jax.Array
  refresh_count: jax.Array


def make_model(config: Config) -> models.ResNet:
  return models.ResNet(width=config.width, blocks=tuple(config.blocks))


def make_optimizer(config: Config,
                   total_steps: int) -> optax.GradientTransformation:
  """SGS (or nothing), then coupled weight decay, then SGD with momentum."""
  if config.sgs == "none":
    first = optax.identity()
  else:
    first = sgs_optax.sgs(None if config.sgs == "learned" else config.sgs)
  schedule = optax.cosine_decay_schedule(config.learning_rate, total_steps)
  return optax.chain(first, optax.add_decayed_weights(config.weight_decay),
                     optax.sgd(schedule, momentum=config.momentum))


class Functions(NamedTuple):
  """The optimizer and the jitted pieces of a run (all stateless)."""

  tx: optax.GradientTransformation
  init: Callable[[jax.Array], TrainState]
  train_step: Callable[[TrainState, jax.Array, jax.Array],
                       tuple[TrainState, jax.Array]]
  refresh: Callable[[TrainState, jax.Array], TrainState]


@functools.lru_cache(maxsize=4)
def make_functions(config: Config, total_steps: int) -> Functions:
  """Builds the optimizer and the jitted init, train step and refresh.

  They hold no state: caching them per recipe only saves recompiling when a
  process trains several times (e.g. a run and its resumption).

  Args:
    config: the run's recipe (see :func:`recipe`).
    total_steps: length of the learning-rate schedule.

  Returns:
    The functions.
  """
  model = make_model(config)
  tx = make_optimizer(config, total_steps)

  @jax.jit  # One compilation instead of hundreds of eager dispatches.
  def init(x):
    root = jax.random.key(config.seed, impl=config.prng_impl)
    init_key, rng, data_key = jax.random.split(root, 3)
    variables = model.init(init_key, x)
    return TrainState(
        step=jnp.zeros((), jnp.int32), params=variables["params"],
        batch_stats=variables["batch_stats"],
        opt_state=tx.init(variables["params"]), rng=jax.random.key_data(rng),
        data_key=jax.random.key_data(data_key),
        refresh_count=jnp.zeros((), jnp.int32))

  @jax.jit
  def train_step(state: TrainState, x, y):
    rng, aug_key = jax.random.split(
        jax.random.wrap_key_data(state.rng, impl=config.prng_impl))
    if config.augment:
      x = input_pipeline.translate(aug_key, x)

    def loss_fn(params):
      logits, new_vars = model.apply(
          {"params": params, "batch_stats": state.batch_stats}, x,
          train=True, mutable=["batch_stats"])
      loss = optax.softmax_cross_entropy_with_integer_labels(logits, y)
      return loss.mean(), new_vars["batch_stats"]

    (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    return state.replace(
        step=state.step + 1, params=optax.apply_updates(state.params, updates),
        batch_stats=batch_stats, opt_state=opt_state,
        rng=jax.random.key_data(rng)), loss

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


@functools.lru_cache(maxsize=4)
def _predict_fn(config: Config) -> Callable[..., jax.Array]:
  model = make_model(config)
  return jax.jit(lambda variables, x: model.apply(variables, x, train=False))


def evaluate(config: Config, state: TrainState, split: data.Split) -> float:
  """Test accuracy, with BatchNorm in inference mode."""
  logits = _predict_fn(recipe(config))(
      {"params": state.params, "batch_stats": state.batch_stats},
      jnp.asarray(split.x_test))
  return float(jnp.mean(jnp.argmax(logits, -1) == split.y_test))


def train_and_evaluate(config: Config, *, data: data.Split | None = None,
                       log: Callable[[str], Any] | None = None,
                       log_every: int = 1) -> TrainState:
  """Trains (or resumes training) and returns the final train state.

  Args:
    config: the run.
    data: the dataset (default: :func:`input_pipeline.load`).
    log: called every ``log_every`` epochs with the last epoch's mean loss
      and the test accuracy (e.g. ``print``); silent if ``None``.
    log_every: epochs between two log lines.

  Returns:
    The train state after ``epochs * steps_per_epoch`` steps, or after
    ``stop_after`` steps.

  Raises:
    ValueError: if ``resume`` or ``stop_after`` is set without a
      ``checkpoint_dir``.
  """
  if config.checkpoint_dir is None and (config.resume or
                                        config.stop_after is not None):
    raise ValueError("resume and stop_after need a checkpoint_dir.")
  split = input_pipeline.load(config) if data is None else data
  spe = input_pipeline.steps_per_epoch(config, split)
  total_steps = config.epochs * spe
  last_step = total_steps if config.stop_after is None else min(
      total_steps, config.stop_after)
  fns = make_functions(recipe(config), total_steps)
  # Committed to the device like restored arrays are, so that a resumed run
  # reuses the compiled functions of the run it resumes (same cache key).
  state = jax.device_put(fns.init(jnp.asarray(split.x_train[:1])),
                         jax.devices()[0])
  manager = None
  if config.checkpoint_dir is not None:
    manager = checkpointing.checkpoint_manager(config)
  try:
    if config.resume and manager.latest_step() is not None:
      state = checkpointing.restore_checkpoint(manager, config, target=state)
      if log is not None:
        log(f"resumed from step {int(state.step)}")
    every = config.checkpoint_every or spe
    losses = []
    for step in range(int(state.step), last_step):
      if int(state.refresh_count) < refreshes_due(config, spe, step):
        state = fns.refresh(state, input_pipeline.refresh_inputs(
            config, split, state.data_key, step))
      idx = input_pipeline.batch_indices(config, split, state.data_key, step)
      state, loss = fns.train_step(state, jnp.asarray(split.x_train[idx]),
                                   jnp.asarray(split.y_train[idx]))
      losses.append(loss)
      done = step + 1
      if manager is not None and (done % every == 0 or done == last_step):
        checkpointing.save_checkpoint(manager, config, state)
      if done % spe == 0:
        if log is not None and (done // spe) % log_every == 0:
          log(f"epoch {done // spe:3d}: loss "
              f"{float(jnp.mean(jnp.stack(losses))):.4f}, test accuracy "
              f"{evaluate(config, state, split):.3f}")
        losses = []
  finally:
    if manager is not None:
      manager.wait_until_finished()
      manager.close()
  return state
