"""Tests for sgs_optax._cdg (Channel-Directed Gradients).

Golden values come from dense n x n matrices built from each metric's
definition (the Laplacian written out entry by entry, inverted by numpy) and
applied with numpy, never from the solvers under test.
"""

import functools
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from sgs_optax import sgs
from sgs_optax._cdg import cdg
from sgs_optax._cdg import channel_directed_gradients

METRICS = ("sobolev", "reweighted_l2", "reweighted_sobolev")
BOUNDARIES = ("periodic", "neumann")
SOLVERS = (None, "fft", "dense", "tridiagonal")
LAYOUT_AXIS = {"HWIO": 3, "OIHW": 0}


def solvers_for(metric):
  """The solvers ``metric`` accepts: "tridiagonal" solves sobolev only."""
  return [s for s in SOLVERS if s != "tridiagonal" or metric == "sobolev"]


# ----------------------------------------------------------------------------
# Dense references.


def dense_laplacian(n, boundary):
  """The channel Laplacian as a dense matrix, from its definition."""
  lap = np.zeros((n, n))
  if boundary == "periodic":
    for i in range(n):
      lap[i, i] -= 2.0
      lap[i, (i + 1) % n] += 1.0
      lap[i, (i - 1) % n] += 1.0
  else:  # Reflecting ends: the ghost value equals the end value.
    for i in range(n):
      for k in (i - 1, i + 1):
        if 0 <= k < n:
          lap[i, k] += 1.0
          lap[i, i] -= 1.0
  return lap


def dense_inverse_metric(n, lam, metric, boundary):
  lap = dense_laplacian(n, boundary)
  eye = np.eye(n)
  p0 = np.full((n, n), 1.0 / n)
  if metric == "sobolev":
    return np.linalg.inv(eye - lam * lap)
  if metric == "reweighted_l2":
    return p0 + (eye - p0) / lam
  mu_1 = np.sort(np.linalg.eigvalsh(-lap))[1]
  return p0 + mu_1 / lam * np.linalg.pinv(-lap)


def apply_along(matrix, g, axis):
  moved = np.moveaxis(np.asarray(g, np.float64), axis, 0)
  return np.moveaxis(np.tensordot(matrix, moved, axes=1), 0, axis)


def randn(seed, shape):
  # numpy, not jax.random: eager jax.random compiles once per shape.
  rng = np.random.default_rng(seed)
  return jnp.asarray(rng.standard_normal(shape), jnp.float32)


def kernel_shape(layout, n, spatial=(3, 2), c_in=2):
  sizes = {"H": spatial[0], "W": spatial[1], "I": c_in, "O": n}
  return tuple(sizes[c] for c in layout)


def run(tx, updates, params=None, jit=True):
  update = jax.jit(tx.update) if jit else tx.update
  out, _ = update(updates, tx.init(params or updates), params)
  return out


# ----------------------------------------------------------------------------
# Correctness against the dense solve.


# Kernels of both layouts and widths whose tridiagonal blocks differ: one
# block (5), several (6: 2 blocks of 3; 64: 8 of 8; 100: 10 of 10).
def _smoothed(lam, g, **kwargs):
  """`cdg(lam, **kwargs)` applied to the single gradient `g`, for vmapping."""
  return cdg(lam, **kwargs).update({"k": g}, None)[0]["k"]


SOLVE_CASES = {
    "hwio5": ("HWIO", 5), "hwio6": ("HWIO", 6), "oihw6": ("OIHW", 6),
    "hwio64": ("HWIO", 64), "oihw100": ("OIHW", 100),
}


def _solve_case(metric, boundary, lam, dtype, seed=0, names=SOLVE_CASES):
  rng = np.random.default_rng(seed)
  grads, layouts, want = {}, {}, {}
  for name in names:
    layout, n = SOLVE_CASES[name]
    g = rng.standard_normal(kernel_shape(layout, n, spatial=(2, 3)))
    grads[name], layouts[name] = jnp.asarray(g, dtype), layout
    want[name] = apply_along(dense_inverse_metric(n, lam, metric, boundary),
                             g, LAYOUT_AXIS[layout])
  return grads, layouts, want


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("boundary", BOUNDARIES)
def test_every_solver_matches_dense_solve_float64(metric, boundary):
  lam = 1.7
  with jax.enable_x64(True):
    grads, layouts, want = _solve_case(metric, boundary, lam, jnp.float64)
    for solver in solvers_for(metric):
      tx = cdg(lam, metric=metric, boundary=boundary, solver=solver,
               kernel_layout=layouts)
      out = run(tx, grads)
      for name in grads:
        assert out[name].dtype == jnp.float64
        np.testing.assert_allclose(np.asarray(out[name]), want[name], rtol=0,
                                   atol=1e-10, err_msg=f"{solver} {name}")


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("boundary", BOUNDARIES)
def test_solvers_agree_to_relative_1e5_in_float32(metric, boundary):
  # Relative to the largest value of each kernel's update.
  lam = 0.6 if metric == "sobolev" else 3.0
  grads, layouts, want = _solve_case(metric, boundary, lam, jnp.float32,
                                     seed=1, names=("oihw6", "hwio64",
                                                    "oihw100"))
  outs = {solver: run(cdg(lam, metric=metric, boundary=boundary,
                          solver=solver, kernel_layout=layouts), grads)
          for solver in solvers_for(metric)}
  for solver, out in outs.items():
    for name in grads:
      scale = np.max(np.abs(want[name]))
      for other in (want[name], np.asarray(outs["fft"][name], np.float64)):
        error = np.max(np.abs(np.asarray(out[name], np.float64) - other))
        assert error <= 1e-5 * scale, (solver, name, error / scale)


