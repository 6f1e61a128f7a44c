"""Property-based tests of sgs and cdg (hypothesis, few examples each).

Golden values come from code written here: an explicit branched conv trained
by autodiff, numpy means and norms, preset matrices from their closed forms,
and numpy elementwise products.
"""

import functools

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
import pytest

import sgs_optax

SETTINGS = hypothesis.settings(
    max_examples=12, deadline=None, database=None,
    suppress_health_check=[hypothesis.HealthCheck.too_slow])

DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16}


cdg = sgs_optax.cdg


# ----------------------------------------------------------------------------
# (a) Any set of centred branches: sgs(branch_scaling) == the branched conv.


@st.composite
def branch_sets(draw):
  kernel = draw(st.sampled_from([3, 5]))
  sizes = [(a, b) for a in range(1, kernel + 1, 2)
           for b in range(1, kernel + 1, 2)]
  branches = draw(st.lists(st.sampled_from(sizes), min_size=1, max_size=4,
                           unique=True))
  c_out = draw(st.integers(1, 3))
  positive = st.floats(0.25, 2.0, allow_nan=False, allow_infinity=False)
  scales = []
  for _ in branches:
    if draw(st.booleans()):  # a scalar, or one per output channel.
      scales.append(draw(positive))
    else:
      scales.append(np.array(draw(st.lists(positive, min_size=c_out,
                                           max_size=c_out))))
  return dict(kernel=kernel, branches=branches, scales=scales, c_out=c_out,
              c_in=draw(st.integers(1, 2)),
              stride=draw(st.sampled_from([1, 2])),
              weight_decay=draw(st.sampled_from([0.0, 0.05])),
              seed=draw(st.integers(0, 2**16)))


def branch_crop(padded, kernel, branch):
  """The part of the padded input that a centred (a, b) branch reads."""
  (a, b), (h, w) = branch, padded.shape[1:3]
  top, left = (kernel - a) // 2, (kernel - b) // 2
  return padded[:, top:h - (kernel - a - top), left:w - (kernel - b - left)]


def conv(x, w, stride, padding):
  return jax.lax.conv_general_dilated(
      x, w, (stride, stride), padding,
      dimension_numbers=("NHWC", "HWIO", "NHWC"))


def numpy_merge(kernels, branches, scales, kernel):
  total = 0.0
  for v, (a, b), alpha in zip(kernels, branches, scales):
    top, left = (kernel - a) // 2, (kernel - b) // 2
    pads = ((top, kernel - a - top), (left, kernel - b - left), (0, 0), (0, 0))
    total = total + np.pad(np.asarray(v), pads) * np.asarray(alpha)
  return total


@SETTINGS
@hypothesis.given(case=branch_sets())
def test_any_centred_branch_set_trains_like_its_sgs_matrix(case):
  kernel, branches, scales = case["kernel"], case["branches"], case["scales"]
  stride, wd = case["stride"], case["weight_decay"]
  lr, momentum, steps = 0.1, 0.9, 3
  with jax.enable_x64(True):
    rng = np.random.default_rng(case["seed"])
    x = jnp.asarray(rng.normal(size=(2, 6, 6, case["c_in"])))
    pads = jax.lax.padtype_to_pads((6, 6), (kernel, kernel), (stride,) * 2,
                                   "SAME")
    out_hw = -(-6 // stride)
    target = jnp.asarray(rng.normal(size=(2, out_hw, out_hw, case["c_out"])))

    def loss_of_output(y):
      return jnp.mean((jnp.tanh(y) - target) ** 2)

    def branched_loss(vs):
      padded = jnp.pad(x, ((0, 0), *pads, (0, 0)))
      y = sum(conv(branch_crop(padded, kernel, br), v, stride, "VALID")
              * jnp.asarray(alpha)
              for v, br, alpha in zip(vs, branches, scales))
      return loss_of_output(y)

    # Golden: heavy-ball SGD with coupled L2 decay on the branch kernels.
    vs = [jnp.asarray(0.5 * rng.normal(size=(a, b, case["c_in"],
                                             case["c_out"])))
          for a, b in branches]
    w0 = numpy_merge(vs, branches, scales, kernel)
    traces = [jnp.zeros_like(v) for v in vs]
    branched_grad = jax.jit(jax.grad(branched_loss))
    for _ in range(steps):
      grads = branched_grad(vs)
      traces = [g + wd * v + momentum * t
                for g, v, t in zip(grads, vs, traces)]
      vs = [v - lr * t for v, t in zip(vs, traces)]
    want = numpy_merge(vs, branches, scales, kernel)

    # Merged conv trained with the SGS matrix of the branches.
    matrix = sgs_optax.branch_scaling((kernel, kernel), branches, scales)
    tx = optax.chain(sgs_optax.sgs(matrix), optax.add_decayed_weights(wd),
                     optax.sgd(lr, momentum=momentum))
    params = {"conv": {"kernel": jnp.asarray(w0)}}
    state = tx.init(params)
    plain_loss = lambda p: loss_of_output(
        conv(x, p["conv"]["kernel"], stride, pads))
    plain_grad = jax.jit(jax.grad(plain_loss))
    for _ in range(steps):
      updates, state = tx.update(plain_grad(params), state, params)
      params = optax.apply_updates(params, updates)
    got = np.asarray(params["conv"]["kernel"])

    assert got.dtype == np.float64
    assert np.abs(want - w0).max() > 1e-3  # It really trained.
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-10)


