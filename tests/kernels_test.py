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


def test_spatial_letters_are_names_in_the_conv_order():
  whio = _kernels.parse_layout("WHIO")
  assert whio.spatial == (0, 1) and whio.conv_order == (1, 0)
  assert _kernels.parse_layout("HWIO").conv_order == (0, 1)
  assert _kernels.parse_layout("OIWDH").conv_order == (1, 2, 0)
  assert _kernels.to_conv_order((5, 3), "WHIO") == (3, 5)
  # A matrix measured (kh, kw) = (3, 5) is stored (kw, kh) = (5, 3): entry
  # [h, w] of the measured one lands at [w, h].
  measured = np.arange(15.0).reshape(3, 5)
  stored = np.asarray(_kernels.matrix_from_conv_order(measured, "WHIO"))
  for h in range(3):
    for w in range(5):
      assert stored[w, h] == measured[h, w]
  # Stacked, with a trailing per-channel axis: only the spatial axes move.
  stacked = np.arange(2 * 3 * 5 * 4.0).reshape(2, 3, 5, 4)
  moved = np.asarray(_kernels.matrix_from_conv_order(stacked, "LWHIO", 1))
  assert moved.shape == (2, 5, 3, 4)
  assert moved[1, 4, 2, 3] == stacked[1, 2, 4, 3]


# Realistic kernels read with their own layout: never flagged.
PLAUSIBLE = [
    ((3, 3, 64, 64), "HWIO"), ((1, 1, 64, 256), "HWIO"),
    ((1, 1, 3, 3), "HWIO"), ((7, 7, 3, 64), "HWIO"), ((3, 3, 1, 64), "HWIO"),
    ((3, 3, 1, 1), "HWIO"), ((3, 3, 8, 8), "HWIO"), ((5, 5, 3, 3), "HWIO"),
    ((2, 2, 64, 128), "HWIO"), ((4, 4, 3, 3), "HWIO"), ((4, 4, 64, 3), "HWIO"),
    ((16, 16, 3, 768), "HWIO"), ((1, 7, 3, 3), "HWIO"),
    ((64, 64, 3, 3), "OIHW"),
    ((32, 1, 3, 3), "OIHW"), ((3, 3, 1, 1), "OIHW"), ((3, 3, 3, 3), "OIHW"),
    ((64, 32, 4, 4), "IOHW"), ((3, 16, 32), "WIO"), ((2, 64, 3), "WIO"),
    ((10, 1, 512), "WIO"), ((32, 16, 3), "OIW"), ((3, 3, 3, 16, 32), "DHWIO"),
    ((4, 3, 3, 16, 16), "LHWIO"), ((32, 16, 3, 3), "OIHW"),
]
# Mislabelled kernels: the string reads an even spatial size more than
# twice the odd k of the other arrangement.
IMPLAUSIBLE = [
    ((32, 16, 3, 3), "HWIO", "OIHW"), ((32, 1, 3, 3), "HWIO", "OIHW"),
    ((3, 3, 16, 32), "OIHW", "HWIO"), ((3, 3, 1, 64), "OIHW", "HWIO"),
    ((3, 3, 64, 64), "OIHW", "HWIO"), ((64, 32, 3, 3), "HWOI", "OIHW"),
    ((32, 16, 3), "WIO", "OIW"), ((3, 16, 32), "OIW", "WIO"),
    ((32, 16, 3, 3, 3), "DHWIO", "OIDHW"), ((4, 32, 16, 5, 5), "LHWIO",
                                            "LOIHW"),
]


@pytest.mark.parametrize("shape, layout", PLAUSIBLE)
def test_plausibility_rule_never_flags_realistic_kernels(shape, layout):
  assert _kernels.more_plausible_layout(shape, layout) is None


@pytest.mark.parametrize("shape, layout, other", IMPLAUSIBLE)
def test_plausibility_rule_flags_mislabelled_kernels(shape, layout, other):
  assert _kernels.more_plausible_layout(shape, layout) == other


def test_case1_sgs_and_cdg_reject_a_layout_string_that_misreads_a_kernel():
  import jax

  import sgs_optax

  torch_style = {"w": jnp.ones((32, 16, 3, 3)), "b": jnp.ones(32)}
  flax_style = {"w": jnp.ones((3, 3, 16, 32)), "b": jnp.ones(32)}
  message = r"'w'.*far more plausibly 'OIHW'.*conv_layouts.*mask"
  for tx in (sgs_optax.sgs("acb"), sgs_optax.sgs(), sgs_optax.cdg()):
    with pytest.raises(ValueError, match=message):
      tx.init(torch_style)
  # cdg is stateless: the rule holds at update, eagerly and under jit.
  cdg = sgs_optax.cdg()
  with pytest.raises(ValueError, match=message):
    cdg.update(torch_style, optax.EmptyState())
  with pytest.raises(ValueError, match=message):
    jax.jit(cdg.update)(torch_style, optax.EmptyState())
  with pytest.raises(ValueError, match="far more plausibly 'HWIO'"):
    sgs_optax.cdg(kernel_layout="OIHW").update(flax_style,
                                                optax.EmptyState())
  with pytest.raises(ValueError, match="far more plausibly 'HWIO'"):
    sgs_optax.sgs("acb", kernel_layout="OIHW").init(flax_style)
  # The right layout passes, and so do the explicit opt-outs.
  updates, _ = sgs_optax.cdg(kernel_layout="OIHW").update(
      torch_style, optax.EmptyState())
  assert updates["w"].shape == (32, 16, 3, 3)
  mixed = {**torch_style, "v": jnp.ones((3, 3, 4, 8)).at[..., 0].set(5.0)}
  for tx in (sgs_optax.cdg(mask={"w": False, "b": False, "v": True}),
             sgs_optax.cdg(kernel_layout={"w": None, "b": None,
                                          "v": "HWIO"})):
    updates, _ = tx.update(mixed, tx.init(mixed))
    assert (np.asarray(updates["w"]) == 1).all()
    assert not np.array_equal(updates["v"], mixed["v"])
  # A tree is an explicit statement: a kernel that really is 32x16 passes.
  tx = sgs_optax.cdg(kernel_layout={"w": "HWIO", "b": None})
  tx.update(torch_style, tx.init(torch_style))
