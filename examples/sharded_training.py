"""Sharded training with learned SGS and CDG, on one host or several.

The batch is sharded over a ``data`` mesh axis and every conv kernel along its
output-channel axis over the same devices (FSDP style); SGS, CDG, the conv
input capture and the mutual-information refresh all run inside ``jax.jit``
on that mesh with no change to the transforms. The optimizer state's
shardings come from the params' with ``optax.tree_utils.tree_map_params``.

``--mesh explicit`` (the default, as ``jax.make_mesh``'s default axis types)
puts the shardings in the arrays' types: the train step gathers each kernel
before its conv (``jax.sharding.reshard``) and the gradients come back
sharded like the params. ``--mesh auto`` lets XLA's partitioner place the
collectives (GSPMD).

One host, 8 simulated CPU devices::

  XLA_FLAGS=--xla_force_host_platform_device_count=8 \
      python -m examples.sharded_training [--steps 150] [--mesh auto]

prints the loss falling from about 2.30 (chance on 10 classes) to about 0.1
over the default 150 steps of batch 16, on every mesh and device count.

Two processes on this machine (CPU collectives over gloo)::

  python -m examples.sharded_training --num-processes 2 --process-id 0 &
  python -m examples.sharded_training --num-processes 2 --process-id 1

Each run writes its final params and SGS matrices to ``--out`` (``.npz``) so
that runs on different device counts can be compared.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
import sys
from typing import Any, NamedTuple

import flax.linen as nn
import jax
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np
import optax

from examples import data
import sgs_optax


class CNN(nn.Module):
  """Three 3x3 convs (the second strided) and a dense head, for 8x8 digits."""

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(16, (3, 3), name="conv1")(x))
    x = nn.relu(nn.Conv(16, (3, 3), strides=2, name="conv2")(x))
    x = nn.relu(nn.Conv(32, (3, 3), name="conv3")(x))
    return nn.Dense(10, name="head")(x.reshape((x.shape[0], -1)))


class Setup(NamedTuple):
  """The sharded model, optimizer and their shardings."""

  mesh: jax.sharding.Mesh
  params: Any
  opt_state: Any
  param_shardings: Any
  state_shardings: Any
  tx: optax.GradientTransformation


def parse_args(argv):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--steps", type=int, default=150)
  parser.add_argument("--batch-size", type=int, default=16)
  parser.add_argument("--refresh-every", type=int, default=3)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--mesh", choices=("explicit", "auto"),
                      default="explicit")
  parser.add_argument("--num-processes", type=int, default=1)
  parser.add_argument("--process-id", type=int, default=0)
  parser.add_argument("--coordinator", default="127.0.0.1:12355")
  parser.add_argument("--out", default=None, help="write results as .npz")
  return parser.parse_args(argv)


def param_spec(x: jax.Array) -> P:
  """FSDP: conv kernels (HWIO) split along their output channels."""
  if x.ndim == 4 and x.shape[-1] % jax.device_count() == 0:
    return P(None, None, None, "data")
  return P()


def setup(args, example: np.ndarray) -> Setup:
  """Params placed on the mesh, and an optimizer state sharded like them."""
  kind = {"explicit": jax.sharding.AxisType.Explicit,
          "auto": jax.sharding.AxisType.Auto}[args.mesh]
  mesh = jax.make_mesh((jax.device_count(),), ("data",), axis_types=(kind,))
  params = CNN().init(jax.random.key(args.seed), example)["params"]
  specs = jax.tree.map(param_spec, params)
  param_shardings = jax.tree.map(lambda spec: NamedSharding(mesh, spec),
                                 specs)
  params = jax.device_put(params, param_shardings)
  tx = optax.chain(sgs_optax.cdg(), sgs_optax.sgs(),
                   optax.add_decayed_weights(5e-4),
                   optax.sgd(0.05, momentum=0.9))
  # The SGS matrices are not params-shaped: they come out replicated.
  state_shardings = optax.tree_utils.tree_map_params(
      tx.init, lambda _, spec: NamedSharding(mesh, spec),
      jax.eval_shape(tx.init, params), specs,
      transform_non_params=lambda _: NamedSharding(mesh, P()))
  opt_state = jax.jit(tx.init, out_shardings=state_shardings)(params)
  return Setup(mesh, params, opt_state, param_shardings, state_shardings, tx)


def make_steps(s: Setup, explicit: bool) -> tuple[Callable, Callable]:
  """The jitted train step and refresh, with no out_shardings imposed."""
  model = CNN()
  replicated = NamedSharding(s.mesh, P())

  def whole(params):
    # Explicit meshes: each kernel gathered for its conv (FSDP); the
    # gradients come back sharded like the params.
    if not explicit:
      return params
    return jax.tree.map(lambda p: jax.sharding.reshard(p, replicated), params)

  @jax.jit
  def train_step(params, opt_state, x, y):
    def loss_fn(p):
      logits = model.apply({"params": whole(p)}, x)
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = s.tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  @jax.jit
  def refresh(params, opt_state, x):
    captured = sgs_optax.capture_conv_inputs(
        model, {"params": whole(params)}, x)
    return sgs_optax.refresh_scalings(opt_state, captured)

  return train_step, refresh


def global_batch(args, mesh, split: data.Split, step: int):
  """The same global batch on every process; each feeds its own rows."""
  rng = np.random.default_rng(args.seed + step)
  idx = rng.choice(len(split.x_train), args.batch_size, replace=False)
  rows = np.array_split(np.arange(args.batch_size), jax.process_count())[
      jax.process_index()]
  by_batch = NamedSharding(mesh, P("data"))
  make = lambda a: jax.make_array_from_process_local_data(
      by_batch, a[idx][rows], (args.batch_size,) + a.shape[1:])
  return make(split.x_train), make(split.y_train)


def sharding_kept(shardings, tree) -> bool:
  """Every leaf has the sharding its (possibly prefix) entry gives."""
  flags = jax.tree.map(
      lambda s, sub: all(x.sharding.is_equivalent_to(s, x.ndim)
                         for x in jax.tree.leaves(sub)), shardings, tree)
  return all(jax.tree.leaves(flags))


def results_of(s: Setup, params, opt_state, losses) -> dict[str, np.ndarray]:
  """Losses, kept shardings, and the gathered params and SGS matrices."""
  kept = sharding_kept((s.param_shardings, s.state_shardings),
                       (params, opt_state))
  results = {"losses": np.array(losses), "sharding_kept": np.array(kept)}
  gathered = multihost_utils.process_allgather(
      {"params": params, "scalings": sgs_optax.get_scalings(opt_state)},
      tiled=True)
  for path, leaf in jax.tree_util.tree_flatten_with_path(gathered)[0]:
    results[jax.tree_util.keystr(path, simple=True, separator="/")] = (
        np.asarray(leaf))
  return results


def main(argv=None):
  args = parse_args(argv)
  if args.num_processes > 1:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(args.coordinator, args.num_processes,
                               args.process_id, initialization_timeout=120)
  split = data.digits(seed=args.seed)
  s = setup(args, split.x_train[:1])
  train_step, refresh = make_steps(s, explicit=args.mesh == "explicit")
  params, opt_state, losses = s.params, s.opt_state, []
  for step in range(args.steps):
    x, y = global_batch(args, s.mesh, split, step)
    if step % args.refresh_every == 0:
      opt_state = refresh(params, opt_state, x)
    params, opt_state, loss = train_step(params, opt_state, x, y)
    losses.append(float(loss))
  results = results_of(s, params, opt_state, losses)
  if args.out and jax.process_index() == 0:
    np.savez(args.out, **results)
  shown = losses if len(losses) <= 8 else losses[::len(losses) // 6]
  print(f"process {jax.process_index()}/{jax.process_count()}, "
        f"{jax.device_count()} devices, {args.mesh} mesh: losses "
        f"{np.round(shown, 4).tolist()} ... final {losses[-1]:.4f}")
  if args.num_processes > 1:
    jax.distributed.shutdown()
  return results


if __name__ == "__main__":
  main(sys.argv[1:])