# ----------------------------------------------------------------------------
# (b) CDG keeps the channel mean and, under sobolev, never adds energy.


@SETTINGS
@hypothesis.given(
    n=st.integers(2, 9),
    spatial=st.sampled_from([(1, 1), (3, 3), (1, 3)]),
    c_in=st.integers(1, 3),
    lam=st.floats(1e-3, 30.0),
    boundary=st.sampled_from(["periodic", "neumann"]),
    metric=st.sampled_from(["sobolev", "reweighted_l2", "reweighted_sobolev"]),
    seed=st.integers(0, 2**16),
)
def test_cdg_keeps_channel_mean_and_sobolev_never_adds_energy(
    n, spatial, c_in, lam, boundary, metric, seed):
  rng = np.random.default_rng(seed)
  with jax.enable_x64(True):
    g = rng.normal(size=(*spatial, c_in, n)) * rng.uniform(0.1, 10.0)
    g += rng.normal() * 3.0  # a common offset: a large mean mode.
    tx = cdg(lam, metric=metric, boundary=boundary, allow_amplification=True)
    out, _ = tx.update({"conv": {"kernel": jnp.asarray(g)}}, tx.init(None))
    out = np.asarray(out["conv"]["kernel"])
  assert out.dtype == np.float64 and out.shape == g.shape
  scale = np.abs(g).max()
  np.testing.assert_allclose(out.mean(-1), g.mean(-1), rtol=0,
                             atol=1e-12 * scale)
  energy_in = (g**2).sum(-1)
  energy_out = (out**2).sum(-1)
  if metric == "sobolev" or lam >= 1:  # every multiplier is in (0, 1].
    assert np.all(energy_out <= energy_in * (1 + 1e-12))
  if metric == "sobolev" and lam > 0.1:
    # Not the identity: the non-constant part of every fibre was damped.
    centred = g - g.mean(-1, keepdims=True)
    assert np.all(energy_out < energy_in - 1e-3 * (centred**2).sum(-1))


# ----------------------------------------------------------------------------
# (c) Shapes, dtypes and structure of random param trees.

NAMES = st.sampled_from(["a", "b", "conv", "kernel", "bias", "x"])
SHAPES = st.one_of(
    st.tuples(st.sampled_from([1, 2, 3, 5]), st.sampled_from([1, 2, 3, 5]),
              st.integers(1, 3), st.integers(1, 4)),  # HWIO conv kernels.
    st.tuples(st.integers(1, 4), st.integers(1, 4)),  # dense kernels.
    st.tuples(st.integers(1, 5)),  # biases, norm scales.
    st.just(()),  # scalars.
)
LEAVES = st.tuples(SHAPES, st.sampled_from(sorted(DTYPES)))
TREES = st.dictionaries(
    NAMES,
    st.one_of(LEAVES, st.dictionaries(NAMES, LEAVES, min_size=1, max_size=3),
              st.lists(LEAVES, min_size=1, max_size=2)),
    min_size=1, max_size=4)


def is_spec(x):
  return isinstance(x, tuple) and len(x) == 2 and isinstance(x[1], str)


def materialise(spec_tree, seed):
  rng = np.random.default_rng(seed)
  return jax.tree.map(
      lambda spec: jnp.asarray(
          rng.normal(size=spec[0]).astype(DTYPES[spec[1]])),
      spec_tree, is_leaf=is_spec)