@pytest.mark.parametrize("boundary", BOUNDARIES)
def test_tridiagonal_blocks_over_widths_and_strengths(boundary):
  # Every block plan (one block, several, prime widths) and strengths from
  # almost none to almost the channel mean, in one compile per width.
  lams = np.array([1e-4, 0.3, 1.0, 25.0, 1e4])
  rng = np.random.default_rng(5)
  with jax.enable_x64(True):
    for n in (2, 3, 7, 12, 97, 128):
      g = rng.standard_normal((4, n))
      out = jax.jit(jax.vmap(functools.partial(
          _smoothed, g=g, boundary=boundary, solver="tridiagonal",
          kernel_layout={"k": "IO"})))(lams)
      for lam, got in zip(lams, np.asarray(out)):
        want = g @ dense_inverse_metric(n, lam, "sobolev", boundary).T
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-9,
                                   err_msg=f"n={n} lam={lam}")


def _op_counts(text):
  """How many FFTs and matrix products a compiled (HLO) text holds."""
  return (len(re.findall(r"\bfft\(", text)),
          len(re.findall(r"\bdot\(", text)))


@pytest.mark.parametrize("boundary", BOUNDARIES)
def test_compiled_operations_of_each_solver(boundary):
  g = {"a": randn(0, (3, 3, 4, 16)), "b": randn(1, (3, 3, 2, 8))}

  def counts(metric, solver):
    tx = cdg(metric=metric, boundary=boundary, solver=solver)
    f = jax.jit(lambda g: tx.update(g, None)[0])
    return _op_counts(f.lower(g).compile().as_text())

  for metric in ("sobolev", "reweighted_sobolev"):
    ffts, dots = counts(metric, "fft")
    assert ffts >= 2 and dots == 0  # Forward and inverse per kernel.
    assert counts(metric, "dense") == (0, 2)  # One product per kernel.
  tridiagonal = counts("sobolev", "tridiagonal")
  assert tridiagonal[0] == 0 and tridiagonal[1] >= 2
  # solver=None on CPU: the measured fastest exact solver.
  assert counts("sobolev", None) == tridiagonal
  assert counts("reweighted_sobolev", None) == counts("reweighted_sobolev",
                                                      "fft")
  assert counts("reweighted_l2", "dense") == (0, 0)  # A closed form.


def test_default_on_cpu_avoids_tridiagonal_blocks_of_a_prime_width():
  # 131 channels: one block of 131, a dense product in disguise.
  g = {"k": randn(3, (1, 1, 2, 131))}
  text = {s: jax.jit(lambda g, s=s: cdg(solver=s).update(g, None)[0]).lower(
      g).compile().as_text() for s in (None, "fft")}
  assert _op_counts(text[None]) == _op_counts(text["fft"])
  assert _op_counts(text[None])[0] >= 2


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
def test_default_solver_on_accelerators_is_dense(platform):
  # Lowered for a platform this machine lacks: platform_dependent resolves
  # to the default branch, one product per kernel and no FFT.
  g = {"a": randn(0, (3, 3, 4, 16)), "b": randn(1, (3, 3, 2, 8))}
  for metric in ("sobolev", "reweighted_sobolev"):
    f = jax.jit(lambda g, metric=metric: cdg(metric=metric).update(g, None)[0])
    text = jax.export.export(f, platforms=[platform])(g).mlir_module()
    assert text.count("stablehlo.dot_general") == 2, metric
    assert "stablehlo.fft" not in text, metric


