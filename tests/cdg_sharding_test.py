"""cdg on sharded kernels: values, kept shardings, no whole kernel per device.

One subprocess on 8 simulated CPU devices (XLA_FLAGS must be set before jax
starts) runs every check and writes one JSON record per check; the tests
below assert on those records. References are dense numpy solves
(`cdg_test.dense_inverse_metric`), never the FFT code under test.
"""

from __future__ import annotations

import json
import pathlib
import sys

import jax
import jax.numpy as jnp
from jax.sharding import AxisType
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np
import optax
import pytest

from benchmarks import cdg_sharding
from sgs_optax import _cdg
from sgs_optax._cdg import cdg

from _devices import run_on_devices
from cdg_test import apply_along
from cdg_test import dense_inverse_metric

ROOT = pathlib.Path(__file__).resolve().parents[1]
BOUNDARIES = ("periodic", "neumann")
MODES = {"auto": AxisType.Auto, "explicit": AxisType.Explicit}
LAM = 1.5
LR = 0.1

# name: (layout, shape, spec, dtype). Mesh (data=2, model=4). Small kernels,
# every sharded axis and layout, and the cases with too few fibres per device
# for the swap (a 3-channel stem, a depthwise kernel), which are padded.
VALUE_CASES = {
    "hwio_out": ("HWIO", (3, 3, 8, 16), P(None, None, None, "model")),
    "hwio_in": ("HWIO", (3, 3, 8, 16), P(None, None, "model", None)),
    "hwio_both": ("HWIO", (3, 3, 8, 16), P(None, None, "data", "model")),
    "hwio_out8": ("HWIO", (3, 3, 8, 16), P(None, None, None,
                                           ("data", "model"))),
    "hwio_swapped": ("HWIO", (3, 3, 8, 16), P(None, None, "model", "data")),
    "hwio_repl": ("HWIO", (3, 3, 8, 16), P()),
    "oihw_out": ("OIHW", (16, 8, 3, 3), P("model")),
    "oihw_in": ("OIHW", (16, 8, 3, 3), P(None, "model")),
    "oihw_both": ("OIHW", (16, 8, 3, 3), P("model", "data")),
    "oihw_repl": ("OIHW", (16, 8, 3, 3), P()),
    "stem_out": ("HWIO", (3, 3, 3, 16), P(None, None, None, "model")),
    "depthwise_out": ("HWIO", (3, 3, 1, 16), P(None, None, None, "model")),
    "dense_out": ("IO", (8, 16), P(None, "model")),
    "bf16_out": ("HWIO", (3, 3, 8, 16), P(None, None, None, "model"),
                 jnp.bfloat16),
}

# Realistic kernels for the memory and HLO checks.
MEMORY_CASES = {
    "hwio_out": ("HWIO", (3, 3, 64, 256), P(None, None, None, "model")),
    "hwio_both": ("HWIO", (3, 3, 64, 256), P(None, None, "data", "model")),
    "oihw_out": ("OIHW", (256, 64, 3, 3), P("model")),
    "stem_out": ("HWIO", (3, 3, 3, 64), P(None, None, None, "model")),
    "bf16_out8": ("HWIO", (3, 3, 64, 256), P(None, None, None,
                                             ("data", "model")),
                  jnp.bfloat16),
}


