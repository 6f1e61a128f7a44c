"""Tests for conv geometry (`_geometry.py`).

Golden values come from lax and Flax themselves: a conv with the padding as
they spell it must equal a VALID conv of the input padded by hand (`jnp.pad`)
with the pads and fill that `explicit_pads` resolves.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sgs_optax import _geometry

_JNP_MODES = {"zeros": "constant", "circular": "wrap", "reflect": "reflect"}


def _dimension_numbers(rank):
  spatial = "DHW"[3 - rank:]
  return ("N" + spatial + "C", spatial + "IO", "N" + spatial + "C")


def _lax_conv(x, w, strides, padding, dilation):
  return jax.lax.conv_general_dilated(
      x, w, strides, padding, rhs_dilation=dilation,
      dimension_numbers=_dimension_numbers(x.ndim - 2),
  )


def _padded_valid_conv(x, w, pads, mode, strides, dilation):
  xp = jnp.pad(x, ((0, 0), *pads, (0, 0)), mode=_JNP_MODES[mode])
  return _lax_conv(xp, w, strides, "VALID", dilation)


def _data(spatial_shape, kernel_size, seed):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((2, *spatial_shape, 3)).astype(np.float32)
  w = rng.standard_normal((*kernel_size, 3, 2)).astype(np.float32)
  return jnp.asarray(x), jnp.asarray(w)


# (spatial shape, kernel size, strides, dilation): odd and even sizes, strides
# that do and do not divide the input, dilations, in 1-D, 2-D and 3-D.
GEOMETRIES = [
    ((8,), (3,), (2,), (1,)),
    ((9,), (4,), (3,), (2,)),
    ((8, 7), (3, 3), (2, 2), (1, 1)),
    ((7, 10), (3, 2), (1, 3), (2, 1)),
    ((9, 8), (5, 3), (2, 1), (1, 3)),
    ((5, 6, 7), (3, 3, 3), (2, 2, 2), (1, 1, 1)),
    ((6, 5, 8), (3, 1, 2), (1, 2, 3), (2, 1, 2)),
]


@pytest.mark.parametrize("padding", ["SAME", "SAME_LOWER", "VALID", "same"])
@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_lax_strings_pad_as_lax_does(padding, geometry):
  spatial_shape, kernel_size, strides, dilation = geometry
  x, w = _data(spatial_shape, kernel_size, len(spatial_shape))
  pads, mode = _geometry.explicit_pads(
      padding, spatial_shape=spatial_shape, kernel_size=kernel_size,
      strides=strides, dilation=dilation,
  )
  assert mode == "zeros"
  assert all(isinstance(p, int) for pair in pads for p in pair)
  want = _lax_conv(x, w, strides, padding.upper(), dilation)
  got = _lax_conv(x, w, strides, pads, dilation)
  np.testing.assert_array_equal(got, want)
  np.testing.assert_array_equal(
      _padded_valid_conv(x, w, pads, mode, strides, dilation), want
  )


def test_same_with_stride_2_pads_asymmetrically():
  pads, _ = _geometry.explicit_pads(
      "SAME", spatial_shape=(8, 8), kernel_size=(3, 3), strides=2
  )
  assert pads == ((0, 1), (0, 1))
  pads, _ = _geometry.explicit_pads(
      "SAME_LOWER", spatial_shape=(8, 8), kernel_size=(3, 3), strides=2
  )
  assert pads == ((1, 0), (1, 0))


def _flax_conv_matches(padding, geometry, **resolve_kwargs):
  spatial_shape, kernel_size, strides, dilation = geometry
  x, _ = _data(spatial_shape, kernel_size, 7)
  conv = nn.Conv(2, kernel_size, strides=strides, padding=padding,
                 kernel_dilation=dilation)
  params = conv.init(jax.random.key(0), x)
  pads, mode = _geometry.explicit_pads(
      padding, spatial_shape=spatial_shape, kernel_size=kernel_size,
      strides=strides, dilation=dilation, **resolve_kwargs,
  )
  w = params["params"]["kernel"]
  b = params["params"]["bias"]
  want = conv.apply(params, x)
  got = _padded_valid_conv(x, w, pads, mode, strides, dilation) + b
  np.testing.assert_allclose(got, want, atol=1e-6, rtol=0)
  return pads, mode


@pytest.mark.parametrize("padding", ["CIRCULAR", "REFLECT"])
@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_flax_fill_strings_pad_as_flax_does(padding, geometry):
  pads, mode = _flax_conv_matches(padding, geometry)
  assert mode == padding.lower()
  # The fill matters: the same pads with zeros give another answer.
  spatial_shape, kernel_size, strides, dilation = geometry
  if any(p for pair in pads for p in pair):
    x, w = _data(spatial_shape, kernel_size, 7)
    with_zeros = _padded_valid_conv(x, w, pads, "zeros", strides, dilation)
    with_fill = _padded_valid_conv(x, w, pads, mode, strides, dilation)
    assert not np.allclose(with_zeros, with_fill)


@pytest.mark.parametrize("geometry", [g for g in GEOMETRIES if len(g[0]) == 1])
def test_flax_causal_pads_left_with_zeros(geometry):
  pads, mode = _flax_conv_matches("CAUSAL", geometry)
  span = _geometry.dilated_kernel(geometry[1], geometry[3])
  assert pads == ((span[0] - 1, 0),) and mode == "zeros"


@pytest.mark.parametrize(
    "padding",
    [0, 2, np.int64(1), [1], [(2, 0)], (1, (0, 2)), ((1, 2), (0, 1), 2)],
)
def test_int_and_per_axis_padding_as_flax_reads_it(padding):
  rank = len(padding) if isinstance(padding, (list, tuple)) else 2
  geometry = next(g for g in GEOMETRIES if len(g[0]) == rank)
  # Flax wants (lo, hi) pairs as tuples and plain ints.
  flax_padding = (
      [tuple(p) if isinstance(p, (list, tuple)) else p for p in padding]
      if isinstance(padding, (list, tuple)) else int(padding)
  )
  pads, _ = _geometry.explicit_pads(
      padding, spatial_shape=geometry[0], kernel_size=geometry[1],
      strides=geometry[2], dilation=geometry[3],
  )
  flax_pads, mode = _flax_conv_matches(flax_padding, geometry)
  assert pads == flax_pads and mode == "zeros"


def test_padding_mode_is_kept_for_lax_strings_and_explicit_pads():
  for padding in ("SAME", 1, [(1, 1), (1, 1)]):
    assert _geometry.explicit_pads(
        padding, spatial_shape=(6, 6), kernel_size=3, padding_mode="reflect"
    ) == (((1, 1), (1, 1)), "reflect")
  # A Flax string agrees with its own fill.
  assert _geometry.explicit_pads(
      "CIRCULAR", spatial_shape=(6,), kernel_size=5, padding_mode="circular"
  ) == (((2, 2),), "circular")


def test_as_sizes_and_dilated_kernel():
  assert _geometry.as_sizes(3, 2, "k") == (3, 3)
  assert _geometry.as_sizes(np.int32(2), 3, "k") == (2, 2, 2)
  sizes = _geometry.as_sizes((np.int64(3), 5), 2, "k")
  assert sizes == (3, 5) and not any(isinstance(s, np.integer) for s in sizes)
  assert _geometry.as_sizes(np.array([1, 7]), 2, "k") == (1, 7)
  assert _geometry.dilated_kernel((3, 1, 5), (2, 3, 1)) == (5, 1, 5)


@pytest.mark.parametrize(
    "value, n, match",
    [
        (True, 2, "kernel_size"),
        ((3, False), 2, "kernel_size"),
        (np.bool_(True), 1, "kernel_size"),
        (3.0, 2, "kernel_size"),
        ((3, 3.0), 2, "kernel_size"),
        ((3, 3), 3, "kernel_size.*3 ints"),
        ("33", 2, "kernel_size"),
        (None, 2, "kernel_size"),
        ((0, 3), 2, "at least 1"),
    ],
)
def test_as_sizes_rejects(value, n, match):
  with pytest.raises(ValueError, match=match):
    _geometry.as_sizes(value, n, "kernel_size", minimum=1)


@pytest.mark.parametrize(
    "padding, kwargs, match",
    [
        ("FULL", {}, "Unsupported padding"),
        (-1, {}, "Negative"),
        (((1, -1), (0, 0)), {}, "Negative"),
        (((1, 1),), {}, "one entry per spatial axis"),
        (((1, 1, 1), (1, 1)), {}, "pair"),
        (True, {}, "bool"),
        (1.5, {}, "ints"),
        ("CAUSAL", {}, "1-D"),
        ("CIRCULAR", dict(padding_mode="reflect"), "implies"),
        ("SAME", dict(padding_mode="edge"), "padding_mode"),
        ("SAME", dict(strides=0), "strides"),
        ("SAME", dict(dilation=(1, 2, 3)), "dilation"),
        ("SAME", dict(kernel_size=(3,)), "kernel_size"),
    ],
)
def test_explicit_pads_rejects(padding, kwargs, match):
  kwargs = dict(dict(spatial_shape=(6, 6), kernel_size=3), **kwargs)
  with pytest.raises(ValueError, match=match):
    _geometry.explicit_pads(padding, **kwargs)


def test_causal_conflicting_fill_raises():
  with pytest.raises(ValueError, match="implies"):
    _geometry.explicit_pads(
        "CAUSAL", spatial_shape=(6,), kernel_size=3, padding_mode="circular"
    )


def test_docstring_example():
  import doctest  # pylint: disable=g-import-not-at-top
  result = doctest.testmod(_geometry, optionflags=doctest.NORMALIZE_WHITESPACE)
  assert result.attempted > 0 and result.failed == 0
