"""Sharded optimizer states: derived shardings, kept shardings, checkpoints.

One subprocess on 8 simulated CPU devices (XLA_FLAGS must be set before jax
starts) runs every check on a (data=2, model=4) mesh, automatic and explicit,
and writes one JSON record per check; the tests below assert on them:

* `optax.tree_utils.tree_map_params` derives optimizer-state shardings from
  the params' for chains holding `sgs` (preset, array, learned) and `cdg`;
  `jax.jit(tx.init, out_shardings=...)` accepts them and a step pinned to
  them runs;
* an unpinned jitted step and an unpinned jitted refresh give every output
  leaf (updates, momentum, SGS matrices) the sharding of its input;
* a refresh computed on another device (`device=`, as on the host's CPU
  while an accelerator trains; here every device is a CPU) gives the same
  matrices and every leaf of the state keeps its sharding;
* an orbax checkpoint of the sharded state restores onto the same mesh with
  every leaf's sharding and value.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import sys

import jax
from jax.sharding import AxisType
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np
import optax
import pytest

import sgs_optax
from sgs_optax import _refresh

from _devices import run_on_devices

ROOT = pathlib.Path(__file__).resolve().parents[1]
MODES = {"auto": AxisType.Auto, "explicit": AxisType.Explicit}
SPECS = {"out": {"kernel": P(None, None, None, "model"), "bias": P()},
         "in": {"kernel": P(None, None, "model", None)},
         "both": {"kernel": P(None, None, "data", "model")},
         "head": {"kernel": P()}}
SHAPES = {"out": {"kernel": (3, 3, 8, 16), "bias": (16,)},
          "in": {"kernel": (3, 3, 16, 8)},
          "both": {"kernel": (3, 3, 8, 16)},
          "head": {"kernel": (16, 10)}}
GIVEN = np.array([[0.5, 1, 0.5], [1, 4, 1], [0.5, 1, 0.5]])


def chains():
  wd_sgd = (optax.add_decayed_weights(5e-4), optax.sgd(0.1, momentum=0.9))
  return {
      "sgs-acb": optax.chain(sgs_optax.sgs("acb"), *wd_sgd),
      "cdg+sgs-learned": optax.chain(sgs_optax.cdg(), sgs_optax.sgs(),
                                     *wd_sgd),
      "masked-array+adamw": optax.chain(
          optax.scale_by_adam(),
          sgs_optax.sgs(GIVEN, mask=lambda p: jax.tree.map(
              lambda x: x.ndim == 4, p)),
          optax.add_decayed_weights(1e-2), optax.scale_by_learning_rate(1e-3)),
  }


def make_tree(seed, mesh):
  leaves, treedef = jax.tree.flatten(
      SHAPES, is_leaf=lambda x: isinstance(x, tuple))
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  tree = jax.tree.unflatten(treedef, [
      jax.random.normal(k, s) for k, s in zip(keys, leaves)])
  shardings = jax.tree.map(lambda spec: NamedSharding(mesh, spec), SPECS)
  return jax.device_put(tree, shardings), shardings


def kept(shardings, tree):
  """Whether every leaf of `tree` has the sharding its prefix entry gives."""
  flags = jax.tree.map(
      lambda s, sub: all(x.sharding.is_equivalent_to(s, x.ndim)
                         for x in jax.tree.leaves(sub)), shardings, tree)
  return all(jax.tree.leaves(flags))


def state_shardings(tx, params, mesh):
  return optax.tree_utils.tree_map_params(
      tx.init, lambda _, spec: NamedSharding(mesh, spec),
      jax.eval_shape(tx.init, params), SPECS,
      transform_non_params=lambda _: NamedSharding(mesh, P()),
      is_leaf=lambda v: isinstance(v, optax.MaskedNode))


def captured_inputs(mesh):
  x = jax.nn.relu(jax.random.normal(jax.random.key(9), (8, 6, 6, 16)))
  x = jax.device_put(x, NamedSharding(mesh, P("data")))
  small = jax.device_put(x[..., :8], NamedSharding(mesh, P("data")))
  record = lambda v: sgs_optax.ConvInput(v, ((1, 1), (1, 1)),
                                         kernel_size=(3, 3))
  return {"out": {"kernel": record(small)}, "in": {"kernel": record(x)},
          "both": {"kernel": record(small)}}


@contextlib.contextmanager
def computed_on():
  """Lists the devices holding the result of each jitted refresh computation
  (before its matrices are moved back)."""
  inner, devices = _refresh._refreshed_jit, []

  def spy(*args, **kwargs):
    out = inner(*args, **kwargs)
    devices.append(sorted({d.id for x in jax.tree.leaves(out)
                           for d in x.devices()}))
    return out

  _refresh._refreshed_jit = spy
  try:
    yield devices
  finally:
    _refresh._refreshed_jit = inner


def chain_records(mode_name, mesh, name, tx):
  params, param_shardings = make_tree(0, mesh)
  grads, _ = make_tree(1, mesh)
  shardings = state_shardings(tx, params, mesh)
  state = jax.jit(tx.init, out_shardings=shardings)(params)
  updates, new_state = jax.jit(tx.update)(grads, state, params)
  pinned = jax.jit(tx.update, out_shardings=(param_shardings, shardings))
  pinned(grads, state, params)
  records = [dict(kind="step", mode=mode_name, chain=name,
                  # The check itself can fail: a sharded kernel is not P().
                  check_can_fail=not kept(
                      NamedSharding(mesh, P()), params["out"]["kernel"]),
                  init_kept=kept(shardings, state),
                  updates_kept=kept(param_shardings, updates),
                  state_kept=kept(shardings, new_state))]
  if name == "cdg+sgs-learned":
    refreshed = jax.jit(sgs_optax.refresh_scalings)(new_state,
                                                    captured_inputs(mesh))
    matrices = sgs_optax.get_scalings(refreshed)
    records.append(dict(
        kind="refresh", mode=mode_name, chain=name,
        state_kept=kept(shardings, refreshed),
        learned=not np.allclose(np.asarray(matrices["in"]["kernel"]), 1.0)))
    host = jax.devices()[-1]
    with computed_on() as devices:
      on_host = sgs_optax.refresh_scalings(
          new_state, captured_inputs(mesh), device=host)
    diffs = jax.tree.map(
        lambda a, b: float(np.abs(np.asarray(a) - np.asarray(b)).max()),
        sgs_optax.get_scalings(on_host), matrices)
    records.append(dict(
        kind="host_refresh", mode=mode_name, chain=name,
        state_kept=kept(shardings, on_host),
        max_diff=max(jax.tree.leaves(diffs)),
        matrices=len(jax.tree.leaves(diffs)),
        on_the_device=devices == [[host.id]]))
    records.append(checkpoint_record(mode_name, params, refreshed,
                                     param_shardings, shardings))
  return records


def checkpoint_record(mode_name, params, state, param_shardings, shardings):
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top

  directory = pathlib.Path(os.environ["SHARDING_TEST_DIR"]) / mode_name
  tree = {"params": params, "opt_state": state}
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(directory, tree)
    checkpointer.wait_until_finished()
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)
    restored = checkpointer.restore(directory, abstract)
  same = jax.tree.map(lambda a, b: bool(np.array_equal(np.asarray(a),
                                                       np.asarray(b))),
                      tree, restored)
  return dict(kind="checkpoint", mode=mode_name,
              values_equal=all(jax.tree.leaves(same)),
              structure_equal=(jax.tree.structure(tree) ==
                               jax.tree.structure(restored)),
              sharding_kept=kept({"params": param_shardings,
                                  "opt_state": shardings}, restored))


def worker(path):
  assert len(jax.devices()) == 8, jax.devices()
  records = []
  for mode_name, mode in MODES.items():
    mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(mode,) * 2)
    for name, tx in chains().items():
      records += chain_records(mode_name, mesh, name, tx)
  with open(path, "w") as f:
    json.dump(records, f, indent=1)


@pytest.fixture(scope="module")
def records(tmp_path_factory):
  directory = tmp_path_factory.mktemp("sharding")
  path = directory / "records.json"
  run_on_devices(__file__, str(path), SHARDING_TEST_DIR=str(directory))
  return json.loads(path.read_text())


def _of(records, kind):
  chosen = [r for r in records if r["kind"] == kind]
  assert {r["mode"] for r in chosen} == set(MODES)
  return chosen


@pytest.mark.slow
def test_tree_map_params_shardings_are_accepted_and_kept_by_every_chain(
    records):
  steps = _of(records, "step")
  assert {r["chain"] for r in steps} == set(chains())
  for r in steps:
    assert r["check_can_fail"], r
    assert r["init_kept"] and r["updates_kept"] and r["state_kept"], r


@pytest.mark.slow
def test_refresh_keeps_every_sharding_and_learns(records):
  for r in _of(records, "refresh"):
    assert r["state_kept"] and r["learned"], r


@pytest.mark.slow
def test_refresh_on_another_device_keeps_every_sharding(records):
  for r in _of(records, "host_refresh"):
    assert r["state_kept"] and r["on_the_device"], r
    assert r["max_diff"] < 1e-6 and r["matrices"] == 3, r


@pytest.mark.slow
def test_sharded_checkpoint_restores_values_and_shardings(records):
  for r in _of(records, "checkpoint"):
    assert r["values_equal"] and r["structure_equal"] and r["sharding_kept"], r


if __name__ == "__main__":
  worker(sys.argv[1])
