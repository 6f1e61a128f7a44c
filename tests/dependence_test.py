"""Tests for the jitted mutual-information estimator (`_dependence.py`).

Golden values come from `_golden`, a slow numpy implementation written from
the algorithm's description (SPEC 1.3), independent of the estimator: it loops
over channels, all kh*kw - 1 displacements (mirrors included, so symmetry is
checked rather than assumed) and every pixel position, and bins with
`np.histogram2d` over explicit per-variable [min, max] ranges (numpy puts the
max in the last bin when the range is explicit), with entropies in bits.
"""

import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sgs_optax import _dependence
from sgs_optax._dependence import dependence_to_scaling
from sgs_optax._dependence import spatial_dependence

TOL = 1e-4


def _entropy_bits(counts):
  c = counts[counts > 0].astype(np.float64)
  p = c / c.sum()
  return float(-(p * np.log2(p)).sum())


def _golden(
    x,
    kernel_size=(3, 3),
    pads=((1, 1), (1, 1)),
    mode="constant",
    dilation=(1, 1),
    k=5.0,
    diagonal_removal=False,
):
  """Dependence matrix of NHWC `x`, padded with np.pad(`pads`, `mode`)."""
  x = np.asarray(x, np.float64)
  xp = np.pad(x, ((0, 0), pads[0], pads[1], (0, 0)), mode=mode)
  _, hp, wp, channels = xp.shape
  kh, kw = kernel_size
  rh, rw = kh // 2, kw // 2
  per_channel = np.full((channels, kh, kw), np.nan)
  per_channel[:, rh, rw] = 1.0
  for ch in range(channels):
    m = xp[..., ch]
    for dx in range(-rh, rh + 1):
      for dy in range(-rw, rw + 1):
        if (dx, dy) == (0, 0):
          continue
        u, v = dx * dilation[0], dy * dilation[1]
        xs, ys = [], []
        for i in range(hp):
          for j in range(wp):
            if 0 <= i + u < hp and 0 <= j + v < wp:
              xs.append(m[:, i, j])
              ys.append(m[:, i + u, j + v])
        xs = np.concatenate(xs) if xs else np.zeros(0)
        ys = np.concatenate(ys) if ys else np.zeros(0)
        if diagonal_removal:
          keep = (xs != 0) & (ys != 0)
          xs, ys = xs[keep], ys[keep]
          if xs.size == 0:
            per_channel[ch, rh + dx, rw + dy] = 0.0
            continue
        elif xs.size == 0:
          continue  # no pair: undefined
        bins = int(1 + np.ceil(np.log2(xs.size)))
        hist, _, _ = np.histogram2d(
            xs, ys, bins=bins,
            range=[[xs.min(), xs.max()], [ys.min(), ys.max()]],
        )
        if diagonal_removal:
          hist[np.arange(bins), np.arange(bins)] = 0
        h_xy = _entropy_bits(hist.ravel())
        h_x = _entropy_bits(hist.sum(axis=1))
        h_y = _entropy_bits(hist.sum(axis=0))
        if h_xy > 0:
          nmi = (h_x + h_y - h_xy) / h_xy
          f = k * nmi / ((k - 1) * nmi + 1)
        else:
          f = 0.0 if diagonal_removal else np.nan
        per_channel[ch, rh + dx, rw + dy] = f
  valid = ~np.isnan(per_channel)
  count = valid.sum(axis=0)
  total = np.where(valid, per_channel, 0.0).sum(axis=0)
  return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def _relu_blur(shape, seed, offset=0.3):
  """ReLU of 2x2-box-blurred Gaussian noise: correlated, many exact zeros."""
  z = np.random.default_rng(seed).standard_normal(
      (shape[0], shape[1] + 1, shape[2] + 1, shape[3])
  )
  z = (z[:, :-1, :-1] + z[:, 1:, :-1] + z[:, :-1, 1:] + z[:, 1:, 1:]) / 2
  return np.maximum(z - offset, 0).astype(np.float32)


def _with_dead_channel(shape, seed):
  x = _relu_blur(shape, seed)
  x[..., 1] = 0.0
  return x


def _assert_matches(got, want):
  got = np.asarray(got)
  assert got.dtype == np.float32
  np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
  np.testing.assert_allclose(got, want, atol=TOL, rtol=0, equal_nan=True)


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
}