def preset_matrix(name, kernel_size):
  """The presets' matrices from their closed forms (unit scalars)."""
  i, j = np.indices(kernel_size)
  ci, cj = kernel_size[0] // 2, kernel_size[1] // 2
  if name == "acb":  # KxK + 1xK (middle row) + Kx1 (middle column).
    return 1.0 + (i == ci) + (j == cj)
  return 1.0 + ((i == ci) & (j == cj))  # repvgg: KxK + 1x1 (centre).


def expected_sgs(name, matrix, g):
  """sgs's effect on one gradient leaf, in numpy."""
  g = np.asarray(g)
  if g.ndim != 4 or min(g.shape[:2]) < 2:
    return g
  if name in ("acb", "repvgg"):
    if g.shape[0] % 2 == 0 or g.shape[1] % 2 == 0:
      return g  # even kernels are left alone (strict=False).
    matrix = preset_matrix(name, g.shape[:2])
  elif g.shape[:2] != matrix.shape:
    return g
  product = g.astype(np.float32) * matrix[:, :, None, None].astype(np.float32)
  return product.astype(g.dtype)


ARRAY_3X3 = np.array([[0.5, 1.0, 0.5], [1.0, 2.0, 1.0], [0.5, 1.0, 0.5]])


def transforms():
  return {
      "sgs(None)": (sgs_optax.sgs(), "none", None),
      "sgs(acb)": (sgs_optax.sgs("acb"), "acb", None),
      "sgs(repvgg)": (sgs_optax.sgs("repvgg"), "repvgg", None),
      "sgs(array)": (sgs_optax.sgs(ARRAY_3X3), "array", ARRAY_3X3),
      "cdg()": (cdg(), None, None),
      "cdg(neumann)": (cdg(metric="reweighted_sobolev", boundary="neumann"),
                       None, None),
      "chain": (optax.chain(sgs_optax.sgs("acb"), cdg(),
                            optax.add_decayed_weights(1e-3),
                            optax.sgd(0.1, momentum=0.9)), None, None),
  }


def assert_same_layout(got, want):
  assert jax.tree.structure(got) == jax.tree.structure(want)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    assert a.shape == b.shape and a.dtype == b.dtype, (a.shape, b.shape,
                                                       a.dtype, b.dtype)


@SETTINGS
@hypothesis.given(spec=TREES, seed=st.integers(0, 2**16))
def test_transforms_keep_structure_shapes_and_dtypes(spec, seed):
  params = materialise(spec, seed)
  grads = materialise(spec, seed + 1)
  has_sgs_array_target = any(
      g.ndim == 4 and g.shape[:2] == (3, 3) for g in jax.tree.leaves(grads))
  # No rank-4 leaf: the default layout selects nothing, and every transform
  # but the array one (which finds no fit) says so rather than do nothing.
  kernels = [g.shape[:2] for g in jax.tree.leaves(grads) if g.ndim == 4]
  # Kernels but none with odd spatial sizes of at least 2: a preset or the
  # learned mode would scale none of them, which raises.
  preset_target = any(min(size) >= 2 and all(s % 2 for s in size)
                      for size in kernels)
  for name, (tx, sgs_kind, matrix) in transforms().items():
    if name == "sgs(array)" and not has_sgs_array_target:
      with pytest.raises(ValueError, match="does not fit any"):
        tx.init(params)
      continue
    if not kernels and name != "sgs(array)":
      with pytest.raises(ValueError, match="'HWIO' selects none"):
        tx.init(params)
      continue
    if not preset_target and name in ("sgs(None)", "sgs(acb)",
                                      "sgs(repvgg)", "chain"):
      with pytest.raises(ValueError, match="scales none"):
        tx.init(params)
      continue
    state = tx.init(params)
    updates, state1 = tx.update(grads, state, params)
    assert_same_layout(updates, grads)
    _, state2 = tx.update(updates, state1, params)
    assert_same_layout(state2, state1)  # a stable state, e.g. for lax.cond.
    assert_same_layout(state1, state)
    for g, u in zip(jax.tree.leaves(grads), jax.tree.leaves(updates)):
      g, u = np.asarray(g), np.asarray(u)
      if sgs_kind is not None:
        want = (g if sgs_kind == "none" else
                expected_sgs(sgs_kind, matrix, g))
        np.testing.assert_array_equal(u, want, err_msg=name)
      elif name.startswith("cdg"):
        if g.ndim != 4 or g.shape[-1] == 1:
          np.testing.assert_array_equal(u, g, err_msg=name)
        else:  # The output-channel mean is kept (to the dtype's precision).
          g32, u32 = g.astype(np.float32), u.astype(np.float32)
          eps = 2.0**-7 if g.dtype == ml_dtypes.bfloat16 else 1e-5
          np.testing.assert_allclose(u32.mean(-1), g32.mean(-1), rtol=0,
                                     atol=eps * (np.abs(g32).max() + 1))