def test_dense_operator_built_once_per_channel_count():
  # A traced smoothing builds the operator in the graph: one product builds
  # it per distinct width, one applies it per kernel.
  g = {"a": randn(0, (3, 3, 2, 16)), "b": randn(1, (3, 3, 4, 16)),
       "c": randn(2, (3, 3, 2, 8))}
  f = lambda g, lam: cdg(lam, solver="dense").update(g, None)[0]
  text = jax.jit(f).lower(g, 1.0).as_text()
  assert text.count("stablehlo.dot_general") == 2 + 3
  out = jax.jit(f)(g, 1.0)
  for name, x in g.items():
    want = apply_along(dense_inverse_metric(x.shape[-1], 1.0, "sobolev",
                                            "periodic"), x, 3)
    np.testing.assert_allclose(out[name], want, atol=1e-5)


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("boundary", BOUNDARIES)
def test_mean_over_output_channels_preserved(metric, boundary):
  g = np.random.default_rng(0).standard_normal((2, 3, 4, 7))
  with jax.enable_x64(True):
    out = run(cdg(3.0, metric=metric, boundary=boundary), {"k": g})["k"]
    np.testing.assert_allclose(
        np.asarray(out).mean(-1), g.mean(-1), rtol=0, atol=1e-13
    )


@pytest.mark.parametrize("boundary", BOUNDARIES)
def test_sobolev_small_smoothing_is_identity(boundary):
  g = np.random.default_rng(1).standard_normal((3, 3, 2, 8))
  with jax.enable_x64(True):
    out = run(cdg(1e-12, boundary=boundary), {"k": g})["k"]
    np.testing.assert_allclose(np.asarray(out), g, rtol=0, atol=1e-10)


def test_reweighted_l2_smoothing_one_is_identity():
  g = np.random.default_rng(2).standard_normal((3, 3, 2, 8))
  with jax.enable_x64(True):
    out = run(cdg(1.0, metric="reweighted_l2"), {"k": g})["k"]
    np.testing.assert_allclose(np.asarray(out), g, rtol=0, atol=1e-14)


@pytest.mark.parametrize("layout", ["HWIO", "OIHW"])
def test_sobolev_periodic_alternating_fibre(layout):
  lam, n = 0.75, 6
  fibre_shape = [1, 1, 1, 1]
  fibre_shape[LAYOUT_AXIS[layout]] = n
  sign = ((-1.0) ** np.arange(n)).reshape(fibre_shape)
  g = np.broadcast_to(sign, kernel_shape(layout, n)).astype(np.float32)
  out = run(cdg(lam, kernel_layout=layout), {"k": jnp.asarray(g)})["k"]
  np.testing.assert_allclose(np.asarray(out), g / (1 + 4 * lam), atol=1e-6)


@pytest.mark.parametrize("boundary", BOUNDARIES)
def test_sobolev_never_increases_fibre_norm(boundary):
  rng = np.random.default_rng(3)
  grads = {
      n: (rng.standard_normal((4, 5, 3, n))
          * rng.uniform(0.1, 10, (4, 5, 3, 1))).astype(np.float32)
      for n in (2, 3, 16, 33)
  }
  # A traced lambda: one compilation for all strengths.
  update = jax.jit(lambda g, lam: cdg(lam, boundary=boundary).update(g, None))
  for lam in (0.01, 1.0, 50.0):
    out, _ = update(grads, jnp.float32(lam))
    for n, g in grads.items():
      before = np.linalg.norm(g, axis=-1)
      after = np.linalg.norm(np.asarray(out[n]), axis=-1)
      assert np.all(after <= before * (1 + 1e-6)), (n, lam)


def test_reweighted_sobolev_lowest_mode_gain_is_one_over_lambda():
  # Width-independent: the slowest periodic mode gains exactly 1/lam.
  lam = 2.0
  for n in (8, 64):
    g = np.cos(2 * np.pi * np.arange(n) / n)[None, None, None, :]
    out = run(cdg(lam, metric="reweighted_sobolev"), {"k": g})["k"]
    np.testing.assert_allclose(np.asarray(out), g / lam, atol=1e-6)


# ----------------------------------------------------------------------------
# Dtypes, jit, hyperparameter injection, optax wrappers.


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_dtype_and_shape_preserved_under_jit(dtype):
  g32 = randn(0, (3, 3, 4, 8))
  g = g32.astype(dtype)
  out = run(cdg(), {"k": g, "b": jnp.ones((8,), dtype)})
  assert out["k"].dtype == jnp.dtype(dtype) and out["k"].shape == g.shape
  # Computed in float32 from the (already rounded) low-precision input.
  ref = run(cdg(), {"k": g.astype(jnp.float32)})["k"].astype(dtype)
  np.testing.assert_array_equal(
      np.asarray(out["k"], np.float32), np.asarray(ref, np.float32)
  )