# The sharding code depends on the solver and the boundary (the solve) and
# on whether the metric is reweighted_l2 (a mean, no swap); sobolev and
# reweighted_sobolev differ only in replicated operands. So every case runs
# with sobolev under every solver (None is "tridiagonal" on CPU) and with
# reweighted_l2, and a few with reweighted_sobolev (None is "fft" on CPU).
SOME = ("hwio_out", "oihw_both", "stem_out")
VALUE_RUNS = [
    (metric, boundary, solver, names)
    for boundary in BOUNDARIES
    for metric, solver, names in (
        ("sobolev", None, tuple(VALUE_CASES)),
        ("sobolev", "fft", tuple(VALUE_CASES)),
        ("sobolev", "dense", tuple(VALUE_CASES)),
        ("reweighted_l2", None, tuple(VALUE_CASES)),
        ("reweighted_sobolev", None, SOME),
        ("reweighted_sobolev", "dense", SOME),
    )
]
TRANSFORM_SOLVERS = (None, "dense")
# (case, metric, boundary, solver, traced smoothing).
MEMORY_RUNS = [
    ("hwio_out", "sobolev", "periodic", None, False),
    ("hwio_out", "sobolev", "periodic", "fft", False),
    ("hwio_out", "reweighted_l2", "periodic", None, False),
    *((name, "sobolev", "neumann", None, False) for name in MEMORY_CASES),
    *((name, "sobolev", "neumann", "fft", False) for name in MEMORY_CASES),
    *((name, "sobolev", "periodic", "dense", False) for name in MEMORY_CASES),
    ("hwio_out", "reweighted_sobolev", "neumann", "dense", False),
    # Built in the graph: the operator is among the temporaries.
    ("hwio_out", "sobolev", "periodic", "dense", True),
]


def _case(spec):
  layout, shape, pspec, *dtype = spec
  return layout, shape, pspec, (dtype[0] if dtype else jnp.float32)


def _reference(g, layout, metric, boundary):
  axis = layout.index("O")
  matrix = dense_inverse_metric(g.shape[axis], LAM, metric, boundary)
  return apply_along(matrix, g, axis)


def _put(mesh, cases, seed):
  rng = np.random.default_rng(seed)
  grads, params = {}, {}
  for name, spec in cases.items():
    _, shape, pspec, dtype = _case(spec)
    sharding = NamedSharding(mesh, pspec)
    grads[name] = jax.device_put(
        jnp.asarray(rng.standard_normal(shape), dtype), sharding)
    params[name] = jax.device_put(jnp.zeros(shape, dtype), sharding)
  return grads, params


def _excess(out, want, dtype):
  """The largest |out - want| in units of the allowed error (<= 1 passes)."""
  # bfloat16: the reference is computed from the rounded input; the result
  # (and -lr times it) is rounded to bfloat16, up to 2^-9 relative each.
  rtol = 2.0**-6 if dtype == jnp.bfloat16 else 1e-5
  out = np.asarray(out.astype(jnp.float32), np.float64)
  return float(np.max(np.abs(out - want) / (1e-5 + rtol * np.abs(want))))


def value_records(mode, metric, boundary, solver, names):
  """One jitted chain(cdg, sgd+momentum) step over the named VALUE_CASES."""
  mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(mode,) * 2)
  cases = {name: VALUE_CASES[name] for name in names}
  layouts = {name: spec[0] for name, spec in cases.items()}
  tx = optax.chain(
      cdg(LAM, metric=metric, boundary=boundary, solver=solver,
          kernel_layout=layouts),
      optax.sgd(LR, momentum=0.9))
  with jax.set_mesh(mesh):
    grads, params = _put(mesh, cases, seed=0)
    state = tx.init(params)
    updates, new_state = jax.jit(tx.update)(grads, state, params)
  momentum = new_state[1][0].trace
  records = []
  for name, spec in cases.items():
    layout, _, _, _dtype = _case(spec)
    g = np.asarray(grads[name].astype(jnp.float32), np.float64)
    want = _reference(g, layout, metric, boundary)
    for what, out, scale in (("update", updates[name], -LR),
                             ("momentum", momentum[name], 1.0)):
      records.append(_record(out, scale * want, grads[name], case=name,
                             what=what, metric=metric, boundary=boundary,
                             solver=solver))
  return records


def _record(out, want, like, **info):
  """A value record: ``out`` vs ``want``, dtype and sharding of ``like``."""
  return dict(
      kind="value", **info, excess=_excess(out, want, like.dtype),
      dtype=str(out.dtype), want_dtype=str(like.dtype),
      sharding=str(out.sharding.spec), want_sharding=str(like.sharding.spec),
      same_sharding=out.sharding.is_equivalent_to(like.sharding, out.ndim))


