"""The shared training loop of the benchmarks (Flax linen + optax).

The data live on the device: :func:`preload` puts a whole split there once
(as stored, uint8 for images), and every jitted function takes the split plus
an index array and gathers, augments (:func:`random_crop_flip`) and normalises
its batch inside ``jit``. Per step the host only sends a few hundred indices,
which keeps an accelerator fed (:meth:`Trainer.time_steps` measures what the
host costs).

One :class:`Trainer` per (model, optimizer) pair owns the jitted functions: the
train step is compiled once (in :meth:`Trainer.warm_up`, timed apart from the
epochs) and reused for every learning rate, run length and seed, because the
peak learning rate and the schedule's length are part of the
:class:`TrainState` (traced), not constants. The SGS refresh is a *separate*
jitted function that rewrites the optimizer state between steps, so the train
step never carries the estimator and never recompiles
(:meth:`Trainer.step_compilations` counts the compiled variants).

Learning rate: every benchmark optimizer is built at unit learning rate and
the step multiplies its update by ``lr * cosine(step / total_steps)``. That is
the same update as building it at ``lr`` with optax's cosine schedule, because
every method's update is linear in the learning rate: SGD's momentum is
scaled after it is accumulated, AdamW's decoupled decay is multiplied by the
learning rate, and SGS after Adam is elementwise.

Randomness is explicit: the init key and the augmentation key come from
``Trainer.key(seed)``, the batch order from ``(seed, epoch)``
(:func:`benchmarks._data.epoch_batches`), the refresh batches from
``(seed, epoch)`` too. So every method sees the same batches and augmentation
for a seed (paired comparisons), and a run resumed from a checkpoint
continues exactly as if it had not been interrupted.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
import dataclasses
import functools
import math
import sys
import time
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks import _data

# Eval batches have this many examples (the last one padded): one compiled
# shape per split.
EVAL_CHUNK = 500


class TrainState(NamedTuple):
  """Everything a run carries from step to step (checkpointed as is).

  Attributes:
    params: the model's params.
    batch_stats: BatchNorm statistics.
    opt_state: the optimizer state (built at unit learning rate).
    lr: the peak learning rate, float32 scalar.
    total_steps: length of the cosine schedule, int32 scalar.
  """

  params: Any
  batch_stats: Any
  opt_state: Any
  lr: jax.Array
  total_steps: jax.Array


class DeviceSplit(NamedTuple):
  """A whole split on the device: images as stored, int32 labels."""

  images: jax.Array
  labels: jax.Array


class Normalization(NamedTuple):
  """Per-channel mean and std, in stored pixel units (float32 ``(C,)``)."""

  mean: jax.Array
  std: jax.Array


@dataclasses.dataclass(frozen=True)
class Phase:
  """What a run trains on and what it is scored on.

  Attributes:
    train: the device split that training batches are gathered from.
    train_index: which examples of ``train`` are trained on (positions).
    norm: the normalisation, from the trained-on examples.
    evals: name -> (device split, index): accuracy after every epoch.
  """

  train: DeviceSplit
  train_index: np.ndarray
  norm: Normalization
  evals: Mapping[str, tuple[DeviceSplit, np.ndarray]]

  @property
  def num_train(self) -> int:
    return len(self.train_index)


def preload(images: np.ndarray, labels: np.ndarray) -> DeviceSplit:
  """Puts a whole split on the default device, images in their own dtype."""
  return DeviceSplit(jax.device_put(images), jax.device_put(labels))


def normalization(images: np.ndarray) -> Normalization:
  """:class:`Normalization` from host images (see ``channel_stats``)."""
  mean, std = _data.channel_stats(images)
  return Normalization(jnp.asarray(mean), jnp.asarray(std))


@dataclasses.dataclass
class RunResult:
  """Everything one (method, lr, seed) run produced (JSON-ready via asdict).

  ``accuracy`` maps each eval name of the :class:`Phase` (e.g. ``"val"``,
  ``"test"``) to its accuracy after every epoch, ``loss`` to its mean
  cross-entropy (:func:`mean_cross_entropy`).
  """

  seed: int
  accuracy: dict[str, list[float]]
  train_loss: list[float]  # mean over the epoch's steps.
  train_accuracy: list[float]
  epoch_time_s: list[float]  # train steps only (no eval, no refresh).
  refresh_time_s: list[float]  # one entry per refresh (compile excluded).
  refresh_epochs: list[int]
  # A default: histories checkpointed before losses were recorded resume.
  loss: dict[str, list[float]] = dataclasses.field(default_factory=dict)
  resumed_at_epoch: int | None = None
  final_state: TrainState | None = dataclasses.field(default=None, repr=False)

  def history(self) -> dict[str, Any]:
    """The JSON-ready fields (everything but the final state)."""
    return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
            if f.name != "final_state"}

  def final(self, name: str) -> float:
    """The last epoch's accuracy on eval split ``name``."""
    return self.accuracy[name][-1]

  def final_loss(self, name: str) -> float:
    """The last epoch's mean cross-entropy on eval split ``name``."""
    return self.loss[name][-1]


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