def test_float64_stays_float64():
  with jax.enable_x64(True):
    g = jnp.ones((3, 3, 2, 4), jnp.float64).at[..., 0].set(2.0)
    for metric in METRICS:
      out = run(cdg(metric=metric, boundary="neumann"), {"k": g})["k"]
      assert out.dtype == jnp.float64 and out.shape == g.shape


@pytest.mark.parametrize("boundary", BOUNDARIES)
def test_vmap_over_kernels_and_over_smoothing(boundary):
  rng = np.random.default_rng(13)
  g = rng.standard_normal((3, 2, 2, 2, 5))
  lams = np.array([0.5, 1.0, 2.0])
  apply = lambda x, lam: cdg(lam, boundary=boundary).update(
      {"k": x}, None)[0]["k"]
  dense = lambda lam, x: apply_along(
      dense_inverse_metric(5, lam, "sobolev", boundary), x, 3)
  with jax.enable_x64(True):
    over_kernels = jax.jit(jax.vmap(apply, in_axes=(0, None)))(g, 1.7)
    over_lams = jax.jit(jax.vmap(apply, in_axes=(None, 0)))(g[0], lams)
  np.testing.assert_allclose(
      over_kernels, np.stack([dense(1.7, x) for x in g]), atol=1e-12)
  np.testing.assert_allclose(
      over_lams, np.stack([dense(lam, g[0]) for lam in lams]), atol=1e-12)


@pytest.mark.parametrize("metric", ["sobolev", "reweighted_sobolev"])
@pytest.mark.parametrize("boundary", BOUNDARIES)
def test_derivatives_through_the_transform(metric, boundary):
  rng = np.random.default_rng(14)
  x, w, tx = (rng.standard_normal((2, 2, 3, 6)) for _ in range(3))
  lam, h = 1.7, 1e-6

  def loss(x, lam):
    tx_ = cdg(lam, metric=metric, boundary=boundary)
    return jnp.sum(tx_.update({"k": x}, None)[0]["k"] * w)

  def dense_loss(x, lam):
    matrix = dense_inverse_metric(6, lam, metric, boundary)
    return np.sum(apply_along(matrix, x, 3) * w)

  with jax.enable_x64(True):
    grad_x, grad_lam = jax.jit(jax.grad(loss, argnums=(0, 1)))(x, lam)
    _, tangent = jax.jit(
        lambda x, lam: jax.jvp(loss, (x, lam), (tx, 1.0)))(x, lam)
  # G^{-1} is symmetric, so the gradient in x is G^{-1} w.
  np.testing.assert_allclose(
      grad_x, apply_along(dense_inverse_metric(6, lam, metric, boundary), w,
                          3), atol=1e-12)
  want_lam = (dense_loss(x, lam + h) - dense_loss(x, lam - h)) / (2 * h)
  np.testing.assert_allclose(grad_lam, want_lam, rtol=1e-6)
  np.testing.assert_allclose(
      tangent, dense_loss(tx, lam) + want_lam, rtol=1e-6)


def test_inject_hyperparams_with_traced_smoothing():
  g = {"k": randn(1, (3, 3, 2, 6))}
  for metric, lam in (("sobolev", 0.5), ("reweighted_sobolev", 3.0)):
    tx = optax.inject_hyperparams(cdg, static_args=("metric",))(
        smoothing=lam, metric=metric
    )
    state = tx.init(g)
    out, state = jax.jit(tx.update)(g, state, g)
    np.testing.assert_allclose(
        out["k"], run(cdg(lam, metric=metric), g)["k"], rtol=1e-6, atol=1e-6
    )
    # The hyperparameter can be changed in the state without retracing.
    state.hyperparams["smoothing"] = jnp.asarray(2 * lam, jnp.float32)
    out, _ = jax.jit(tx.update)(g, state, g)
    np.testing.assert_allclose(
        out["k"], run(cdg(2 * lam, metric=metric), g)["k"], atol=1e-6
    )