def transform_records(mode, solver):
  """cdg under inject_hyperparams, vmap and grad, without a mesh context."""
  mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(mode,) * 2)
  rng = np.random.default_rng(2)
  put = lambda shape, spec: jax.device_put(
      jnp.asarray(rng.standard_normal(shape), jnp.float32),
      NamedSharding(mesh, spec))
  out_spec = P(None, None, None, "model")
  g, w = put((3, 3, 8, 16), out_spec), put((3, 3, 8, 16), out_spec)
  stacked = put((2, 3, 3, 8, 16), P(None, *out_spec))
  ref = lambda x: _reference(np.asarray(x, np.float64), "HWIO", "sobolev",
                             "neumann")
  tx = optax.inject_hyperparams(cdg, static_args=("boundary", "solver"))(
      smoothing=LAM, boundary="neumann", solver=solver)
  injected = jax.jit(tx.update)({"k": g}, tx.init({"k": g}))[0]["k"]
  plain = lambda x: cdg(LAM, boundary="neumann", solver=solver).update(
      {"k": x}, None)[0]["k"]
  vmapped = jax.jit(jax.vmap(plain))(stacked)
  # G^{-1} is symmetric: the gradient of <G^{-1} x, w> is G^{-1} w.
  grad = jax.jit(jax.grad(lambda x, w: jnp.sum(plain(x) * w)))(g, w)
  want_vmapped = np.stack([ref(x) for x in np.asarray(stacked)])
  # On automatic meshes the derivative's sharding is left to XLA (see
  # `_auto_partitioned_solve`).
  grad_record = _record(grad, ref(w), g, case="grad", solver=solver)
  if mode == AxisType.Auto:
    grad_record["same_sharding"] = None
  return [_record(injected, ref(g), g, case="inject_hyperparams",
                  solver=solver),
          _record(vmapped, want_vmapped, stacked, case="vmap", solver=solver),
          grad_record]


def memory_record(mode, name, metric, boundary, solver, traced):
  """Per-device temporaries and collectives of one compiled cdg update."""
  mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(mode,) * 2)
  layout, shape, _, dtype = _case(MEMORY_CASES[name])
  make = lambda lam: cdg(lam, metric=metric, boundary=boundary, solver=solver,
                         kernel_layout=layout)
  update = lambda g, lam: make(lam).update(g, optax.EmptyState())[0]
  with jax.set_mesh(mesh):
    grads, _ = _put(mesh, {name: MEMORY_CASES[name]}, seed=1)
    if traced:
      compiled = jax.jit(update).lower(grads, LAM).compile()
      out = compiled(grads, LAM)[name]
    else:
      compiled = jax.jit(lambda g: update(g, LAM)).lower(grads).compile()
      out = compiled(grads)[name]
  g = np.asarray(grads[name].astype(jnp.float32), np.float64)
  want = _reference(g, layout, metric, boundary)
  channels = shape[layout.index("O")]
  return dict(
      kind="memory", case=name, metric=metric, boundary=boundary,
      solver=solver, traced=traced,
      kernel_bytes=int(np.prod(shape)) * jnp.dtype(dtype).itemsize,
      # The dense solver's O x O operator (float32) is not counted.
      operator_bytes=4 * channels**2 if solver == "dense" else 0,
      temp_bytes=int(compiled.memory_analysis().temp_size_in_bytes),
      all_gather="all-gather" in compiled.as_text(),
      excess=_excess(out, want, dtype),
      same_sharding=out.sharding.is_equivalent_to(grads[name].sharding,
                                                  out.ndim))


