"""Tests for sgs_optax._kernels (layouts, selection, broadcasting)."""

import jax.numpy as jnp
import numpy as np
import optax
import pytest

from sgs_optax import _kernels

PARAMS = {
    "conv": {"kernel": jnp.zeros((3, 5, 2, 4)), "bias": jnp.zeros(4)},
    "dense": {"kernel": jnp.zeros((4, 3))},
}


@pytest.mark.parametrize(
    "layout, spatial, inp, out",
    [("HWIO", (0, 1), 2, 3), ("OIHW", (2, 3), 1, 0), ("HWOI", (0, 1), 3, 2),
     ("IOHW", (2, 3), 0, 1), ("WIO", (0,), 1, 2), ("OIDHW", (2, 3, 4), 1, 0),
     ("IO", (), 0, 1)],
)
def test_parse_layout(layout, spatial, inp, out):
  axes = _kernels.parse_layout(layout)
  assert (axes.spatial, axes.input, axes.output, axes.ndim) == (
      spatial, inp, out, len(layout))


@pytest.mark.parametrize("layout", ["HWI", "HWIOO", "HHIO", "XYIO", "", 4])
def test_parse_layout_rejects(layout):
  with pytest.raises(ValueError, match="kernel_layout"):
    _kernels.parse_layout(layout)


def test_string_layout_selects_by_rank():
  assert _kernels.resolve_layouts(PARAMS) == {
      "conv": {"kernel": "HWIO", "bias": None}, "dense": {"kernel": None}}
  assert _kernels.resolve_layouts(PARAMS, "OIHW", include_dense=True) == {
      "conv": {"kernel": "OIHW", "bias": None}, "dense": {"kernel": "OI"}}


def test_layout_tree_is_validated():
  tree = {"conv": {"kernel": "OIHW", "bias": None}, "dense": {"kernel": "IO"}}
  assert _kernels.resolve_layouts(PARAMS, tree) == tree
  with pytest.raises(ValueError, match="conv/kernel"):
    _kernels.resolve_layouts(PARAMS, {**tree, "conv": {"kernel": "IO",
                                                       "bias": None}})
  with pytest.raises(ValueError, match="structure"):
    _kernels.resolve_layouts(PARAMS, {"conv": tree["conv"]})


def test_masked_nodes_are_never_selected():
  params = {"a": optax.MaskedNode(), "b": jnp.zeros((3, 3, 1, 1))}
  assert _kernels.resolve_layouts(params) == {"a": None, "b": "HWIO"}
  # A layout tree naming a leaf that optax.masked / partition replaced, as a
  # leaf or as a whole masked subtree (prefix mask).
  params = {"a": optax.MaskedNode(), "b": jnp.zeros((4, 1, 3, 3)),
            "c": optax.MaskedNode()}
  layouts = {"a": "OIHW", "b": "OIHW",
             "c": {"kernel": "OIHW", "bias": None}}
  assert _kernels.resolve_layouts(params, layouts) == {
      "a": None, "b": "OIHW", "c": None}
  assert _kernels.resolve_layouts(params, lambda p: layouts) == {
      "a": None, "b": "OIHW", "c": None}


@pytest.mark.parametrize("layout", ["HWIO", "OIHW", "HWOI", "IOHW"])
def test_broadcast_to_kernel_matches_explicit_loops(layout):
  rng = np.random.default_rng(0)
  sizes = {"H": 3, "W": 5, "I": 2, "O": 4}
  shape = tuple(sizes[c] for c in layout)
  kernel = rng.normal(size=shape)
  matrix = rng.normal(size=(3, 5, 4))
  got = np.asarray(kernel * _kernels.broadcast_to_kernel(matrix, layout))
  want = np.empty(shape)
  for index in np.ndindex(*shape):
    pos = dict(zip(layout, index))
    want[index] = kernel[index] * matrix[pos["H"], pos["W"], pos["O"]]
  np.testing.assert_allclose(got, want, rtol=1e-6)
  spatial_only = np.asarray(_kernels.broadcast_to_kernel(matrix[..., 0],
                                                         layout))
  assert spatial_only.shape == tuple(sizes[c] if c in "HW" else 1
                                     for c in layout)