# A traced smoothing outside the accepted range: (metric,
# allow_amplification, value, the smoothing it must act as). "mean" is the
# limit lam -> inf: the channel-mean projection.
TRACED_RULE = [
    ("sobolev", False, -0.25, 0.0),
    ("sobolev", False, 0.0, 0.0),
    ("sobolev", False, math.nan, 0.0),
    ("sobolev", False, -math.inf, 0.0),
    ("sobolev", False, math.inf, "mean"),
    ("sobolev", False, 0.01, 0.01),  # Valid: unchanged.
    ("reweighted_l2", False, 0.01, 1.0),
    ("reweighted_l2", False, 0.0, 1.0),
    ("reweighted_l2", False, -3.0, 1.0),
    ("reweighted_l2", False, math.nan, 1.0),
    ("reweighted_l2", False, math.inf, "mean"),
    ("reweighted_l2", True, 0.5, 0.5),
    ("reweighted_l2", True, 0.0, 1.0),
    ("reweighted_sobolev", False, 0.01, 1.0),
    ("reweighted_sobolev", False, -0.25, 1.0),
    ("reweighted_sobolev", False, math.nan, 1.0),
    ("reweighted_sobolev", False, math.inf, "mean"),
    ("reweighted_sobolev", True, 0.5, 0.5),
    ("reweighted_sobolev", True, -1.0, 1.0),
]


def _rule_reference(g, metric, boundary, acts_as):
  n = g.shape[-1]
  if acts_as == "mean":
    matrix = np.full((n, n), 1.0 / n)
  elif acts_as == 0.0:
    matrix = np.eye(n)  # sobolev at lam = 0: no smoothing.
  else:
    matrix = dense_inverse_metric(n, acts_as, metric, boundary)
  return apply_along(matrix, g, 3)


@pytest.mark.parametrize("boundary", BOUNDARIES)
@pytest.mark.parametrize("metric", METRICS)
def test_invalid_traced_smoothing_follows_the_rule(metric, boundary):
  g = np.random.default_rng(21).standard_normal((2, 3, 2, 12)) * 10
  cases = [c for c in TRACED_RULE if c[0] == metric]
  for solver in solvers_for(metric):
    for allow in (False, True):
      values = [v for m, a, v, _ in cases if a == allow]
      if not values:
        continue
      update = jax.jit(jax.vmap(functools.partial(
          _smoothed, g=jnp.asarray(g, jnp.float32), metric=metric,
          boundary=boundary, solver=solver, allow_amplification=allow)))
      outs = np.asarray(update(jnp.asarray(values, jnp.float32)), np.float64)
      for (_, _, value, acts_as), out in zip(
          [c for c in cases if c[1] == allow], outs):
        want = _rule_reference(g, metric, boundary, acts_as)
        np.testing.assert_allclose(out, want, rtol=0, atol=1e-4,
                                   err_msg=f"{solver} {value}")
        if not allow:  # No fibre grows.
          assert np.all(np.linalg.norm(out, axis=-1)
                        <= np.linalg.norm(g, axis=-1) * (1 + 1e-6))


@pytest.mark.parametrize("metric, start", [("sobolev", 1.5),
                                           ("reweighted_l2", 2.0),
                                           ("reweighted_sobolev", 2.0)])
def test_scheduled_smoothing_jitted_rule_and_eager_error(metric, start):
  # A schedule that leaves the accepted range at its fourth step (the
  # re-weighted metrics: the third). Jitted, the steps follow the rule;
  # eagerly the value is concrete and the step raises.
  schedule = optax.linear_schedule(start, start - 2.0, 4)
  g = {"k": randn(22, (3, 3, 2, 8)) * 10}
  tx = optax.inject_hyperparams(cdg, static_args=("metric",))(
      smoothing=schedule, metric=metric)
  least = 0.0 if metric == "sobolev" else 1.0
  state = tx.init(g)
  update = jax.jit(tx.update)
  for step in range(6):
    lam = float(schedule(step))
    out, state = update(g, state)
    acts_as = lam if lam >= least and lam > 0 else least
    want = _rule_reference(np.asarray(g["k"], np.float64), metric,
                           "periodic", acts_as)
    np.testing.assert_allclose(out["k"], want, rtol=0, atol=1e-4,
                               err_msg=f"step {step}, lam {lam}")
  state = tx.init(g)
  with pytest.raises(ValueError, match="smoothing"):
    for _ in range(6):
      _, state = tx.update(g, state)


@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("shape, layout", [
    ((3, 3, 4, 0), "HWIO"), ((3, 3, 0, 8), "HWIO"), ((0, 4, 3, 3), "OIHW"),
    ((8, 0, 3, 3), "OIHW")])
def test_zero_size_kernels_pass_through(solver, shape, layout):
  empty = jnp.zeros(shape, jnp.float32)
  w = randn(23, kernel_shape(layout, 6))
  want = apply_along(dense_inverse_metric(6, 1.0, "sobolev", "periodic"), w,
                     LAYOUT_AXIS[layout])
  for metric in ("sobolev", "reweighted_l2"):
    if solver == "tridiagonal" and metric != "sobolev":
      continue
    tx = cdg(metric=metric, solver=solver, kernel_layout=layout)
    for jit in (False, True):
      out = run(tx, {"empty": empty, "w": w}, jit=jit)
      assert out["empty"].shape == shape
      assert out["empty"].dtype == jnp.float32
      if metric == "sobolev":
        np.testing.assert_allclose(out["w"], want, atol=1e-5)