def worker(path):
  assert len(jax.devices()) == 8, jax.devices()
  records = []
  for mode_name, mode in MODES.items():
    for metric, boundary, solver, cases in VALUE_RUNS:
      for r in value_records(mode, metric, boundary, solver, cases):
        records.append(dict(r, mode=mode_name))
    for solver in TRANSFORM_SOLVERS:
      for r in transform_records(mode, solver):
        records.append(dict(r, mode=mode_name))
    for run in MEMORY_RUNS:
      records.append(dict(memory_record(mode, *run), mode=mode_name))
  # The benchmark behind the README's figures, on one small kernel.
  rows = cdg_sharding.run([(3, 3, 8, 16)], ["neumann"])
  print(cdg_sharding.table(rows))
  records += [dict(kind="benchmark", **r) for r in rows]
  with open(path, "w") as f:
    json.dump(records, f, indent=1)


@pytest.fixture(scope="module")
def records(tmp_path_factory):
  path = tmp_path_factory.mktemp("cdg_sharding") / "records.json"
  run_on_devices(__file__, str(path))
  return json.loads(path.read_text())


def _of(records, kind):
  chosen = [r for r in records if r["kind"] == kind]
  assert chosen
  return chosen


@pytest.mark.slow
def test_benchmark_separates_swap_from_gather(records):
  rows = [r for r in records if r["kind"] == "benchmark"]
  # Both mesh kinds, each solver.
  assert len(rows) == 2 * len(cdg_sharding.SOLVERS)
  for r in rows:
    assert r["cdg"]["sharding_kept"] and r["gathered"]["sharding_kept"]
    assert not r["cdg"]["all_gather"] and r["gathered"]["all_gather"]
    assert r["cdg"]["temp_bytes"] - r["operator_bytes"] < r["kernel_bytes"]
    assert r["gathered"]["temp_bytes"] > r["kernel_bytes"]


@pytest.mark.slow
def test_every_case_ran(records):
  # Two mesh kinds; an update and a momentum record per value case.
  leaves = sum(len(names) for *_, names in VALUE_RUNS)
  assert len(_of(records, "value")) == 2 * (
      2 * leaves + 3 * len(TRANSFORM_SOLVERS))
  assert len(_of(records, "memory")) == 2 * len(MEMORY_RUNS)


@pytest.mark.slow
def test_values_match_dense_reference(records):
  bad = [r for r in records if "excess" in r and not r["excess"] <= 1]
  assert not bad, bad[:5]


@pytest.mark.slow
def test_outputs_keep_the_input_sharding_and_dtype(records):
  bad = [r for r in records if r.get("same_sharding") is False]
  assert not bad, bad[:5]
  bad = [r for r in _of(records, "value") if r["dtype"] != r["want_dtype"]]
  assert not bad, bad[:5]


@pytest.mark.slow
def test_no_device_holds_a_whole_kernel(records):
  bad = [r for r in _of(records, "memory")
         if r["temp_bytes"] - r["operator_bytes"] >= r["kernel_bytes"]
         or r["all_gather"]]
  assert not bad, bad
  # Every solver ran on the (3, 3, 64, 256) kernel sharded on its output
  # channels, on both mesh kinds.
  ran = {(r["mode"], r["solver"]) for r in _of(records, "memory")
         if r["case"] == "hwio_out"}
  assert ran == {(m, s) for m in MODES for s in (None, "fft", "dense")}


def test_uneven_channel_shards_are_gathered_not_swapped():
  # jax refuses uneven shardings of inputs, but XLA may give one to an
  # intermediate; its padding must not enter an FFT.
  mesh = jax.sharding.AbstractMesh((2, 4), ("data", "model"))
  for channels, want in ((6, None), (16, "model")):
    x = jax.ShapeDtypeStruct(
        (3, 3, 8, channels), jnp.float32,
        sharding=NamedSharding(mesh, P(None, None, "data", "model")))
    _, lower, out, (arg, _) = _cdg._partition("fft", "periodic", mesh,
                                                  (x, None), None)
    assert out.spec == arg.spec == P(None, None, "data", want)
    assert lower.keywords["channel_axes"] == want


if __name__ == "__main__":
  worker(sys.argv[1])
