"""Tests for the jitted mutual-information estimator (`_dependence.py`).

Golden values come from `_golden`, a slow numpy implementation written from
the algorithm's description (SPEC 1.3), independent of the estimator: it pads
with `np.pad`, loops over channels, over every displacement of the window
(mirrors included, so symmetry is checked rather than assumed) and over every
padded position, and bins with `np.histogram2d` over explicit per-variable
[min, max] ranges (numpy puts the max in the last bin when the range is
explicit), with entropies in bits. It works for any number of spatial axes.
"""

import functools
import itertools
import json
import re
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sgs_optax import _mi_counts
from sgs_optax import _mi_pairs
from sgs_optax import _mi_plan
from sgs_optax._dependence import dependence_to_scaling
from sgs_optax._dependence import spatial_dependence

from _devices import run_on_devices

TOL = 1e-4


def _entropy_bits(counts):
  c = counts[counts > 0].astype(np.float64)
  p = c / c.sum()
  return float(-(p * np.log2(p)).sum())


def _sharpened(xs, ys, k, diagonal_removal, sample=None):
  """One entry: bins and ranges from all pairs, counts from `sample` if any."""
  if diagonal_removal:
    keep = (xs != 0) & (ys != 0)
    xs, ys = xs[keep], ys[keep]
    if sample is not None:
      keep = (sample[0] != 0) & (sample[1] != 0)
      sample = (sample[0][keep], sample[1][keep])
    if xs.size == 0:
      return 0.0
  elif xs.size == 0:
    return np.nan  # no pair: undefined
  bins = int(1 + np.ceil(np.log2(xs.size)))
  counted = (xs, ys) if sample is None else sample
  hist, _, _ = np.histogram2d(
      *counted, bins=bins, range=[[xs.min(), xs.max()], [ys.min(), ys.max()]]
  )
  if diagonal_removal:
    hist[np.arange(bins), np.arange(bins)] = 0
  h_xy = _entropy_bits(hist.ravel())
  h_x = _entropy_bits(hist.sum(axis=1))
  h_y = _entropy_bits(hist.sum(axis=0))
  if h_xy == 0:
    return 0.0 if diagonal_removal else np.nan
  nmi = (h_x + h_y - h_xy) / h_xy
  return k * nmi / ((k - 1) * nmi + 1)


def _pairs(m, offset):
  """Every (pixel, pixel + offset) pair of a padded (N, *spatial) map."""
  xs, ys = [], []
  for p in np.ndindex(*m.shape[1:]):
    q = tuple(a + u for a, u in zip(p, offset))
    if all(0 <= b < size for b, size in zip(q, m.shape[1:])):
      xs.append(m[(slice(None), *p)])
      ys.append(m[(slice(None), *q)])
  if not xs:
    return np.zeros(0), np.zeros(0)
  return np.concatenate(xs), np.concatenate(ys)


