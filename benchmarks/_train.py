"""The shared training loop of the benchmarks (Flax linen + optax, on CPU).

One :class:`Trainer` per (model, optimizer) pair owns the jitted functions: the
train step is traced and compiled once (explicitly, in :meth:`Trainer.warm_up`,
so the compile time is measured apart from the epochs) and then reused for
every seed; the SGS refresh is a *separate* jitted function that rewrites the
optimizer state between steps, so the train step never carries the estimator
and never recompiles (:meth:`Trainer.step_compilations` counts the compiled
variants; it must stay 1).

Randomness is explicit: the init key and the augmentation key come from
``Trainer.key(seed)``, the batch order from ``(seed, epoch)``
(:func:`benchmarks._data.epoch_batches`), the refresh batches from
``(seed, epoch)`` too. Methods that share a model get the same initial weights
for the same seed (paired comparisons).
"""

from __future__ import annotations

import dataclasses
import functools
import sys
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks import _data


class TrainState(NamedTuple):
  params: Any
  batch_stats: Any
  opt_state: Any


@dataclasses.dataclass
class RunResult:
  """Everything one (method, seed) run produced (JSON-ready via asdict)."""

  seed: int
  test_accuracy: list[float]  # after every epoch.
  train_loss: list[float]  # mean over the epoch's steps.
  train_accuracy: list[float]
  epoch_time_s: list[float]  # train steps only (no eval, no refresh).
  refresh_time_s: list[float]  # one entry per refresh (compile excluded).
  refresh_epochs: list[int]
  final_test_accuracy: float
  final_state: TrainState | None = dataclasses.field(default=None, repr=False)


def random_crop_flip(key: jax.Array, images: jax.Array, pad: int = 4):
  """CIFAR augmentation: zero-pad by ``pad``, random crop, random h-flip."""
  n, h, w, _ = images.shape
  k_crop, k_flip = jax.random.split(key)
  offsets = jax.random.randint(k_crop, (n, 2), 0, 2 * pad + 1)
  flips = jax.random.bernoulli(k_flip, 0.5, (n,))
  padded = jnp.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))

  def one(image, offset, flip):
    crop = jax.lax.dynamic_slice(
        image, (offset[0], offset[1], 0), (h, w, image.shape[-1]))
    return jnp.where(flip, crop[:, ::-1], crop)

  return jax.vmap(one)(padded, offsets, flips)


# Shared between trainers: equal models (same class and fields, e.g. every
# plain-model method) compile their init and eval only once.
@functools.partial(jax.jit, static_argnums=0)
def _model_init(model, key, images):
  return model.init(key, images, train=False)


@functools.partial(jax.jit, static_argnums=0)
def _eval_logits(model, variables, images):
  return model.apply(variables, images, train=False)


def cross_entropy(logits, labels):
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