# ----------------------------------------------------------------------------
# (d) Non-finite gradients stay non-finite; apply_if_finite skips the step.


@SETTINGS
@hypothesis.given(
    bad=st.sampled_from([np.nan, np.inf, -np.inf]),
    where=st.tuples(st.integers(0, 2), st.integers(0, 2), st.integers(0, 1),
                    st.integers(0, 3)),
    dtype=st.sampled_from(sorted(DTYPES)),
    metric=st.sampled_from(["sobolev", "reweighted_l2", "reweighted_sobolev"]),
)
def test_non_finite_gradients_stay_non_finite(bad, where, dtype, metric):
  rng = np.random.default_rng(0)
  dt = DTYPES[dtype]
  grads = {
      "conv": {"kernel": rng.normal(size=(3, 3, 2, 4)).astype(dt),
               "bias": rng.normal(size=(4,)).astype(dt)},
      "other": {"kernel": rng.normal(size=(3, 3, 2, 4)).astype(dt)},
  }
  grads["conv"]["kernel"][where] = bad
  grads = jax.tree.map(jnp.asarray, grads)
  bad_mask = ~np.isfinite(np.asarray(grads["conv"]["kernel"], np.float32))

  # sgs: elementwise, so exactly that entry stays non-finite (Inf times a
  # zero matrix entry gives NaN); the zero corners of this branch set make
  # that happen when `where` is a corner.
  zero_corners = sgs_optax.branch_scaling((3, 3), [(1, 3), (3, 1)])
  assert zero_corners[0, 0] == 0
  for tx in (sgs_optax.sgs(zero_corners), sgs_optax.sgs("acb")):
    out, _ = tx.update(grads, tx.init(grads))
    got = np.asarray(out["conv"]["kernel"], np.float32)
    np.testing.assert_array_equal(~np.isfinite(got), bad_mask)
    for leaf in (out["conv"]["bias"], out["other"]["kernel"]):
      assert np.all(np.isfinite(np.asarray(leaf, np.float32)))

  # cdg: the bad entry spreads along its output-channel fibre, no further.
  tx = cdg(metric=metric)
  out, _ = tx.update(grads, tx.init(grads))
  got = np.asarray(out["conv"]["kernel"], np.float32)
  fibre_mask = np.broadcast_to(bad_mask.any(-1, keepdims=True), got.shape)
  np.testing.assert_array_equal(~np.isfinite(got), fibre_mask)
  assert out["conv"]["kernel"].dtype == dt
  for leaf in (out["conv"]["bias"], out["other"]["kernel"]):
    assert np.all(np.isfinite(np.asarray(leaf, np.float32)))


