"""The train loop of the N-D examples: a Flax linen classifier, learned SGS.

``fit`` trains with any optax chain; when the chain holds a learned ``sgs``,
the SGS matrices are refreshed at the start of every ``refresh_every``-th
epoch from the conv inputs of two training batches (the paper's schedule is
every 5 epochs from 2 batches), captured with ``capture_conv_inputs``.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from examples import data
import sgs_optax


def fit(model: nn.Module, tx: optax.GradientTransformation, split: data.Split,
        *, epochs: int, batch_size: int, seed: int,
        refresh_every: int | None = None) -> tuple[float, optax.OptState]:
  """Trains ``model`` with ``tx``; returns its test accuracy and opt state."""
  params = model.init(jax.random.key(seed), split.x_train[:1])["params"]
  opt_state = tx.init(params)

  @jax.jit
  def step(params, opt_state, x, y):
    def loss_fn(p):
      logits = model.apply({"params": p}, x)
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    updates, opt_state = tx.update(jax.grad(loss_fn)(params), opt_state,
                                   params)
    return optax.apply_updates(params, updates), opt_state

  @jax.jit
  def refresh(params, opt_state, x):
    captured = sgs_optax.capture_conv_inputs(model, {"params": params}, x)
    return sgs_optax.refresh_scalings(opt_state, captured)

  rng = np.random.default_rng(seed)
  for epoch in range(epochs):
    epoch_batches = data.batches(len(split.x_train), batch_size, rng)
    if refresh_every and epoch % refresh_every == 0:
      first_two = np.concatenate(epoch_batches[:2])
      opt_state = refresh(params, opt_state, split.x_train[first_two])
    for idx in epoch_batches:
      params, opt_state = step(params, opt_state, split.x_train[idx],
                               split.y_train[idx])
  logits = model.apply({"params": params}, split.x_test)
  return float(jnp.mean(jnp.argmax(logits, -1) == split.y_test)), opt_state