def batch_inputs(split: DeviceSplit, index: jax.Array, norm: Normalization,
                 key: jax.Array | None = None):
  """Gathers a batch, augments it (given a key) and normalises it.

  The augmentation pads with black (stored zeros), before normalising, as
  torchvision's ``RandomCrop(padding=4)`` followed by ``Normalize`` does.

  Args:
    split: the device split.
    index: int array of example positions.
    norm: the normalisation.
    key: augmentation key; ``None`` for no augmentation.

  Returns:
    ``(images, labels)``: float32 normalised NHWC images, int32 labels.
  """
  images = split.images[index].astype(jnp.float32)
  if key is not None:
    images = random_crop_flip(key, images)
  return (images - norm.mean) / norm.std, split.labels[index]


def cosine_lr(peak: jax.Array, total_steps: jax.Array, step: jax.Array):
  """``optax.cosine_decay_schedule(peak, total_steps)(step)``, traced length.

  optax's schedule takes its length as a Python int; here it is a traced
  scalar so that one compiled step serves runs of any length.
  """
  total = jnp.maximum(total_steps, 1).astype(jnp.float32)
  progress = jnp.minimum(step.astype(jnp.float32), total) / total
  return peak * 0.5 * (1.0 + jnp.cos(jnp.pi * progress))


# Shared between trainers: equal models (same class and fields, e.g. every
# plain-model method) compile their init and eval only once.
@functools.partial(jax.jit, static_argnums=0)
def _model_init(model, key, images):
  return model.init(key, images, train=False)


@functools.partial(jax.jit, static_argnums=0)
def _eval_logits(model, variables, split, index, norm):
  images, _ = batch_inputs(split, index, norm)
  return model.apply(variables, images, train=False)


def cross_entropy(logits, labels):
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def mean_cross_entropy(logits: np.ndarray, labels: np.ndarray) -> float:
  """Mean softmax cross-entropy of a whole split, in float64 on the host.

  Per example ``logsumexp(z) - z[label]``, summed over every example and
  divided by their number once: the value does not depend on how the split
  was cut into eval chunks (a mean of per-chunk means would weight a short
  last chunk like a full one).

  Args:
    logits: ``(n, classes)`` logits.
    labels: ``(n,)`` integer labels.

  Returns:
    The mean loss (NaN if a logit is not finite).
  """
  z = np.asarray(logits, np.float64)
  top = z.max(-1, keepdims=True)
  log_norm = top[:, 0] + np.log(np.exp(z - top).sum(-1))
  picked = z[np.arange(len(z)), np.asarray(labels)]
  return float(np.sum(log_norm - picked) / len(z))


