"""Tests for sgs_optax._provenance: how a value's axes map to a params leaf.

The golden mapping of each data-movement function comes from probing it
numerically: feed it, for each leaf axis, an array that varies along that
axis only, and see along which output axes the result varies.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sgs_optax import _capture
from sgs_optax import _provenance

SHAPE = (2, 3, 1, 5)


def walked_axes(fn):
  """The axes the capture walk gives ``fn(leaf)``."""
  leaf = jnp.ones(SHAPE)
  closed = jax.make_jaxpr(fn)(leaf)
  _, (prov,) = _capture._run(closed.jaxpr, closed.consts, [leaf],
                             [_provenance.of_leaf(0, len(SHAPE))], [])
  return prov.axes


def probed_axes(fn):
  """For each output axis, the one leaf axis it varies with, None if none,
  or "mixed" if several: measured on probes."""
  varies = []
  for axis in range(len(SHAPE)):
    probe = np.broadcast_to(
        np.arange(SHAPE[axis], dtype=np.float32).reshape(
            [-1 if a == axis else 1 for a in range(len(SHAPE))]), SHAPE)
    out = np.asarray(fn(jnp.asarray(probe)), np.float32)
    varies.append([np.ptp(out, axis=i).max() > 0 if out.shape[i] > 1
                   else False for i in range(out.ndim)])
  out = []
  for i in range(len(varies[0])):
    axes = [a for a in range(len(SHAPE)) if varies[a][i]]
    out.append(axes[0] if len(axes) == 1 else None if not axes else "mixed")
  return out


MOVES = {
    "transpose": lambda w: jnp.transpose(w, (2, 0, 3, 1)),
    "T": lambda w: w.T,
    "moveaxis": lambda w: jnp.moveaxis(w, 0, -1),
    "drop size-1": lambda w: w.reshape(2, 3, 5),
    "add size-1": lambda w: w.reshape(2, 1, 3, 1, 5),
    "index None": lambda w: w[None],
    "squeeze": lambda w: jnp.squeeze(w, 2),
    "broadcast": lambda w: jnp.broadcast_to(w, (4, 2, 3, 1, 5)),
    "flip and cast": lambda w: jnp.flip(w, 0).astype(jnp.bfloat16),
    "reshape then swap": lambda w: jnp.swapaxes(w.reshape(2, 3, 5), 0, 2),
    "scale and shift": lambda w: 2.0 * w + 1.0,
}


@pytest.mark.parametrize("name", sorted(MOVES))
def test_axes_of_data_movement_match_probes(name):
  fn = MOVES[name]
  walked = walked_axes(fn)
  probed = probed_axes(fn)
  assert "mixed" not in probed
  # A size-1 leaf axis cannot be probed (it never varies): compare the rest.
  sized = [w if w is None or SHAPE[w] > 1 else None for w in walked]
  assert sized == probed, (walked, probed)


@pytest.mark.parametrize("fn", [lambda w: w.reshape(6, 5),
                                lambda w: w.reshape(2, 15),
                                lambda w: w.reshape(5, 2, 3),
                                lambda w: w @ jnp.arange(25.0).reshape(5, 5)])
def test_merging_or_mixing_gives_unknown_axes(fn):
  assert walked_axes(fn) is None
  # Not a permutation indeed: some output axis varies with two leaf axes,
  # or the output sizes are no arrangement of the leaf's.
  probed = probed_axes(fn)
  out_shape = jax.eval_shape(fn, jnp.ones(SHAPE)).shape
  assert "mixed" in probed or sorted(s for s in out_shape if s > 1) != sorted(
      s for s in SHAPE if s > 1)


def test_standardisation_keeps_axes_two_leaves_agree_or_not():
  standardised = lambda w: (w - w.mean(axis=(0, 1))) / (w.std() + 1e-5)
  assert walked_axes(standardised) == (0, 1, 2, 3)
  square = jnp.ones((3, 3))
  closed = jax.make_jaxpr(lambda w: w + w.T)(square)
  _, (prov,) = _capture._run(closed.jaxpr, closed.consts, [square],
                             [_provenance.of_leaf(0, 2)], [])
  assert prov.axes is None  # (0, 1) and (1, 0) disagree.


def test_scan_slices_name_the_stacked_axis():
  stacked = _provenance.of_leaf(3, 5)
  body = _provenance.sliced(stacked)
  assert (body.axes, body.scanned) == ((1, 2, 3, 4), (0,))
  letters = _provenance.kernel_letters(body, (3, 2, 0, 1))
  assert _provenance.layout(letters, 5) == "LHWIO"
  twice = _provenance.sliced(body)  # a scan over the layers' first axis.
  assert _provenance.layout(_provenance.kernel_letters(twice, (2, 1, 0)),
                            5) is None  # "LL..." is no layout.