@pytest.mark.parametrize("name", list(GOLDEN_CASES))
def test_matches_golden(name):
  x, kwargs, golden_kwargs = GOLDEN_CASES[name]
  want = _golden(np.asarray(jnp.asarray(x, jnp.float32)), **golden_kwargs)
  got = spatial_dependence(x, **kwargs)
  _assert_matches(got, want)
  got = np.asarray(got)
  kh, kw = got.shape
  assert got[kh // 2, kw // 2] == 1.0
  np.testing.assert_array_equal(got, got[::-1, ::-1])
  if name != "no_pairs_valid_dilated":
    # Not degenerate: a real spread of values below the centre.
    off = np.delete(got.ravel(), got.size // 2)
    assert np.all((off > 0) & (off < 1)) and np.ptp(off) > 0.01


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
  for bad in (np.nan, np.inf):
    y = x.copy()
    y[1, 2, 3, 4] = bad
    assert np.isnan(spatial_dependence(y)).all()


def test_batch_chunking_with_a_ragged_last_chunk(monkeypatch):
  # 7 images of 7x7x3 padded pixels in chunks of 2: the fourth chunk is
  # shifted back to images 5-6 and its already counted image 5 masked out.
  x = _relu_blur((7, 5, 5, 3), 10)
  monkeypatch.setattr(_dependence, "_CHUNK_ELEMENTS", 2 * 7 * 7 * 3)
  for removal in (False, True):
    got = spatial_dependence(x, diagonal_removal=removal)
    _assert_matches(got, _golden(x, diagonal_removal=removal))


def test_under_jit_same_answer_and_traced_k():
  name = "5x3_explicit_asymmetric_diagonal_removal"
  x, kwargs, golden_kwargs = GOLDEN_CASES[name]
  fn = jax.jit(
      spatial_dependence,
      static_argnames=("kernel_size", "padding", "diagonal_removal"),
  )
  # k is traced here: it is not baked into the compiled estimator.
  got = fn(jnp.asarray(x), k=jnp.float32(3.0), **kwargs)
  np.testing.assert_allclose(
      got, spatial_dependence(x, k=3.0, **kwargs), atol=1e-6, rtol=0
  )
  _assert_matches(got, _golden(x, k=3.0, **golden_kwargs))
  assert not np.allclose(got, spatial_dependence(x, **kwargs), atol=1e-3)


def test_dependence_to_scaling():
  d = jnp.asarray([[0.5, 0.25, 0.5], [0.25, 1.0, 0.25], [0.5, 0.25, 0.5]])
  s = dependence_to_scaling(d)
  np.testing.assert_allclose(s, d / (4.0 / 9.0), rtol=1e-6)
  np.testing.assert_allclose(jnp.mean(s), 1.0, rtol=1e-6)
  stacked = dependence_to_scaling(jnp.stack([d, 2 * d]))
  np.testing.assert_allclose(stacked[0], stacked[1], rtol=1e-6)
  assert jnp.isnan(dependence_to_scaling(d.at[0, 0].set(jnp.nan))).all()
  with pytest.raises(ValueError, match="two dims"):
    dependence_to_scaling(jnp.ones(3))


@pytest.mark.parametrize(
    "args, kwargs, match",
    [
        ((np.ones((4, 4, 3)),), {}, "rank 4"),
        ((np.ones((1, 4, 4, 4, 3)),), {}, "rank 4"),
        ((np.ones((1, 6, 6, 2)), (4, 3)), {}, "odd"),
        ((np.ones((1, 6, 6, 2)), (3, 2)), {}, "odd|at least 2"),
        ((np.ones((1, 6, 6, 2)), (1, 3)), {}, "not eligible"),
        ((np.ones((1, 6, 6, 2)), (3, 1)), {}, "not eligible"),
        ((np.ones((1, 6, 6, 2)), (1, 1)), {}, "not eligible"),
        ((np.ones((1, 6, 6, 2)), 3), {}, "pair of ints"),
        ((np.ones((1, 6, 6, 2)),), dict(padding="FULL"), "padding"),
        ((np.ones((1, 6, 6, 2)),), dict(padding=((1, 1),)), "padding"),
        ((np.ones((1, 6, 6, 2)),), dict(padding=((1, -1), (1, 1))), "Negative"),
        ((np.ones((1, 6, 6, 2)),), dict(padding_mode="edge"), "padding_mode"),
        ((np.ones((1, 6, 6, 2)),), dict(padding="CIRCULAR",
                                         padding_mode="reflect"), "implies"),
        ((np.ones((1, 6, 6, 2)),), dict(strides=0), "positive"),
        ((np.ones((1, 6, 6, 2)),), dict(dilation=(1, 2, 3)), "dilation"),
        ((np.ones((1, 6, 6, 2)),), dict(k=0.0), "k must be positive"),
        ((np.ones((1, 6, 6, 2)),), dict(subsample=16), "key"),
        ((np.ones((1, 6, 6, 2)),), dict(subsample=0, key=jax.random.key(0)),
         "positive"),
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


def test_subsample_is_seeded_and_close_to_full():
  x = _relu_blur((128, 16, 16, 3), 11)
  full = np.asarray(spatial_dependence(x))
  n_pairs = 128 * 17 * 17  # the fewest of any displacement on the 18x18 map
  sample = 8192
  assert 4 * sample < n_pairs  # so every displacement is really sampled
  key = jax.random.key(42)
  a = np.asarray(spatial_dependence(x, subsample=sample, key=key))
  b = np.asarray(spatial_dependence(x, subsample=sample, key=key))
  c = np.asarray(
      spatial_dependence(x, subsample=sample, key=jax.random.key(7))
  )
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)  # the sample really is used
  # Measured max |sample - full| 0.021 and 0.023 for these keys (0.018-0.023
  # over others): the plug-in bias of 8192 pairs on the full data's 17 x 17
  # bins. Unpaired pixels would drop the off-centre entries (~0.14) to ~0.03.
  assert np.abs(a - full).max() < 0.04
  assert np.abs(c - full).max() < 0.04
  assert a[1, 1] == 1.0
  np.testing.assert_array_equal(a, a[::-1, ::-1])
  # A sample over a quarter of the pairs is not worth gathering: all pairs
  # are counted, exactly.
  whole = spatial_dependence(x, subsample=n_pairs // 3, key=key)
  np.testing.assert_array_equal(whole, full)


SHARDED_SCRIPT = textwrap.dedent(
    """
    import json
    import jax
    import numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from sgs_optax._dependence import spatial_dependence

    assert jax.device_count() == 4, jax.devices()
    rng = np.random.default_rng(0)
    z = rng.standard_normal((8, 9, 9, 6))
    x = np.maximum(z[:, 1:, 1:] + z[:, :-1, :-1] - 0.3, 0).astype(np.float32)
    mesh = Mesh(np.array(jax.devices()), ("batch",))
    sharded = jax.device_put(x, NamedSharding(mesh, P("batch")))
    assert len(sharded.addressable_shards) == 4
    plain = np.asarray(spatial_dependence(x))
    split = np.asarray(spatial_dependence(sharded))
    explicit_mesh = jax.make_mesh((4,), ("batch",),
                                  axis_types=(jax.sharding.AxisType.Explicit,))
    with jax.set_mesh(explicit_mesh):
      explicit = jax.device_put(x, NamedSharding(explicit_mesh, P("batch")))
      in_jit = np.asarray(jax.jit(spatial_dependence)(explicit))
    print(json.dumps([plain.tolist(), split.tolist(), in_jit.tolist()]))
    """
)


def test_batch_sharded_inputs_give_the_same_matrix(tmp_path):
  script = tmp_path / "sharded.py"
  script.write_text(SHARDED_SCRIPT)
  env = dict(os.environ)
  env["XLA_FLAGS"] = (
      env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
  ).strip()
  env["JAX_PLATFORMS"] = "cpu"
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env["PYTHONPATH"] = repo + os.pathsep + env.get("PYTHONPATH", "")
  proc = subprocess.run(
      [sys.executable, str(script)], env=env, capture_output=True, text=True,
      timeout=300, check=False,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  plain, split, explicit = map(
      np.asarray, json.loads(proc.stdout.splitlines()[-1]))
  assert not np.isnan(plain).any() and not np.allclose(plain, 1.0)
  np.testing.assert_allclose(split, plain, atol=1e-6, rtol=0)
  np.testing.assert_allclose(explicit, plain, atol=1e-6, rtol=0)


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