def _channel_mean(per_channel):
  valid = ~np.isnan(per_channel)
  count = valid.sum(axis=0)
  total = np.where(valid, per_channel, 0.0).sum(axis=0)
  return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def _golden(
    x,
    kernel_size=(3, 3),
    pads=((1, 1), (1, 1)),
    mode="constant",
    dilation=None,
    k=5.0,
    diagonal_removal=False,
):
  """Dependence of channels-last `x`, padded with np.pad(`pads`, `mode`)."""
  x = np.asarray(x, np.float64)
  dilation = dilation or (1,) * len(kernel_size)
  xp = np.pad(x, ((0, 0), *pads, (0, 0)), mode=mode)
  radius = [s // 2 for s in kernel_size]
  per_channel = np.full((x.shape[-1], *kernel_size), np.nan)
  per_channel[(slice(None), *radius)] = 1.0
  for ch in range(x.shape[-1]):
    for tap in itertools.product(*[range(-r, r + 1) for r in radius]):
      if any(tap):
        offset = [t * d for t, d in zip(tap, dilation)]
        xs, ys = _pairs(xp[..., ch], offset)
        per_channel[(ch, *(r + t for r, t in zip(radius, tap)))] = _sharpened(
            xs, ys, k, diagonal_removal)
  return _channel_mean(per_channel)


def _relu_blur(shape, seed, offset=0.3):
  """ReLU of 2-box-blurred Gaussian noise (any number of spatial axes):
  correlated neighbours and many exact zeros."""
  spatial = len(shape) - 2
  z = np.random.default_rng(seed).standard_normal(
      (shape[0], *(s + 1 for s in shape[1:-1]), shape[-1])
  )
  total = 0
  for shift in itertools.product((0, 1), repeat=spatial):
    total = total + z[(slice(None), *(slice(b, b + s) for b, s in zip(
        shift, shape[1:-1])), slice(None))]
  z = total / np.sqrt(2**spatial)
  return np.maximum(z - offset, 0).astype(np.float32)


def _with_dead_channel(shape, seed):
  x = _relu_blur(shape, seed)
  x[..., 1] = 0.0
  return x


def _assert_matches(got, want):
  got = np.asarray(got)
  assert got.dtype == np.float32
  assert got.shape == want.shape
  np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
  np.testing.assert_allclose(got, want, atol=TOL, rtol=0, equal_nan=True)


@pytest.fixture
def tuning(monkeypatch):
  """Sets one of the estimator's tuning constants for the test.

  The constants are read while tracing and the estimator is jitted on its
  plan: without clearing the compile caches, a test would reuse what an
  earlier test compiled for the same plan and never see its setting, and
  later tests would reuse what it compiled.
  """
  def set_constant(module, name, value):
    monkeypatch.setattr(module, name, value)
    jax.clear_caches()

  yield set_constant
  jax.clear_caches()


GOLDEN_CASES = {
    # name: (input, spatial_dependence kwargs, golden kwargs)
    "dead_channel_3x3_same": (
        _with_dead_channel((3, 8, 8, 5), 0), {}, {},
    ),
    "dead_channel_diagonal_removal": (
        _with_dead_channel((3, 8, 8, 5), 0),
        dict(diagonal_removal=True),
        dict(diagonal_removal=True),
    ),
    # bf16 values are exact in float32, so the golden sees the same numbers.
    "3x5_same_batch_1_bfloat16": (
        jnp.asarray(_relu_blur((1, 8, 9, 3), 1), jnp.bfloat16),
        dict(kernel_size=(3, 5)),
        dict(kernel_size=(3, 5), pads=((1, 1), (2, 2))),
    ),
    "5x3_explicit_asymmetric_diagonal_removal": (
        _relu_blur((2, 8, 7, 3), 2),
        dict(kernel_size=(5, 3), padding=((0, 2), (1, 0)),
             diagonal_removal=True),
        dict(kernel_size=(5, 3), pads=((0, 2), (1, 0)),
             diagonal_removal=True),
    ),
    # lax SAME with stride 2 on 8 pixels pads (0, 1), not (1, 1).
    "same_stride_2": (
        _relu_blur((2, 8, 8, 3), 3),
        dict(strides=2),
        dict(pads=((0, 1), (0, 1))),
    ),
    # Dilated taps: displacements are multiplied by the dilation.
    "circular_dilation_2": (
        _relu_blur((2, 9, 8, 3), 4),
        dict(padding_mode="circular", dilation=2),
        dict(mode="wrap", dilation=(2, 2), pads=((2, 2), (2, 2))),
    ),
    "reflect_5x3": (
        _relu_blur((2, 8, 7, 3), 5),
        dict(kernel_size=(5, 3), padding_mode="reflect"),
        dict(kernel_size=(5, 3), pads=((2, 2), (1, 1)), mode="reflect"),
    ),
    # Flax's CIRCULAR pads ((k-1)//2, k//2) whatever the stride.
    "flax_circular_stride_2": (
        _relu_blur((2, 8, 8, 3), 6),
        dict(padding="CIRCULAR", strides=2),
        dict(mode="wrap"),
    ),
    # No neighbour at distance 2 in a 2x2 VALID map: undefined (NaN) entries.
    "no_pairs_valid_dilated": (
        _relu_blur((2, 2, 2, 2), 9, offset=-1.0),
        dict(padding="VALID", dilation=2),
        dict(pads=((0, 0), (0, 0)), dilation=(2, 2)),
    ),
    # Windows that are 1 along an axis have no displacement along it.
    "3x1_window": (
        _relu_blur((3, 7, 6, 3), 12),
        dict(kernel_size=(3, 1)),
        dict(kernel_size=(3, 1), pads=((1, 1), (0, 0))),
    ),
    # 1-D: Flax's CAUSAL pads (k_eff - 1, 0) with zeros.
    "1d_causal_5_taps_dilated": (
        _relu_blur((3, 20, 3), 13),
        dict(kernel_size=(5,), padding="CAUSAL", dilation=2),
        dict(kernel_size=(5,), pads=((8, 0),), dilation=(2,)),
    ),
    "1d_reflect_7_taps_diagonal_removal": (
        _relu_blur((3, 24, 3), 14, offset=0.0),
        dict(kernel_size=(7,), padding_mode="reflect",
             diagonal_removal=True),
        dict(kernel_size=(7,), pads=((3, 3),), mode="reflect",
             diagonal_removal=True),
    ),
    "3d_3x3x3_same": (
        _relu_blur((2, 4, 5, 4, 2), 15),
        dict(kernel_size=(3, 3, 3)),
        dict(kernel_size=(3, 3, 3), pads=((1, 1),) * 3),
    ),
    "3d_1x3x3_circular_asymmetric": (
        _relu_blur((2, 3, 5, 6, 2), 16),
        dict(kernel_size=(1, 3, 3), padding=((0, 1), (2, 0), (1, 1)),
             padding_mode="circular"),
        dict(kernel_size=(1, 3, 3), pads=((0, 1), (2, 0), (1, 1)),
             mode="wrap"),
    ),
    "3d_dilated_reflect_diagonal_removal": (
        _relu_blur((2, 5, 4, 6, 2), 17),
        dict(kernel_size=(3, 3, 3), dilation=(2, 1, 1),
             padding_mode="reflect", diagonal_removal=True),
        dict(kernel_size=(3, 3, 3), dilation=(2, 1, 1), mode="reflect",
             pads=((2, 2), (1, 1), (1, 1)), diagonal_removal=True),
    ),
    # Large windows: more displacements than are unrolled, so the counting
    # loops over them (8x8 maps padded to 20x20: many pairs fall off).
    "13x13_same": (
        _relu_blur((2, 8, 8, 2), 18),
        dict(kernel_size=(13, 13)),
        dict(kernel_size=(13, 13), pads=((6, 6), (6, 6))),
    ),
    "7x5_reflect_dilated_diagonal_removal": (
        _relu_blur((2, 9, 8, 2), 19),
        dict(kernel_size=(7, 5), dilation=(1, 2), padding=((2, 3), (4, 1)),
             padding_mode="reflect", diagonal_removal=True),
        dict(kernel_size=(7, 5), dilation=(1, 2), pads=((2, 3), (4, 1)),
             mode="reflect", diagonal_removal=True),
    ),
    "1d_31_taps_same": (
        _relu_blur((2, 40, 2), 20),
        dict(kernel_size=(31,)),
        dict(kernel_size=(31,), pads=((15, 15),)),
    ),
}
DEGENERATE = ("no_pairs_valid_dilated",)


@functools.cache
def _golden_case(name):
  x, _, golden_kwargs = GOLDEN_CASES[name]
  return _golden(np.asarray(jnp.asarray(x, jnp.float32)), **golden_kwargs)


def _both_countings(x, **kwargs):
  """The estimate counted by scatter-adds and by one-hot products, which
  must agree exactly: the counts are the same integers."""
  scatter = np.asarray(spatial_dependence(x, counting="scatter", **kwargs))
  matmul = np.asarray(spatial_dependence(x, counting="matmul", **kwargs))
  np.testing.assert_array_equal(matmul, scatter)
  return scatter


@pytest.mark.parametrize("name", list(GOLDEN_CASES))
def test_matches_golden(name):
  x, kwargs, _ = GOLDEN_CASES[name]
  got = np.asarray(spatial_dependence(x, **kwargs))
  _assert_matches(got, _golden_case(name))
  centre = tuple(s // 2 for s in got.shape)
  assert got[centre] == 1.0
  flipped = got[tuple(slice(None, None, -1) for _ in got.shape)]
  np.testing.assert_array_equal(got, flipped)
  if name not in DEGENERATE:
    # Not degenerate: a real spread of values below the centre.
    off = np.delete(got.ravel(), np.ravel_multi_index(centre, got.shape))
    assert np.all((off > 0) & (off < 1))
    assert off.size == 2 or np.ptp(off) > 0.01


@pytest.mark.slow
@pytest.mark.parametrize("name", list(GOLDEN_CASES))
def test_both_countings_match_golden(name):
  # Every case, counted by scatter-adds and by one-hot products.
  x, kwargs, _ = GOLDEN_CASES[name]
  _assert_matches(_both_countings(x, **kwargs), _golden_case(name))


LOOPED = ["circular_dilation_2", "5x3_explicit_asymmetric_diagonal_removal",
          "3d_1x3x3_circular_asymmetric", "1d_causal_5_taps_dilated"]


@pytest.mark.parametrize("name", LOOPED)
@pytest.mark.parametrize("counting", [
    None, pytest.param("matmul", marks=pytest.mark.slow)])
def test_looping_over_displacements_matches_golden(name, counting, tuning):
  # Small windows are unrolled; force the loop used by large windows, with
  # tables split into one group per displacement.
  tuning(_mi_pairs, "UNROLLED_ROWS", 0)
  tuning(_mi_counts, "_GROUP_CELLS", 1)
  x, kwargs, _ = GOLDEN_CASES[name]
  got = spatial_dependence(x, counting=counting, **kwargs)
  _assert_matches(got, _golden_case(name))


def test_golden_cases_are_not_trivial():
  x, _, _ = GOLDEN_CASES["dead_channel_3x3_same"]
  assert 0.2 < np.mean(x[..., [0, 2, 3, 4]] == 0) < 0.8
  # The dead channel is skipped, not averaged in as NaN or 0.
  live = _golden(np.delete(x, 1, axis=-1))
  np.testing.assert_allclose(
      spatial_dependence(x), live, atol=TOL, rtol=0
  )
  x, kwargs, _ = GOLDEN_CASES["no_pairs_valid_dilated"]
  no_pairs = np.asarray(spatial_dependence(x, **kwargs))
  assert np.isnan(no_pairs).sum() == 8 and no_pairs[1, 1] == 1.0
  # With diagonal removal an entry with no pair is 0, as in the official code.
  removed = spatial_dependence(x, diagonal_removal=True, **kwargs)
  np.testing.assert_array_equal(removed, (np.arange(9) == 4).reshape(3, 3))
  # The order of the axes matters: a (3, 1) window is not a (1, 3) one.
  x, kwargs, _ = GOLDEN_CASES["3x1_window"]
  rows = np.asarray(spatial_dependence(x, (3, 1)))
  cols = np.asarray(spatial_dependence(x, (1, 3)))
  assert rows.shape == (3, 1) and cols.shape == (1, 3)
  assert abs(rows[0, 0] - cols[0, 0]) > 1e-3


def test_constant_channels_give_nan_not_a_number():
  # With VALID (or circular) padding a constant channel stays constant, so
  # every entry is 0/0; the centre alone is defined.
  x = np.full((2, 5, 5, 3), 0.7, np.float32)
  x[..., 2] = -1.5
  got = np.asarray(spatial_dependence(x, padding="VALID"))
  want = _golden(x, pads=((0, 0), (0, 0)))
  assert np.isnan(want).sum() == 8
  _assert_matches(got, want)
  assert got[1, 1] == 1.0
  # With diagonal removal undefined entries are 0, as in the official code.
  removed = np.asarray(
      spatial_dependence(x, padding="VALID", diagonal_removal=True)
  )
  np.testing.assert_array_equal(removed, (np.arange(9) == 4).reshape(3, 3))


def test_non_finite_inputs_poison_the_whole_matrix():
  x = _with_dead_channel((3, 8, 8, 5), 0)
  for bad in (np.nan, np.inf, -np.inf):
    y = x.copy()
    y[1, 2, 3, 4] = bad
    assert np.isnan(spatial_dependence(y)).all()


def test_batch_chunking_with_a_ragged_last_chunk(tuning):
  # 7 images of 7x7x3 padded pixels in chunks of 2: the fourth chunk is
  # shifted back to images 5-6 and its already counted image 5 masked out.
  x = _relu_blur((7, 5, 5, 3), 10)
  tuning(_mi_counts, "_CHUNK_ELEMENTS", 2 * 7 * 7 * 3)
  # The matmul form's chunks are sized by their one-hot indicators: buf
  # bins per pixel, for the 4 displacements of a step.
  buf = _mi_plan.make_plan(x.shape, (3, 3), "SAME", 1, 1, "zeros", False,
                           None).buffer_bins
  tuning(_mi_counts, "_ONEHOT_ELEMENTS", 2 * 7 * 7 * 3 * buf * 4)
  # Float32 sums of at most 5 pairs at once: a step's 72 or 84 pairs per
  # channel and row in 15 or 17 pieces, the last padded with dropped pairs.
  tuning(_mi_counts, "_EXACT_PAIRS", 5)
  for removal in (False, True):
    got = _both_countings(x, diagonal_removal=removal)
    _assert_matches(got, _golden(x, diagonal_removal=removal))


def test_under_jit_with_static_k():
  name = "5x3_explicit_asymmetric_diagonal_removal"
  x, kwargs, golden_kwargs = GOLDEN_CASES[name]
  fn = jax.jit(
      spatial_dependence,
      static_argnames=("kernel_size", "padding", "diagonal_removal", "k"),
  )
  got = fn(jnp.asarray(x), k=3.0, **kwargs)
  _assert_matches(got, _golden(x, k=3.0, **golden_kwargs))
  assert not np.allclose(got, spatial_dependence(x, **kwargs), atol=1e-3)


def test_traced_k_or_diagonal_removal_ask_to_be_static():
  x = _relu_blur((2, 6, 6, 2), 21)
  with pytest.raises(ValueError, match="k must be a concrete.*static_argnames"):
    jax.jit(spatial_dependence)(x, k=3.0)
  with pytest.raises(ValueError, match="diagonal_removal must be a concrete"):
    jax.jit(spatial_dependence)(x, diagonal_removal=True)


def test_numpy_integer_sizes_are_accepted():
  name = "5x3_explicit_asymmetric_diagonal_removal"
  x, kwargs, golden_kwargs = GOLDEN_CASES[name]
  np_kwargs = dict(
      kwargs, kernel_size=(np.int64(5), np.int32(3)),
      padding=((np.int64(0), 2), np.array([1, 0])),
      dilation=(np.int64(1), 1), strides=np.int64(2),
  )
  _assert_matches(spatial_dependence(x, **np_kwargs),
                  _golden(x, **golden_kwargs))


def test_vmap_over_stacked_layers():
  # Inputs of a scanned model's layers, stacked: one matrix per layer, each
  # as if computed alone; mapped keys draw their own samples.
  x = np.stack([_relu_blur((4, 6, 7, 2), s) for s in (23, 24)])
  stacked = jax.vmap(lambda v: spatial_dependence(v, (3, 3)))(x)
  for layer, got in zip(x, stacked):
    _assert_matches(got, _golden(layer))
  keys = jax.random.split(jax.random.key(0), 2)
  sampled = jax.vmap(
      lambda v, key: spatial_dependence(v, subsample=16, key=key))(x, keys)
  for layer, key, got in zip(x, keys, sampled):
    np.testing.assert_array_equal(
        got, spatial_dependence(layer, subsample=16, key=key))


def test_dependence_to_scaling():
  d = jnp.asarray([[0.5, 0.25, 0.5], [0.25, 1.0, 0.25], [0.5, 0.25, 0.5]])
  s = dependence_to_scaling(d)
  np.testing.assert_allclose(s, d / (4.0 / 9.0), rtol=1e-6)
  np.testing.assert_allclose(jnp.mean(s), 1.0, rtol=1e-6)
  # Any rank: a 1-D and a 3-D dependence are one matrix each.
  line = jnp.asarray([0.5, 1.0, 0.5])
  np.testing.assert_allclose(dependence_to_scaling(line), line / (2 / 3),
                             rtol=1e-6)
  cube = jnp.stack([d, 2 * d, d])
  np.testing.assert_allclose(jnp.mean(dependence_to_scaling(cube)), 1.0,
                             rtol=1e-6)
  # A stack of 2-D matrices: each normalised on its own.
  stacked = dependence_to_scaling(jnp.stack([d, 2 * d]), ndim=2)
  np.testing.assert_allclose(stacked[0], stacked[1], rtol=1e-6)
  assert jnp.isnan(dependence_to_scaling(d.at[0, 0].set(jnp.nan))).all()
  with pytest.raises(ValueError, match="trailing"):
    dependence_to_scaling(jnp.ones(()))
  with pytest.raises(ValueError, match="trailing"):
    dependence_to_scaling(jnp.ones(3), ndim=2)


@pytest.mark.parametrize(
    "args, kwargs, match",
    [
        ((np.ones((4, 3)),), {}, "rank 3, 4 or 5"),
        ((np.ones((1, 2, 4, 4, 4, 3)),), {}, "rank 3, 4 or 5"),
        ((np.ones((1, 6, 6, 2)), (4, 3)), {}, "odd"),
        ((np.ones((1, 6, 6, 2)), (3, 2)), {}, "odd"),
        ((np.ones((1, 6, 6, 2)), (1, 1)), {}, "one tap"),
        ((np.ones((1, 6, 6, 6, 2)), (1, 1, 1)), {}, "one tap"),
        ((np.ones((1, 6, 6, 2)), 3), {}, "one size per spatial axis"),
        ((np.ones((1, 6, 6, 2)), (3, 3, 3)), {}, "kernel_size"),
        ((np.ones((1, 6, 6, 6, 2)),), {}, "kernel_size"),
        ((np.ones((1, 6, 6, 2)), (3, 3.0)), {}, "kernel_size"),
        ((np.ones((1, 6, 6, 2)), (True, 3)), {}, "kernel_size"),
        ((np.ones((1, 6, 6, 2)),), dict(padding="FULL"), "padding"),
        ((np.ones((1, 6, 6, 2)),), dict(padding="CAUSAL"), "1-D"),
        ((np.ones((1, 6, 6, 2)),), dict(padding=((1, 1),)), "padding"),
        ((np.ones((1, 6, 6, 2)),), dict(padding=((1, -1), (1, 1))), "Negative"),
        ((np.ones((1, 6, 6, 2)),), dict(padding_mode="edge"), "padding_mode"),
        ((np.ones((1, 6, 6, 2)),), dict(padding="CIRCULAR",
                                         padding_mode="reflect"), "implies"),
        ((np.ones((1, 6, 6, 2)),), dict(strides=0), "strides"),
        ((np.ones((1, 6, 6, 2)),), dict(dilation=(1, 2, 3)), "dilation"),
        ((np.ones((1, 6, 6, 2)),), dict(dilation=0), "dilation"),
        ((np.ones((1, 6, 6, 2)),), dict(k=0.0), "k must be positive"),
        ((np.ones((1, 6, 6, 2)),), dict(k=-1.0), "k must be positive"),
        ((np.ones((1, 6, 6, 2)),), dict(k=float("nan")), "k must be positive"),
        ((np.ones((1, 6, 6, 2)),), dict(k="5"), "k must be"),
        ((np.ones((1, 6, 6, 2)),), dict(subsample=16), "key"),
        ((np.ones((1, 6, 6, 2)),), dict(subsample=0, key=jax.random.key(0)),
         "positive"),
        ((np.ones((1, 6, 6, 2)),), dict(subsample=1.5, key=jax.random.key(0)),
         "subsample"),
        ((np.ones((1, 6, 6, 2)),), dict(counting="onehot"),
         "one of 'scatter', 'matmul' or None"),
        ((np.ones((1, 6, 6, 2)),), dict(counting=("matmul",)), "counting"),
    ],
)
def test_bad_input_raises_value_error(args, kwargs, match):
  with pytest.raises(ValueError, match=match):
    spatial_dependence(*args, **kwargs)


def test_bad_input_raises_at_trace_time():
  calls = []

  @jax.jit
  def fn(x):
    calls.append(1)
    return spatial_dependence(x, (2, 3))

  with pytest.raises(ValueError, match="odd"):
    fn(jnp.ones((1, 6, 6, 2)))
  assert calls == [1]


def _golden_sampled(x, key, m, diagonal_removal=False):
  """3x3 SAME dependence counted on the estimator's own sampled pairs.

  The estimator draws, for each of the four displacements of a 3x3 window (in
  the official order), `m` pair numbers uniformly with replacement, numbering
  the pairs image by image and in row-major order of the centre pixel inside
  the displacement's crop. This draws the same numbers with the same
  jax.random call and reads the pairs off the padded map in numpy; ranges and
  bin counts come from all pairs.
  """
  xp = np.pad(np.asarray(x, np.float64), ((0, 0), (1, 1), (1, 1), (0, 0)))
  n, hp, wp, channels = xp.shape
  taps = [(-1, -1), (-1, 0), (-1, 1), (0, -1)]
  crops = [(hp - abs(a), wp - abs(b)) for a, b in taps]
  counts = np.asarray([n * h * w for h, w in crops])[:, None]
  numbers = np.asarray(jax.random.randint(
      jax.random.fold_in(key, 0), (4, m), 0, counts))
  per_channel = np.full((channels, 3, 3), np.nan)
  per_channel[:, 1, 1] = 1.0
  for ch in range(channels):
    for (a, b), (h, w), drawn in zip(taps, crops, numbers):
      image, rest = np.divmod(drawn, h * w)
      i, j = np.divmod(rest, w)
      i, j = i + max(-a, 0), j + max(-b, 0)  # the centre pixel, padded
      sample = (xp[image, i, j, ch], xp[image, i + a, j + b, ch])
      f = _sharpened(*_pairs(xp[..., ch], (a, b)), 5.0, diagonal_removal,
                     sample=sample)
      per_channel[ch, 1 + a, 1 + b] = per_channel[ch, 1 - a, 1 - b] = f
  return _channel_mean(per_channel)


@pytest.mark.parametrize("removal, looped",
                         [(False, False), (True, False), (True, True)])
def test_subsample_counts_the_drawn_pairs(removal, looped, tuning):
  if looped:  # as for a large window: a loop over the displacements
    tuning(_mi_pairs, "UNROLLED_ROWS", 0)
  x = _relu_blur((64, 12, 12, 2), 11)
  sample = 2048
  assert 4 * sample < 64 * 13 * 13  # so every displacement is really sampled
  key = jax.random.key(42)
  got = np.asarray(spatial_dependence(
      x, subsample=sample, key=key, diagonal_removal=removal))
  _assert_matches(got, _golden_sampled(x, key, sample, removal))
  # The sample really is used: another key, another matrix; the same key,
  # the same matrix.
  again = spatial_dependence(
      x, subsample=sample, key=key, diagonal_removal=removal)
  np.testing.assert_array_equal(got, again)
  other = spatial_dependence(x, subsample=sample, key=jax.random.key(7),
                             diagonal_removal=removal)
  assert not np.array_equal(got, other)
  # A raw uint32 key of the default PRNG draws the same sample.
  raw = spatial_dependence(x, subsample=sample, key=jax.random.PRNGKey(7),
                           diagonal_removal=removal)
  np.testing.assert_array_equal(raw, other)
  # A sample over a quarter of the pairs is not worth gathering: all pairs
  # are counted, exactly.
  whole = spatial_dependence(x, subsample=64 * 13 * 13 // 3, key=key,
                             diagonal_removal=removal)
  np.testing.assert_array_equal(
      whole, spatial_dependence(x, diagonal_removal=removal))


@pytest.mark.slow
@pytest.mark.parametrize("removal, looped",
                         [(False, False), (True, False), (True, True)])
def test_subsample_counts_the_same_pairs_by_matmul(removal, looped, tuning):
  if looped:
    tuning(_mi_pairs, "UNROLLED_ROWS", 0)
  x = _relu_blur((64, 12, 12, 2), 11)
  key = jax.random.key(42)
  got = _both_countings(x, subsample=2048, key=key, diagonal_removal=removal)
  _assert_matches(got, _golden_sampled(x, key, 2048, removal))


def _opcodes(hlo_text):
  """The HLO instructions' opcodes (in every computation, fusions too)."""
  return set(re.findall(r"= \S+ ([\w-]+)\(", hlo_text))


COMPILED_CASES = {
    # name: (input, spatial_dependence kwargs, golden)
    "3x3": GOLDEN_CASES["dead_channel_3x3_same"][:2] + (
        lambda: _golden_case("dead_channel_3x3_same"),),
    "diagonal_removal": GOLDEN_CASES["dead_channel_diagonal_removal"][:2] + (
        lambda: _golden_case("dead_channel_diagonal_removal"),),
    "13x13_looped": GOLDEN_CASES["13x13_same"][:2] + (
        lambda: _golden_case("13x13_same"),),
    "5x5_subsample_looped": (
        _relu_blur((16, 12, 12, 2), 26), dict(kernel_size=(5, 5),
                                              subsample=256), None),
}


@pytest.mark.parametrize("name", list(COMPILED_CASES))
def test_compiled_counting_paths(name):
  # The matmul form has no scatter (which serialises on accelerators), the
  # scatter form no dot; by default a CPU compile counts by scatter. Both
  # give the same matrix.
  x, kwargs, golden = COMPILED_CASES[name]
  x = jnp.asarray(x)
  key = jax.random.key(0) if "subsample" in kwargs else None
  ops, got = {}, {}
  for counting in ("scatter", "matmul", None):
    fn = jax.jit(lambda v, key, counting=counting: spatial_dependence(
        v, key=key, counting=counting, **kwargs))
    compiled = fn.lower(x, key).compile()
    ops[counting] = _opcodes(compiled.as_text())
    got[counting] = np.asarray(compiled(x, key))
  assert "scatter" in ops["scatter"] and "dot" not in ops["scatter"]
  assert "dot" in ops["matmul"] and "scatter" not in ops["matmul"]
  assert ops[None] == ops["scatter"]
  np.testing.assert_array_equal(got["matmul"], got["scatter"])
  np.testing.assert_array_equal(got[None], got["scatter"])
  assert not np.isnan(got["scatter"]).any()
  if golden is not None:
    _assert_matches(got["matmul"], golden())


def test_default_counting_follows_the_platform_compiled_for():
  # Lowered (not run) for each platform: the default picks scatter-adds for
  # CPU and one-hot products for GPU and TPU, in the same traced function.
  fn = jax.jit(lambda v: spatial_dependence(v, diagonal_removal=True))
  x = jax.ShapeDtypeStruct((4, 8, 8, 3), jnp.float32)
  for platform, form in (("cpu", "scatter"), ("cuda", "matmul"),
                         ("rocm", "matmul"), ("tpu", "matmul")):
    text = jax.export.export(fn, platforms=[platform])(x).mlir_module()
    assert ("scatter" in text) == (form == "scatter"), platform
    assert ("dot_general" in text) == (form == "matmul"), platform


SHARDED_SCRIPT = textwrap.dedent(
    """
    import json
    import re
    import sys
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P
    from sgs_optax._dependence import spatial_dependence

    assert jax.device_count() == 8, jax.devices()
    counting = sys.argv[1] if len(sys.argv) > 1 else None
    rng = np.random.default_rng(0)

    def maps(shape):
      z = rng.standard_normal(shape)
      return np.maximum(z + np.roll(z, 1, axis=1) - 0.3, 0).astype(np.float32)

    CASES = [  # (input, kwargs, batch spec, mesh axes)
        (maps((16, 9, 9, 6)), {}, P("data"), (8,)),
        (maps((16, 9, 9, 6)), dict(diagonal_removal=True), P("data"), (8,)),
        (maps((8, 20, 3)), dict(kernel_size=(5,), padding="CAUSAL"),
         P("data"), (8,)),
        (maps((8, 7, 6, 5, 2)), dict(kernel_size=(3, 3, 3)), P("data"),
         (8,)),
        (maps((16, 8, 8, 2)), dict(kernel_size=(9, 9)), P("data"), (8,)),
        (maps((32, 10, 10, 3)), dict(subsample=512, key=jax.random.key(1)),
         P(("data", "fsdp")), (2, 4)),
    ]
    out = {"checked": 0, "max_diff": 0.0, "gathers": [], "reduces": 0,
           "scatters": 0}
    for i, (x, kwargs, spec, shape) in enumerate(CASES):
      # One device, by default (scatter-adds on CPU): the reference.
      plain = np.asarray(spatial_dependence(x, **kwargs))
      assert not np.isnan(plain).any() and not np.allclose(plain, 1.0)
      fn = jax.jit(lambda v: spatial_dependence(v, counting=counting,
                                                **kwargs))
      names = ("data", "fsdp")[:len(shape)]
      # Automatic axes for every case, explicit ones for a few.
      for kind in (jax.sharding.AxisType.Auto,
                   jax.sharding.AxisType.Explicit)[:1 + (i in (0, 5))]:
        mesh = jax.make_mesh(shape, names, axis_types=(kind,) * len(shape))
        with jax.set_mesh(mesh):
          sharded = jax.device_put(x, NamedSharding(mesh, spec))
          compiled = fn.lower(sharded).compile()
          got, text = np.asarray(compiled(sharded)), compiled.as_text()
        out["max_diff"] = max(out["max_diff"],
                              float(np.abs(got - plain).max()))
        # No map crosses devices; the count tables are reduced.
        out["gathers"] += re.findall(r"all-gather[^\\n]*", text)
        out["reduces"] += "all-reduce" in text
        out["scatters"] += " scatter(" in text
        out["checked"] += 1
    # Eager, outside any mesh context: the same answer.
    mesh = jax.make_mesh((8,), ("data",))
    x = CASES[0][0]
    eager = spatial_dependence(
        jax.device_put(x, NamedSharding(mesh, P("data"))), counting=counting)
    out["eager_diff"] = float(np.abs(eager - spatial_dependence(x)).max())
    print(json.dumps(out))
    """
)


@pytest.mark.parametrize("counting", [
    None, pytest.param("matmul", marks=pytest.mark.slow)])
def test_batch_sharded_inputs_are_counted_where_they_are(counting, tmp_path):
  script = tmp_path / "sharded.py"
  script.write_text(SHARDED_SCRIPT)
  argv = [str(script)] + ([counting] if counting else [])
  out = json.loads(run_on_devices(*argv).stdout.splitlines()[-1])
  assert out["checked"] == 8
  # Integer tables and exact extrema are reduced: the same matrix.
  assert out["max_diff"] < 1e-6 and out["eager_diff"] < 1e-6
  # Batch-sharded maps are never gathered; their count tables are reduced.
  assert out["gathers"] == [] and out["reduces"] == 8
  # On CPU the default counts by scatter-adds; the matmul form never does.
  assert out["scatters"] == (0 if counting == "matmul" else 8)


@pytest.mark.slow
def test_speed_benchmark_tiny_run(tmp_path):
  from benchmarks import mi_speed  # pylint: disable=g-import-not-at-top

  out = tmp_path / "mi_speed.json"
  results = mi_speed.main(["--tiny", "--out", str(out)])
  written = json.loads(out.read_text())
  assert written["settings"]["tiny"] is True
  summary = written["summary"]
  assert summary == json.loads(json.dumps(results["summary"]))
  # The jitted estimator agrees with the official loop (fast_histogram) too.
  assert summary["full_data_max_abs_diff"] < TOL
  assert [c["subsample"] for c in summary["curve"]] == [None, 128]
  assert all(c["speedup_wall"] > 0 for c in summary["curve"])
  for layer in written["layers"]:
    assert set(layer["wall_s"]) == {"official", "jit", "jit[128]"}
  large = {r["name"]: r for r in written["large_windows"]}
  assert large["13x13"]["offsets"] == 84 and large["31-tap"]["offsets"] == 15
  assert all(r["wall_s"]["large"] > 0 and r["temp_bytes"] > 0
             for r in large.values())


@pytest.mark.slow
def test_speed_benchmark_counting_and_refresh_tiny_runs(tmp_path):
  from benchmarks import mi_speed  # pylint: disable=g-import-not-at-top

  out = tmp_path / "counting.json"
  results = mi_speed.main(["--counting", "--tiny", "--out", str(out)])
  counting = json.loads(out.read_text())["counting"]
  assert counting == json.loads(json.dumps(results["counting"]))
  assert counting["identical"] and counting["n_images"] == 16
  assert len(counting["layers"]) == len(mi_speed.TINY_CONV_INPUTS)
  assert all(t > 0 for t in counting["total_wall_s"].values())
  assert counting["matmul_over_scatter"] > 0
  # One refresh jitted in place and one on a given device: same timings'
  # keys, temporaries only where it is compiled ahead.
  here = mi_speed.run_refresh("resnet18", n=4, repeats=1, tiny=True)
  there = mi_speed.run_refresh("resnet18", n=4, repeats=1, tiny=True,
                               device=jax.devices()[0])
  assert here["temp_bytes"] > 0 and there["temp_bytes"] is None
  assert all(r["run_s"] > 0 and r["compile_s"] >= 0 for r in (here, there))