def test_inject_hyperparams_with_bfloat16_params():
  # The injected smoothing is cast to bfloat16, the params' dtype.
  g = {"k": randn(12, (3, 3, 2, 6)).astype(jnp.bfloat16)}
  tx = optax.inject_hyperparams(cdg)(smoothing=0.5)
  out, _ = jax.jit(tx.update)(g, tx.init(g), g)
  assert out["k"].dtype == jnp.bfloat16
  np.testing.assert_allclose(
      np.asarray(out["k"], np.float32),
      np.asarray(run(cdg(0.5), g)["k"], np.float32),
      atol=2e-2,
  )


def test_inject_hyperparams_still_validates_concrete_value_at_init():
  tx = optax.inject_hyperparams(cdg)(smoothing=-1.0)
  with pytest.raises(ValueError, match="smoothing"):
    tx.init({"k": jnp.ones((1, 1, 1, 2))})


def test_stateless_and_accepts_extra_args():
  tx = cdg()
  assert isinstance(tx, optax.GradientTransformationExtraArgs)
  g = {"k": jnp.ones((3, 3, 2, 4))}
  state = tx.init(g)
  assert state == optax.EmptyState()
  out, new_state = tx.update(g, state, None, some_extra_arg=1, loss=2.0)
  assert new_state == optax.EmptyState()
  np.testing.assert_allclose(out["k"], g["k"], atol=1e-6)


def test_inside_optax_masked():
  g = {
      "conv": {"kernel": randn(2, (3, 3, 2, 6))},
      "conv2": {"kernel": randn(3, (3, 3, 2, 6))},
  }
  tx = optax.masked(cdg(), {"conv": {"kernel": True}, "conv2": False})
  out = run(tx, g)
  np.testing.assert_allclose(
      out["conv"]["kernel"], run(cdg(), g)["conv"]["kernel"], atol=1e-6
  )
  np.testing.assert_array_equal(out["conv2"]["kernel"], g["conv2"]["kernel"])


def test_chain_with_weight_decay_and_sgd():
  params = {"k": randn(4, (3, 3, 2, 6))}
  g = {"k": randn(5, (3, 3, 2, 6))}
  tx = optax.chain(cdg(), optax.add_decayed_weights(0.1), optax.sgd(0.5))
  out = run(tx, g, params)["k"]
  expected = -0.5 * (run(cdg(), g)["k"] + 0.1 * params["k"])
  np.testing.assert_allclose(out, expected, rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------
# Selection.


def _tree():
  rng = np.random.default_rng(6)
  r = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32)
  return {
      "conv": {"kernel": r(3, 3, 2, 6), "bias": r(6)},
      "conv1d": {"kernel": r(3, 2, 5), "bias": r(5)},
      "dense": {"kernel": r(4, 6), "bias": r(6)},
      "norm": {"scale": r(6), "bias": r(6)},
      "head": {"kernel": r(3, 3, 6, 1)},
      "step": jnp.asarray(3.0),
  }


def _reference_kernel(g, layout):
  # float32 dense reference for the default sobolev/periodic metric.
  axis = layout.index("O")
  n = g.shape[axis]
  return apply_along(dense_inverse_metric(n, 1.0, "sobolev", "periodic"), g,
                     axis)


def test_default_selects_only_2d_conv_kernels():
  g = _tree()
  out = run(cdg(), g)
  np.testing.assert_allclose(
      out["conv"]["kernel"], _reference_kernel(g["conv"]["kernel"], "HWIO"),
      atol=1e-5,
  )
  for path in (("conv", "bias"), ("conv1d", "kernel"), ("conv1d", "bias"),
               ("dense", "kernel"), ("dense", "bias"), ("norm", "scale"),
               ("norm", "bias"), ("head", "kernel")):
    a, b = out, g
    for p in path:
      a, b = a[p], b[p]
    np.testing.assert_array_equal(a, b)  # bit-identical
  np.testing.assert_array_equal(out["step"], g["step"])


def test_unselected_leaves_are_the_same_objects_without_jit():
  g = _tree()
  out = run(cdg(), g, jit=False)
  assert out["conv"]["bias"] is g["conv"]["bias"]
  assert out["dense"]["kernel"] is g["dense"]["kernel"]
  assert out["head"]["kernel"] is g["head"]["kernel"]  # C_out == 1