def _make_train_step(model: nn.Module, tx: optax.GradientTransformation,
                     augment: bool):
  """The train step: gather + augment + forward + backward + update."""

  def train_step(state: TrainState, split: DeviceSplit, index: jax.Array,
                 norm: Normalization, run_key: jax.Array, step: jax.Array):
    key = jax.random.fold_in(run_key, step) if augment else None
    images, labels = batch_inputs(split, index, norm, key)

    def loss_fn(params):
      logits, updated = model.apply(
          {"params": params, "batch_stats": state.batch_stats},
          images, train=True, mutable=["batch_stats"])
      return cross_entropy(logits, labels), (logits, updated["batch_stats"])

    (loss, (logits, batch_stats)), grads = jax.value_and_grad(
        loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    lr = cosine_lr(state.lr, state.total_steps, step)
    updates = jax.tree.map(lambda u: (lr * u).astype(u.dtype), updates)
    params = optax.apply_updates(state.params, updates)
    accuracy = jnp.mean(jnp.argmax(logits, -1) == labels)
    return (state._replace(params=params, batch_stats=batch_stats,
                           opt_state=opt_state), (loss, accuracy))

  return train_step


def _make_refresh(model: nn.Module):
  """The learned-SGS refresh on a batch gathered from the device split."""
  import sgs_optax  # pylint: disable=g-import-not-at-top

  def refresh(state: TrainState, split: DeviceSplit, index: jax.Array,
              norm: Normalization):
    images, _ = batch_inputs(split, index, norm)
    captured = sgs_optax.capture_conv_inputs(
        model, {"params": state.params, "batch_stats": state.batch_stats},
        images, train=False)
    return state._replace(
        opt_state=sgs_optax.refresh_scalings(state.opt_state, captured))

  return refresh


def _cache_size(fn) -> int:
  cache_size = getattr(fn, "_cache_size", None)
  return -1 if cache_size is None else cache_size()  # -1: unknown.


class Trainer:
  """Jitted train step, eval and (optional) SGS refresh for one model + tx.

  Args:
    model: a linen module called as ``model(x, train=...)`` with a
      ``batch_stats`` collection.
    tx: the optax transformation, at unit learning rate (the step scales its
      update by the state's cosine-decayed learning rate).
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
    self.tx = tx
    self.augment = augment
    self.prng_impl = prng_impl
    self.compile_time_s = 0.0
    self.refresh_compile_time_s = 0.0
    self._train_step = jax.jit(_make_train_step(model, tx, augment))
    self._tx_init = jax.jit(tx.init)
    self._refresh = jax.jit(_make_refresh(model)) if refresh else None

  # -- state ---------------------------------------------------------------

  def key(self, seed: int) -> jax.Array:
    """The root key of a run: ``jax.random.key(seed, impl=prng_impl)``."""
    return jax.random.key(seed, impl=self.prng_impl)

  def run_key(self, seed: int) -> jax.Array:
    """The augmentation key of a run (the same for every method)."""
    return jax.random.fold_in(self.key(seed), 1)

  def init_variables(self, seed: int, sample_images: np.ndarray):
    """The model's initial variables for ``seed`` (from ``key(seed)``)."""
    init_key = jax.random.fold_in(self.key(seed), 0)
    sample = jnp.zeros((1,) + tuple(sample_images.shape[1:]), jnp.float32)
    return _model_init(self.model, init_key, sample)

  def init(self, variables, *, lr: float, total_steps: int) -> TrainState:
    """The initial state from the model's variables.

    Args:
      variables: the model's initial variables (shared between the methods
        of a seed: the same starting point for every method).
      lr: the peak learning rate.
      total_steps: the cosine schedule's length.

    Returns:
      The initial :class:`TrainState`.
    """
    params = variables["params"]
    return TrainState(params, variables.get("batch_stats", {}),
                      self._tx_init(params), jnp.asarray(lr, jnp.float32),
                      jnp.asarray(total_steps, jnp.int32))

  @property
  def train_step(self):
    """The jitted ``train_step(state, split, index, norm, run_key, step)``."""
    return self._train_step

  @property
  def refresh_step(self):
    """The jitted ``refresh(state, split, index, norm)``, or None."""
    return self._refresh

  def step_compilations(self) -> int:
    """How many variants of the train step were compiled (should be 1)."""
    return _cache_size(self._train_step)

  def refresh_compilations(self) -> int:
    """How many variants of the jitted refresh were compiled (<= 1)."""
    return 0 if self._refresh is None else _cache_size(self._refresh)

  # -- compiled pieces -----------------------------------------------------

  def warm_up(self, state: TrainState, phase: Phase, batch_size: int,
              refresh_count: int = 0) -> None:
    """Compiles the train step (and refresh) once; records the times."""
    index = jnp.asarray(phase.train_index[:min(batch_size, phase.num_train)])
    start = time.perf_counter()
    out = self._train_step(state, phase.train, index, phase.norm,
                           self.run_key(0), jnp.asarray(0, jnp.int32))
    jax.block_until_ready(out)
    self.compile_time_s = time.perf_counter() - start
    if self._refresh is not None and refresh_count:
      start = time.perf_counter()
      self.refresh(state, phase, phase.train_index[:refresh_count])
      self.refresh_compile_time_s = time.perf_counter() - start

  def refresh(self, state: TrainState, phase: Phase,
              index: np.ndarray) -> TrainState:
    """Recomputes the learned SGS matrices from ``phase.train[index]``."""
    state = self._refresh(state, phase.train, jnp.asarray(index), phase.norm)
    return jax.block_until_ready(state)

  def logits(self, variables, split: DeviceSplit, index: np.ndarray,
             norm: Normalization) -> np.ndarray:
    """Eval-mode logits of ``split[index]``, in padded fixed-size chunks."""
    outs = []
    for start in range(0, len(index), EVAL_CHUNK):
      block = index[start:start + EVAL_CHUNK]
      padded = np.zeros(EVAL_CHUNK, np.int32)
      padded[:len(block)] = block
      outs.append(np.asarray(_eval_logits(
          self.model, variables, split, jnp.asarray(padded),
          norm))[:len(block)])
    return np.concatenate(outs)

  def evaluate(self, state: TrainState, phase: Phase
               ) -> dict[str, dict[str, float]]:
    """``{split: {"accuracy": ..., "loss": ...}}`` for every eval split."""
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    out = {}
    for name, (split, index) in phase.evals.items():
      logits = self.logits(variables, split, index, phase.norm)
      labels = np.asarray(split.labels)[index]
      out[name] = {"accuracy": float(np.mean(logits.argmax(-1) == labels)),
                   "loss": mean_cross_entropy(logits, labels)}
    return out

  # -- the loop ------------------------------------------------------------

  def _steps(self, state: TrainState, phase: Phase, batches, run_key,
             first_step: int):
    """Runs the train step over ``batches`` (positions in the phase)."""
    metrics = []
    step = first_step
    for positions in batches:
      index = jnp.asarray(phase.train_index[positions])
      state, m = self._train_step(state, phase.train, index, phase.norm,
                                  run_key, jnp.asarray(step, jnp.int32))
      metrics.append(m)
      step += 1
    return state, metrics

  def _refresh_index(self, phase: Phase, seed: int, epoch: int,
                     count: int) -> np.ndarray:
    rng = np.random.default_rng(_data.epoch_seed(seed, 1_000_000 + epoch))
    return phase.train_index[rng.choice(phase.num_train, count, replace=False)]

  def fit(
      self,
      state: TrainState,
      phase: Phase,
      *,
      seed: int,
      epochs: int,
      batch_size: int,
      refresh_every: int | None = None,
      refresh_batches: int = 2,
      progress: bool = True,
      description: str = "",
      on_epoch: Callable[[dict[str, Any]], None] | None = None,
      checkpoint: Any = None,
  ) -> RunResult:
    """Trains for ``epochs`` epochs and evaluates after each one.

    Args:
      state: the initial state (from :meth:`init`).
      phase: what to train on and evaluate on.
      seed: run seed (batch order, augmentation, refresh batches).
      epochs: number of epochs.
      batch_size: examples per step (incomplete last batch dropped).
      refresh_every: refresh the learned SGS matrices at the start of every
        epoch ``e`` with ``e % refresh_every == 0`` (epoch 0 included, on the
        initial network), from ``refresh_batches`` random training batches.
        ``None``: never.
      refresh_batches: number of batches per refresh (one forward pass).
      progress: show a tqdm bar on stderr when stderr is a terminal.
      description: the bar's label.
      on_epoch: called with each epoch's record (a JSON-ready dict).
      checkpoint: a ``_checkpoint.RunCheckpoint`` to resume from and save
        to after every epoch, or None.

    Returns:
      A :class:`RunResult` (``final_state`` holds the last state).
    """
    from tqdm.auto import tqdm  # pylint: disable=g-import-not-at-top

    result = RunResult(seed, {name: [] for name in phase.evals}, [], [], [],
                       [], [], loss={name: [] for name in phase.evals})
    if checkpoint is not None:
      restored = checkpoint.restore(state)
      if restored is not None:
        state, history = restored
        result = RunResult(**history)
        result.resumed_at_epoch = len(result.train_loss)
    run_key = self.run_key(seed)
    steps_per_epoch = phase.num_train // min(batch_size, phase.num_train)
    done = len(result.train_loss)
    count = min(phase.num_train, refresh_batches * batch_size)
    # disable=None: a bar only on a terminal, so a redirected log stays clean.
    bar = tqdm(total=epochs, initial=done, desc=description, file=sys.stderr,
               leave=False, disable=None if progress else True,
               dynamic_ncols=True)
    with bar:
      for epoch in range(done, epochs):
        if (self._refresh is not None and refresh_every
            and epoch % refresh_every == 0):
          start = time.perf_counter()
          state = self.refresh(
              state, phase, self._refresh_index(phase, seed, epoch, count))
          result.refresh_time_s.append(time.perf_counter() - start)
          result.refresh_epochs.append(epoch)
        start = time.perf_counter()
        state, metrics = self._steps(
            state, phase, _data.epoch_batches(phase.num_train, batch_size,
                                              seed=seed, epoch=epoch),
            run_key, epoch * steps_per_epoch)
        metrics = jax.device_get(metrics)
        jax.block_until_ready(state)
        result.epoch_time_s.append(time.perf_counter() - start)
        record = self._record(result, metrics, self.evaluate(state, phase),
                              epoch, batch_size * steps_per_epoch)
        if checkpoint is not None:
          checkpoint.save(epoch + 1, state, result.history(),
                          last=epoch + 1 == epochs)
        if on_epoch is not None:
          on_epoch(record)
        bar.set_postfix(loss=f"{record['train_loss']:.3f}")
        bar.update(1)
    result.final_state = state
    return result

  @staticmethod
  def _record(result: RunResult, metrics,
              scores: dict[str, dict[str, float]], epoch: int,
              images: int) -> dict[str, Any]:
    """Appends one epoch's numbers to ``result``; returns its JSON record."""
    loss, train_acc = np.mean(np.asarray(metrics, dtype=np.float64), 0)
    result.train_loss.append(float(loss))
    result.train_accuracy.append(float(train_acc))
    for name, score in scores.items():
      result.accuracy[name].append(score["accuracy"])
      result.loss.setdefault(name, []).append(score["loss"])
    return {"epoch": epoch, "train_loss": float(loss),
            "train_accuracy": float(train_acc),
            **{f"{name}_{key}": v for name, score in scores.items()
               for key, v in score.items()},
            "epoch_time_s": result.epoch_time_s[-1],
            "images_per_s": images / result.epoch_time_s[-1],
            "refreshed": bool(result.refresh_epochs
                              and result.refresh_epochs[-1] == epoch)}

  def time_steps(self, state: TrainState, phase: Phase, batch_size: int,
                 budget_s: float = 1.0, rounds: int = 3) -> dict[str, float]:
    """Step time through the training loop and of the bare jitted step.

    The loop is :meth:`fit`'s own (host-side index gather, transfer, call);
    the bare step is called on inputs already on the device. Rounds
    alternate and the medians are kept. The share of the loop's step time
    spent outside the jitted step is ``1 - bare / loop`` (around 0 when the
    device is kept busy; it can come out slightly negative from noise).

    Args:
      state: a state to step from (it is not modified).
      phase: the training phase.
      batch_size: examples per step.
      budget_s: rough time per round and path.
      rounds: number of alternating rounds.

    Returns:
      ``step_s_loop``, ``step_s_bare``, ``images_per_s`` (through the loop)
      and ``outside_jit_share``.
    """
    batches = list(_data.epoch_batches(phase.num_train, batch_size, seed=0,
                                       epoch=0))
    run_key = self.run_key(0)
    start = time.perf_counter()
    jax.block_until_ready(self._steps(state, phase, batches[:1], run_key, 0))
    steps = int(np.clip(budget_s / (time.perf_counter() - start), 3, 50))
    batches = (batches * math.ceil(steps / len(batches)))[:steps]
    staged = [(jnp.asarray(phase.train_index[b]), jnp.asarray(i, jnp.int32))
              for i, b in enumerate(batches)]
    loop, bare = [], []
    for _ in range(rounds):
      start = time.perf_counter()
      jax.block_until_ready(self._steps(state, phase, batches, run_key, 0))
      loop.append((time.perf_counter() - start) / steps)
      start = time.perf_counter()
      s = state
      for index, step in staged:
        s, _ = self._train_step(s, phase.train, index, phase.norm, run_key,
                                step)
      jax.block_until_ready(s)
      bare.append((time.perf_counter() - start) / steps)
    t_loop, t_bare = float(np.median(loop)), float(np.median(bare))
    return {"step_s_loop": t_loop, "step_s_bare": t_bare,
            "images_per_s": batch_size / t_loop,
            "outside_jit_share": 1.0 - t_bare / t_loop, "steps_timed": steps}