def test_apply_if_finite_skips_a_non_finite_step():
  rng = np.random.default_rng(1)
  params = {"conv": {"kernel": jnp.asarray(rng.normal(size=(3, 3, 2, 4)),
                                           jnp.float32),
                     "bias": jnp.zeros((4,))}}
  g1, g2 = (jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape),
                                               p.dtype), params)
            for _ in range(2))
  g_bad = jax.tree.map(lambda g: g.at[(0,) * g.ndim].set(jnp.nan), g1)

  def make():
    return optax.apply_if_finite(
        optax.chain(sgs_optax.sgs("acb"), cdg(),
                    optax.sgd(0.1, momentum=0.9)),
        max_consecutive_errors=2)

  def run(grad_list):
    tx = make()
    p, s = params, tx.init(params)
    step = jax.jit(tx.update)
    history = []
    for g in grad_list:
      updates, s = step(g, s, p)
      p = optax.apply_updates(p, updates)
      history.append((p, s))
    return history

  skipped = run([g1, g_bad, g2])
  # Not vacuous: unguarded, that step poisons every parameter it touches.
  tx = optax.chain(sgs_optax.sgs("acb"), cdg(), optax.sgd(0.1, momentum=0.9))
  poisoned, _ = tx.update(g_bad, tx.init(params), params)
  assert not np.all(np.isfinite(poisoned["conv"]["kernel"]))
  clean = run([g1, g2])
  (p1, s1), (p_bad, s_bad), (p_end, _s_end) = skipped
  # The non-finite step changed nothing but the error counters.
  jax.tree.map(np.testing.assert_array_equal, p_bad, p1)
  jax.tree.map(np.testing.assert_array_equal, s_bad.inner_state,
               s1.inner_state)
  assert int(s_bad.notfinite_count) == 1 and not bool(s_bad.last_finite)
  # And the run continues exactly as if that step had never happened.
  jax.tree.map(np.testing.assert_array_equal, p_end, clean[1][0])
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(p_end))
  assert not np.array_equal(p_end["conv"]["kernel"], p1["conv"]["kernel"])


def test_bfloat16_train_step_end_to_end():
  import flax.linen as nn  # pylint: disable=g-import-not-at-top

  class Net(nn.Module):
    dtype: jnp.dtype

    @nn.compact
    def __call__(self, x):
      conv = functools.partial(nn.Conv, dtype=self.dtype,
                               param_dtype=self.dtype)
      x = nn.relu(conv(4, (3, 3), strides=2, name="conv1")(x))
      return nn.Dense(3, dtype=self.dtype, param_dtype=self.dtype,
                      name="head")(x.mean(axis=(1, 2)))

  rng = np.random.default_rng(2)
  x = rng.normal(size=(4, 6, 6, 2)).astype(np.float32)
  y = jnp.asarray(rng.integers(0, 3, size=(4,)))
  sgd = (optax.add_decayed_weights(5e-4), optax.sgd(0.1, momentum=0.9))
  with_transforms = optax.chain(sgs_optax.sgs("acb"), cdg(), *sgd)

  def train(dtype, params=None, tx=with_transforms):
    model = Net(dtype)
    xs = jnp.asarray(x, dtype)
    if params is None:
      params = model.init(jax.random.key(0), xs)["params"]

    @jax.jit
    def step(p, s):
      def loss_fn(p):
        logits = model.apply({"params": p}, xs).astype(jnp.float32)
        return optax.softmax_cross_entropy_with_integer_labels(
            logits, y).mean()
      loss, grads = jax.value_and_grad(loss_fn)(p)
      updates, s = tx.update(grads, s, p)
      return optax.apply_updates(p, updates), s, loss, grads, updates

    state = tx.init(params)
    p1, state, loss, grads, updates = step(params, state)
    p2, state, _, _, _ = step(p1, state)
    return params, p2, state, loss, grads, updates

  p0, p2, state, loss, grads, updates = train(jnp.bfloat16)
  for tree in (p0, p2, grads, updates, optax.tree.get(state, "trace")):
    assert all(leaf.dtype == jnp.bfloat16 for leaf in jax.tree.leaves(tree))
  assert np.isfinite(float(loss))
  scalings = sgs_optax.get_scalings(state)
  assert scalings["conv1"]["kernel"].dtype == jnp.float32  # kept wide.
  assert not np.array_equal(np.asarray(p2["conv1"]["kernel"], np.float32),
                            np.asarray(p0["conv1"]["kernel"], np.float32))
  # The same two steps in float32 from the same start, with and without the
  # transforms: bfloat16 must land much closer to its float32 run than the
  # transforms move the conv kernel, or this test could not see them.
  p0_32 = jax.tree.map(lambda a: a.astype(jnp.float32), p0)
  _, p2_32, _, _, _, _ = train(jnp.float32, p0_32)
  _, p2_plain, _, _, _, _ = train(jnp.float32, p0_32, optax.chain(*sgd))
  kernel = lambda p: np.asarray(p["conv1"]["kernel"], np.float32)
  effect = np.max(np.abs(kernel(p2_32) - kernel(p2_plain)))
  error = np.max(np.abs(kernel(p2) - kernel(p2_32)))
  print(f"bf16 error {error:.2e}, effect of sgs+cdg {effect:.2e}")
  assert effect > 0.01
  assert error < 0.3 * effect, (error, effect)