@pytest.mark.parametrize("layout", ["HWIO", "OIHW"])
def test_include_dense(layout):
  dense = randn(7, (4, 6))
  conv = randn(8, kernel_shape(layout, 6))
  g = {"dense": dense, "conv": conv, "bias": jnp.ones(6)}
  out = run(cdg(kernel_layout=layout, include_dense=True), g)
  dense_layout = "IO" if layout == "HWIO" else "OI"
  np.testing.assert_allclose(
      out["dense"], _reference_kernel(dense, dense_layout), atol=1e-5
  )
  np.testing.assert_allclose(
      out["conv"], _reference_kernel(conv, layout), atol=1e-5
  )
  np.testing.assert_array_equal(out["bias"], g["bias"])
  off = run(cdg(kernel_layout=layout), g)
  np.testing.assert_array_equal(off["dense"], dense)


def test_1d_conv_via_layout_tree_and_callable():
  g = _tree()
  layouts = jax.tree.map(lambda _: None, g)
  layouts["conv1d"]["kernel"] = "WIO"
  layouts["conv"]["kernel"] = "HWIO"
  for spec in (layouts, lambda tree: layouts):
    out = run(cdg(kernel_layout=spec), g)
    np.testing.assert_allclose(
        out["conv1d"]["kernel"],
        _reference_kernel(g["conv1d"]["kernel"], "WIO"),
        atol=1e-5,
    )
    np.testing.assert_allclose(
        out["conv"]["kernel"], _reference_kernel(g["conv"]["kernel"], "HWIO"),
        atol=1e-5,
    )
    np.testing.assert_array_equal(out["dense"]["kernel"], g["dense"]["kernel"])


def test_mask_only_restricts():
  g = _tree()
  g["conv_b"] = {"kernel": g["conv"]["kernel"] * 2}
  mask = jax.tree.map(lambda _: True, g)
  mask["conv_b"] = False
  for m in (mask, lambda tree: mask):
    out = run(cdg(mask=m), g)
    np.testing.assert_array_equal(
        out["conv_b"]["kernel"], g["conv_b"]["kernel"]
    )
    np.testing.assert_allclose(
        out["conv"]["kernel"], _reference_kernel(g["conv"]["kernel"], "HWIO"),
        atol=1e-5,
    )
    # A True mask never adds a leaf the layout did not select.
    np.testing.assert_array_equal(out["dense"]["kernel"], g["dense"]["kernel"])
    np.testing.assert_array_equal(out["norm"]["scale"], g["norm"]["scale"])


def test_output_channels_one_untouched_in_both_layouts():
  for layout in ("HWIO", "OIHW"):
    g = {"k": randn(9, kernel_shape(layout, 1))}
    out = run(cdg(metric="reweighted_l2", kernel_layout=layout), g)
    np.testing.assert_array_equal(out["k"], g["k"])


# ----------------------------------------------------------------------------
# Errors.


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(metric="h2"), "metric"),
        (dict(boundary="dirichlet"), "boundary"),
        (dict(smoothing=0.0), "smoothing"),
        (dict(smoothing=-1.0), "smoothing"),
        (dict(smoothing=float("nan")), "smoothing"),
        (dict(smoothing=float("inf")), "smoothing"),
        (dict(smoothing=jnp.ones(2)), "scalar"),
        (dict(smoothing=0.5, metric="reweighted_l2"), "allow_amplification"),
        (dict(smoothing=0.5, metric="reweighted_sobolev"),
         "allow_amplification"),
        (dict(smoothing=0.0, metric="reweighted_l2", allow_amplification=True),
         "smoothing"),
        (dict(solver="cholesky"), "solver"),
        (dict(solver="tridiagonal", metric="reweighted_l2"), "tridiagonal"),
        (dict(solver="tridiagonal", metric="reweighted_sobolev"),
         "'sobolev' only"),
        (dict(kernel_layout="HWXO"), "kernel_layout"),
        (dict(kernel_layout="HWII"), "kernel_layout"),
    ],
)
def test_errors(kwargs, match):
  with pytest.raises(ValueError, match=match):
    channel_directed_gradients(**kwargs)


def test_amplification_allowed_when_asked():
  g = {"k": jnp.ones((1, 1, 1, 4)).at[..., 0].set(5.0)}
  for metric in ("reweighted_l2", "reweighted_sobolev"):
    out = run(cdg(0.5, metric=metric, allow_amplification=True), g)["k"]
    assert np.asarray(out).max() > 5.0
  run(cdg(0.5, metric="sobolev"), g)  # sobolev never amplifies: no flag.