class Trainer:
  """Jitted train step, eval and (optional) SGS refresh for one model + tx.

  Args:
    model: a linen module called as ``model(x, train=...)`` with a
      ``batch_stats`` collection.
    tx: the optax transformation.
    augment: apply :func:`random_crop_flip` to every training batch.
    refresh: whether to build the learned-SGS refresh
      (``sgs_optax.capture_conv_inputs`` + ``sgs_optax.refresh_scalings``).
    prng_impl: the ``jax.random.key`` implementation. ``"threefry2x32"``
      (JAX's default) is the reference; ``"rbg"`` compiles model inits about
      3x faster on CPU (used by ``compare.py --tiny``), with other numbers.
  """

  def __init__(
      self,
      model: nn.Module,
      tx: optax.GradientTransformation,
      *,
      augment: bool = False,
      refresh: bool = False,
      prng_impl: str = "threefry2x32",
  ):
    self.model = model
    self.prng_impl = prng_impl
    self.tx = tx
    self.augment = augment
    self.compile_time_s = 0.0
    self.refresh_compile_time_s = 0.0
    self.refresh_jitted = None

    def train_step(state: TrainState, images, labels, key):
      if augment:
        images = random_crop_flip(key, images)

      def loss_fn(params):
        logits, updated = model.apply(
            {"params": params, "batch_stats": state.batch_stats},
            images,
            train=True,
            mutable=["batch_stats"],
        )
        return cross_entropy(logits, labels), (logits, updated["batch_stats"])

      (loss, (logits, batch_stats)), grads = jax.value_and_grad(
          loss_fn, has_aux=True)(state.params)
      updates, opt_state = tx.update(grads, state.opt_state, state.params)
      params = optax.apply_updates(state.params, updates)
      accuracy = jnp.mean(jnp.argmax(logits, -1) == labels)
      return TrainState(params, batch_stats, opt_state), (loss, accuracy)

    self._train_step = jax.jit(train_step)
    self._tx_init = jax.jit(tx.init)
    self._refresh = None
    if refresh:
      import sgs_optax  # pylint: disable=g-import-not-at-top

      def refresh_fn(params, batch_stats, opt_state, images):
        captured = sgs_optax.capture_conv_inputs(
            model, {"params": params, "batch_stats": batch_stats}, images,
            train=False)
        return sgs_optax.refresh_scalings(opt_state, captured)

      self._refresh_eager = refresh_fn
      self._refresh = jax.jit(refresh_fn)

  # -- state ---------------------------------------------------------------

  def key(self, seed: int) -> jax.Array:
    """The root key of a run: ``jax.random.key(seed, impl=prng_impl)``."""
    return jax.random.key(seed, impl=self.prng_impl)

  def init_variables(self, seed: int, sample_images: np.ndarray):
    """The model's initial variables for ``seed`` (from ``key(seed)``)."""
    init_key = jax.random.fold_in(self.key(seed), 0)
    return _model_init(self.model, init_key, jnp.asarray(sample_images[:1]))

  def init(self, seed: int, sample_images: np.ndarray,
           variables=None) -> TrainState:
    """Initial state for ``seed``: same weights for every method of a model.

    Args:
      seed: run seed.
      sample_images: a batch of inputs (only the first is used, for shapes).
      variables: the model's initial variables, if already computed (e.g.
        shared between methods: initialising a model compiles slowly on CPU).

    Returns:
      The initial :class:`TrainState`.
    """
    if variables is None:
      variables = self.init_variables(seed, sample_images)
    params = variables["params"]
    return TrainState(params, variables.get("batch_stats", {}),
                      self._tx_init(params))

  @property
  def train_step(self):
    """The jitted ``train_step(state, images, labels, key)``."""
    return self._train_step

  @property
  def refresh_step(self):
    """The jitted learned-SGS refresh, or None without ``refresh=True``."""
    return self._refresh

  def step_compilations(self) -> int:
    """How many variants of the train step were compiled (should be 1)."""
    cache_size = getattr(self._train_step, "_cache_size", None)
    return -1 if cache_size is None else cache_size()  # -1: unknown.

  def refresh_compilations(self) -> int:
    """How many variants of the jitted refresh were compiled (should be 1)."""
    if self._refresh is None or not self.refresh_jitted:
      return 0
    cache_size = getattr(self._refresh, "_cache_size", None)
    return -1 if cache_size is None else cache_size()  # -1: unknown.

  # -- compiled pieces -----------------------------------------------------

  def warm_up(self, state: TrainState, images, labels, refresh_images=None):
    """Compiles the train step (and refresh) once; records the times."""
    start = time.perf_counter()
    key = jax.random.fold_in(self.key(0), 1)  # as in fit().
    out = self._train_step(state, jnp.asarray(images), jnp.asarray(labels),
                           jax.random.fold_in(key, 0))
    jax.block_until_ready(out)
    self.compile_time_s = time.perf_counter() - start
    if self._refresh is not None and refresh_images is not None:
      start = time.perf_counter()
      self.refresh(state, refresh_images)
      self.refresh_compile_time_s = time.perf_counter() - start

  def refresh(self, state: TrainState, images) -> TrainState:
    """Recomputes the learned SGS matrices into the optimizer state."""
    args = (state.params, state.batch_stats, state.opt_state,
            jnp.asarray(images))
    if self.refresh_jitted is not False:
      try:
        opt_state = self._refresh(*args)
        self.refresh_jitted = True
      except (jax.errors.ConcretizationTypeError,
              jax.errors.TracerArrayConversionError,
              jax.errors.TracerBoolConversionError,
              jax.errors.TracerIntegerConversionError) as e:
        if self.refresh_jitted:
          raise
        print(f"note: the SGS refresh is not jittable ({type(e).__name__}); "
              "running it eagerly.", file=sys.stderr)
        self.refresh_jitted = False
    if self.refresh_jitted is False:
      opt_state = self._refresh_eager(*args)
    jax.block_until_ready(opt_state)
    return state._replace(opt_state=opt_state)

  def logits(self, variables, images: np.ndarray, chunk: int = 1000):
    """Eval-mode logits over a whole array, in fixed-size chunks."""
    n = len(images)
    chunk = min(chunk, n)
    outs = []
    for start in range(0, n, chunk):
      block = images[start:start + chunk]
      if len(block) < chunk:  # pad: one compiled shape only.
        block = np.concatenate(
            [block, np.zeros((chunk - len(block),) + block.shape[1:],
                             block.dtype)])
      outs.append(np.asarray(
          _eval_logits(self.model, variables, jnp.asarray(block))))
    return np.concatenate(outs)[:n]

  def accuracy(self, variables, images, labels) -> float:
    return float(np.mean(self.logits(variables, images).argmax(-1) == labels))

  # -- the loop ------------------------------------------------------------

  def fit(
      self,
      state: TrainState,
      data: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray],
      *,
      seed: int,
      epochs: int,
      batch_size: int,
      refresh_every: int | None = None,
      refresh_batches: int = 2,
      evaluate: Callable[[TrainState], float] | None = None,
      progress: bool = True,
      description: str = "",
  ) -> RunResult:
    """Trains for ``epochs`` epochs and evaluates after each one.

    Args:
      state: the initial state (from :meth:`init`).
      data: ``(train_images, train_labels, test_images, test_labels)``.
      seed: run seed (batch order, augmentation, refresh batches).
      epochs: number of epochs.
      batch_size: examples per step (incomplete last batch dropped).
      refresh_every: refresh the learned SGS matrices at the start of every
        epoch ``e`` with ``e % refresh_every == 0`` (epoch 0 included, on the
        initial network), from ``refresh_batches`` random training batches.
        ``None``: never.
      refresh_batches: number of batches per refresh (one forward pass).
      evaluate: test accuracy of a state (default: this trainer's model).
      progress: show a tqdm bar on stderr.
      description: the bar's label.

    Returns:
      A :class:`RunResult` (``final_state`` holds the last state).
    """
    from tqdm.auto import tqdm  # pylint: disable=g-import-not-at-top

    x_train, y_train, x_test, y_test = data
    if evaluate is None:
      evaluate = lambda s: self.accuracy(  # pylint: disable=g-long-lambda
          {"params": s.params, "batch_stats": s.batch_stats}, x_test, y_test)
    aug_key = jax.random.fold_in(self.key(seed), 1)
    result = RunResult(seed, [], [], [], [], [], [], float("nan"))
    step = 0
    bar = tqdm(total=epochs, desc=description, file=sys.stderr, leave=False,
               disable=not progress, dynamic_ncols=True)
    with bar:
      for epoch in range(epochs):
        if (self._refresh is not None and refresh_every
            and epoch % refresh_every == 0):
          rng = np.random.default_rng(_data.epoch_seed(seed, 1_000_000 + epoch))
          count = min(len(x_train), refresh_batches * batch_size)
          index = rng.choice(len(x_train), count, replace=False)
          start = time.perf_counter()
          state = self.refresh(state, x_train[index])
          result.refresh_time_s.append(time.perf_counter() - start)
          result.refresh_epochs.append(epoch)
        metrics = []
        start = time.perf_counter()
        for index in _data.epoch_batches(
            len(x_train), batch_size, seed=seed, epoch=epoch):
          state, m = self._train_step(
              state, jnp.asarray(x_train[index]), jnp.asarray(y_train[index]),
              jax.random.fold_in(aug_key, step))
          metrics.append(m)
          step += 1
        metrics = jax.device_get(metrics)
        jax.block_until_ready(state)
        result.epoch_time_s.append(time.perf_counter() - start)
        loss, train_acc = np.mean(np.asarray(metrics, dtype=np.float64), 0)
        result.train_loss.append(float(loss))
        result.train_accuracy.append(float(train_acc))
        result.test_accuracy.append(float(evaluate(state)))
        bar.set_postfix(loss=f"{loss:.3f}",
                        test_acc=f"{result.test_accuracy[-1]:.4f}")
        bar.update(1)
    result.final_test_accuracy = result.test_accuracy[-1]
    result.final_state = state
    return result
