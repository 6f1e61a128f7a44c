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
import sys

import jax


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


def main(argv=None):
  args = parse_args(argv)
  if args.num_processes > 1:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(args.coordinator, args.num_processes,
                               args.process_id, initialization_timeout=120)
  # Imported after initialisation: nothing may touch the backend before it.
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  from jax.sharding import NamedSharding, PartitionSpec as P  # pylint: disable=g-import-not-at-top
  from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top

  import sgs_optax  # pylint: disable=g-import-not-at-top

  class CNN(nn.Module):

    @nn.compact
    def __call__(self, x):
      x = nn.relu(nn.Conv(16, (3, 3), name="conv1")(x))
      x = nn.relu(nn.Conv(16, (3, 3), strides=2, name="conv2")(x))
      x = nn.relu(nn.Conv(32, (3, 3), name="conv3")(x))
      return nn.Dense(10, name="head")(x.reshape((x.shape[0], -1)))

  kind = {"explicit": jax.sharding.AxisType.Explicit,
          "auto": jax.sharding.AxisType.Auto}[args.mesh]
  mesh = jax.make_mesh((jax.device_count(),), ("data",), axis_types=(kind,))
  replicated = NamedSharding(mesh, P())
  by_batch = NamedSharding(mesh, P("data"))

  def param_spec(x):
    # Conv kernels (HWIO) split along their output channels, the rest whole.
    if x.ndim == 4 and x.shape[-1] % jax.device_count() == 0:
      return P(None, None, None, "data")
    return P()

  digits = load_digits()
  images = (digits.images / 16.0).astype(np.float32)[..., None]
  labels = digits.target.astype(np.int32)
  model = CNN()
  params = model.init(jax.random.key(args.seed), images[:1])["params"]
  specs = jax.tree.map(param_spec, params)
  shardings = jax.tree.map(lambda spec: NamedSharding(mesh, spec), specs)
  params = jax.device_put(params, shardings)
  tx = optax.chain(
      sgs_optax.cdg(),
      sgs_optax.sgs(),
      optax.add_decayed_weights(5e-4),
      optax.sgd(0.05, momentum=0.9),
  )
  state_shardings = optax.tree_utils.tree_map_params(
      tx.init, lambda _, spec: NamedSharding(mesh, spec),
      jax.eval_shape(tx.init, params), specs,
      transform_non_params=lambda _: replicated)
  opt_state = jax.jit(tx.init, out_shardings=state_shardings)(params)

  def whole(params):
    """FSDP: each kernel gathered for its conv (a no-op on auto meshes)."""
    if args.mesh == "auto":
      return params
    return jax.tree.map(lambda p: jax.sharding.reshard(p, replicated), params)

  def global_batch(step):
    """The same global batch on every process; each feeds its own rows."""
    rng = np.random.default_rng(args.seed + step)
    idx = rng.choice(len(images), args.batch_size, replace=False)
    rows = np.array_split(np.arange(args.batch_size), jax.process_count())[
        jax.process_index()]
    make = lambda a: jax.make_array_from_process_local_data(
        by_batch, a[idx][rows], (args.batch_size,) + a.shape[1:])
    return make(images), make(labels)

  # No out_shardings on the steps: that every output keeps its input's
  # sharding is checked at the end, not imposed.
  @jax.jit
  def train_step(params, opt_state, x, y):
    def loss_fn(p):
      logits = model.apply({"params": whole(p)}, x)
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  @jax.jit
  def refresh(params, opt_state, x):
    captured = sgs_optax.capture_conv_inputs(model, {"params": whole(params)},
                                             x)
    return sgs_optax.refresh_scalings(opt_state, captured)

  losses = []
  for step in range(args.steps):
    x, y = global_batch(step)
    if step % args.refresh_every == 0:
      opt_state = refresh(params, opt_state, x)
    params, opt_state, loss = train_step(params, opt_state, x, y)
    losses.append(float(loss))

  # The sharding trees may be prefixes (one sharding for a whole SGS table).
  kept = jax.tree.map(
      lambda s, sub: all(x.sharding.is_equivalent_to(s, x.ndim)
                         for x in jax.tree.leaves(sub)),
      (shardings, state_shardings), (params, opt_state))
  results = {"losses": np.array(losses),
             "sharding_kept": np.array(all(jax.tree.leaves(kept)))}
  gathered = multihost_utils.process_allgather(
      {"params": params, "scalings": sgs_optax.get_scalings(opt_state)},
      tiled=True)
  for path, leaf in jax.tree_util.tree_flatten_with_path(gathered)[0]:
    results[jax.tree_util.keystr(path, simple=True, separator="/")] = (
        np.asarray(leaf))
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