def test_bad_layout_tree_raises_at_update():
  g = {"k": jnp.ones((3, 3, 2, 4))}
  with pytest.raises(ValueError, match="kernel_layout"):
    run(cdg(kernel_layout={"k": "WIO"}), g)
  with pytest.raises(ValueError, match="kernel_layout"):
    run(cdg(kernel_layout={"k": "HWQO"}), g)


def test_alias():
  assert cdg is channel_directed_gradients


# ----------------------------------------------------------------------------
# Composition with spatial gradient scaling (sgs).


def _hand_cdg(g):
  return apply_along(dense_inverse_metric(g.shape[-1], 1.0, "sobolev",
                                          "periodic"), g, 3)


def _composition_setup():
  rng = np.random.default_rng(11)
  params = {
      "conv": {"kernel": jnp.asarray(rng.standard_normal((3, 3, 2, 6)),
                                     jnp.float32),
               "bias": jnp.zeros((6,), jnp.float32)},
      "dense": {"kernel": jnp.asarray(rng.standard_normal((6, 3)),
                                      jnp.float32)},
  }
  grads = [jax.tree.map(lambda p: jnp.asarray(rng.standard_normal(p.shape),
                                              jnp.float32), params)
           for _ in range(3)]
  scaling = jnp.asarray(rng.uniform(0.2, 2.0, (3, 3)), jnp.float32)
  return params, grads, scaling


def _hand_transform(g, scaling, order):
  """cdg and/or sgs applied by hand (numpy, float64) to the conv kernel."""
  k = np.asarray(g["conv"]["kernel"], np.float64)
  s = np.asarray(scaling, np.float64)[:, :, None, None]
  for name in order:
    k = _hand_cdg(k) if name == "cdg" else k * s
  out = jax.tree.map(lambda x: x, g)
  out["conv"] = dict(g["conv"], kernel=jnp.asarray(k, jnp.float32))
  return out


def _run_steps(tx, params, grads):
  update = jax.jit(tx.update)
  state, outs = tx.init(params), []
  for g in grads:
    u, state = update(g, state, params)
    outs.append(u)
  return outs


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_composition_with_sgs_matches_hand_composition(optimizer):
  params, grads, scaling = _composition_setup()
  make_opt = {
      "sgd": lambda: optax.sgd(0.1, momentum=0.9),
      "adam": lambda: optax.adam(1e-2),
  }[optimizer]
  results = {}
  for order in (("cdg", "sgs"), ("sgs", "cdg")):
    parts = {"cdg": cdg(), "sgs": sgs(scaling)}
    tx = optax.chain(*(parts[name] for name in order), make_opt())
    got = _run_steps(tx, params, grads)
    want = _run_steps(
        make_opt(), params, [_hand_transform(g, scaling, order) for g in grads]
    )
    for a, b in zip(got, want):
      jax.tree.map(
          lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6),
          a, b)
    results[order] = got
  # They commute: cdg acts on the output axis, a (kh, kw) scaling on the
  # spatial axes.
  for a, b in zip(results[("cdg", "sgs")], results[("sgs", "cdg")]):
    jax.tree.map(
        lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6),
        a, b)


def test_cdg_and_sgs_commute_on_raw_gradients():
  params, grads, _ = _composition_setup()
  for tx_pair in ((cdg(), sgs("acb")),
                  (cdg(metric="reweighted_sobolev", boundary="neumann"),
                   sgs("repvgg"))):
    a = run(optax.chain(*tx_pair), grads[0], params)
    b = run(optax.chain(*tx_pair[::-1]), grads[0], params)
    jax.tree.map(
        lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6),
        a, b)
    assert not np.allclose(a["conv"]["kernel"], grads[0]["conv"]["kernel"])


def test_stacked_layers_are_smoothed_layer_by_layer():
  g = randn(7, (3, 3, 3, 2, 8))  # (L, kh, kw, I, O), as nn.scan stores it.
  tx = cdg(smoothing=1.5, kernel_layout="LHWIO")
  out, _ = tx.update({"k": g}, tx.init({"k": g}))
  inverse = dense_inverse_metric(8, 1.5, "sobolev", "periodic")
  np.testing.assert_allclose(out["k"], apply_along(inverse, g, 4), rtol=1e-5,
                             atol=1e-6)
  # The default layout string selects rank-4 leaves only: with no other
  # leaf, cdg would do nothing, and says so.
  with pytest.raises(ValueError, match="'HWIO' selects none.*'LHWIO'"):
    cdg().init({"k": g})
  # Beside a rank-4 kernel, the stack is left alone.
  w = randn(8, (3, 3, 2, 8))
  same, _ = cdg().update({"k": g, "w": w}, cdg().init({"k": g, "w": w}))
  np.testing.assert_array_equal(same["k"], g)
