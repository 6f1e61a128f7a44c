"""SGD on a branched conv net == SGD with sgs(branch_scaling) on the merged one.

The golden trajectory is the branched network trained by autodiff; merging is
done here with numpy padding, independently of `sgs_optax.merge_branches`.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sgs_optax

STEPS = 20
KERNEL = (3, 3)
CHANNELS = (2, 4, 4)  # input, conv1 and conv2 output channels.

BRANCH_SETS = {
    "acb": ([(3, 3), (1, 3), (3, 1)], None),
    "repvgg": ([(3, 3), (1, 1)], None),
    "scalars": ([(3, 3), (3, 1), (1, 1)], [0.7, 1.5, 2.0]),
    "per_channel": (
        [(3, 3), (1, 3), (1, 1)],
        [1.0, np.linspace(0.5, 1.5, 4), np.linspace(2.0, 0.25, 4)],
    ),
}

OPTIMIZERS = {
    "sgd": lambda: optax.sgd(0.05),
    "momentum": lambda: optax.sgd(0.05, momentum=0.9),
    "nesterov": lambda: optax.sgd(0.05, momentum=0.9, nesterov=True),
    "weight_decay": lambda: optax.chain(
        optax.add_decayed_weights(5e-2), optax.sgd(0.05, momentum=0.9)
    ),
}


def numpy_merge(kernels, branches, scales, layout):
  """W = sum_k alpha_k * pad(V_k), by explicit zero-padding."""
  total = 0.0
  for kernel, (a, b), alpha in zip(kernels, branches, scales):
    kernel = np.asarray(kernel)
    top, left = (KERNEL[0] - a) // 2, (KERNEL[1] - b) // 2
    spatial = ((top, KERNEL[0] - a - top), (left, KERNEL[1] - b - left))
    pads = spatial + ((0, 0), (0, 0)) if layout == "HWIO" else (
        ((0, 0), (0, 0)) + spatial)
    alpha = np.asarray(alpha)
    if alpha.ndim and layout == "OIHW":
      alpha = alpha[:, None, None, None]
    total = total + np.pad(kernel, pads) * alpha
  return total


def scales_or_ones(branches, scales):
  return scales if scales is not None else [1.0] * len(branches)


class Net(nn.Module):
  """Two 3x3 convs (the second strided) and a dense head."""

  conv: type

  @nn.compact
  def __call__(self, x):
    x = nn.relu(self.conv(CHANNELS[1], name="conv1")(x))
    x = nn.relu(self.conv(CHANNELS[2], strides=2, name="conv2")(x))
    return nn.Dense(3, name="head")(x.mean(axis=(1, 2)))


def batches(seed):
  key = jax.random.key(seed)
  for _ in range(STEPS):
    key, kx, ky = jax.random.split(key, 3)
    yield (jax.random.normal(kx, (4, 7, 7, CHANNELS[0]), jnp.float64),
           jax.random.randint(ky, (4,), 0, 3))


def train(model, params, tx):
  def loss(p, x, y):
    logits = model.apply({"params": p}, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  @jax.jit
  def step(p, s, x, y):
    grads = jax.grad(loss)(p, x, y)
    updates, s = tx.update(grads, s, p)
    return optax.apply_updates(p, updates), s

  state = tx.init(params)
  for x, y in batches(1):
    params, state = step(params, state, x, y)
  return params


@pytest.mark.parametrize("optimizer", sorted(OPTIMIZERS))
@pytest.mark.parametrize("branch_set", sorted(BRANCH_SETS))
def test_hwio_sgs_matches_branched_training(branch_set, optimizer):
  branches, scales = BRANCH_SETS[branch_set]
  with jax.enable_x64(True):
    branched = Net(lambda f, name, strides=1: sgs_optax.BranchedConv(
        f, KERNEL, branches, scales, strides=strides, param_dtype=jnp.float64,
        name=name))
    plain = Net(lambda f, name, strides=1: nn.Conv(
        f, KERNEL, strides=strides, param_dtype=jnp.float64, name=name))
    x0 = jnp.zeros((1, 7, 7, CHANNELS[0]), jnp.float64)
    params_b = branched.init(jax.random.key(0), x0)["params"]

    def merge(p):
      merged = dict(p)
      for name in ("conv1", "conv2"):
        kernels = [p[name][f"kernel_{i}"] for i in range(len(branches))]
        merged[name] = {
            "kernel": jnp.asarray(numpy_merge(
                kernels, branches, scales_or_ones(branches, scales), "HWIO")),
            "bias": p[name]["bias"],
        }
      return merged

    trained_b = train(branched, params_b, OPTIMIZERS[optimizer]())
    scaling = sgs_optax.branch_scaling(KERNEL, branches, scales)
    tx = optax.chain(sgs_optax.sgs(scaling), OPTIMIZERS[optimizer]())
    trained_m = train(plain, merge(params_b), tx)

    expected, got = merge(trained_b), trained_m
    for name in ("conv1", "conv2"):
      assert got[name]["kernel"].dtype == jnp.float64
      moved = np.abs(expected[name]["kernel"] - merge(params_b)[name]["kernel"])
      assert moved.max() > 1e-3  # the weights really trained.
      err = np.abs(got[name]["kernel"] - expected[name]["kernel"]).max()
      assert err < 1e-9, (name, err)
      np.testing.assert_allclose(got[name]["bias"], expected[name]["bias"],
                                 rtol=0, atol=1e-9)
    np.testing.assert_allclose(got["head"]["kernel"],
                               expected["head"]["kernel"], rtol=0, atol=1e-9)


def fit(logits_fn, params, tx, batches_):
  """Trains ``params`` of ``logits_fn`` with ``tx``, one step per batch."""
  def loss(p, x, y):
    return optax.softmax_cross_entropy_with_integer_labels(
        logits_fn(p, x), y).mean()

  @jax.jit
  def step(p, s, x, y):
    updates, s = tx.update(jax.grad(loss)(p, x, y), s, p)
    return optax.apply_updates(p, updates), s

  state = tx.init(params)
  for x, y in batches_:
    params, state = step(params, state, x, y)
  return params


def oihw_conv(x, w, stride):
  pads = jax.lax.padtype_to_pads(x.shape[2:], KERNEL, (stride,) * 2, "SAME")
  return pads, jax.lax.conv_general_dilated(
      x, w, (stride,) * 2, pads, dimension_numbers=("NCHW", "OIHW", "NCHW"))


def oihw_branched_conv(x, kernels, branches, scales, stride):
  """Each branch as its own VALID conv on its crop of the padded input."""
  pads = jax.lax.padtype_to_pads(x.shape[2:], KERNEL, (stride,) * 2, "SAME")
  xp = jnp.pad(x, ((0, 0), (0, 0), *pads))
  out = 0.0
  for w, (a, b), alpha in zip(kernels, branches, scales):
    top, left = (KERNEL[0] - a) // 2, (KERNEL[1] - b) // 2
    crop = xp[:, :, top:xp.shape[2] - (KERNEL[0] - a - top),
              left:xp.shape[3] - (KERNEL[1] - b - left)]
    y = jax.lax.conv_general_dilated(
        crop, w, (stride,) * 2, "VALID",
        dimension_numbers=("NCHW", "OIHW", "NCHW"))
    out = out + y * jnp.reshape(jnp.asarray(alpha), (-1, 1, 1))
  return out


@pytest.mark.parametrize("branch_set", ["acb", "per_channel"])
def test_oihw_sgs_matches_branched_training(branch_set):
  branches, scales = BRANCH_SETS[branch_set]
  alphas = scales_or_ones(branches, scales)
  optimizer = OPTIMIZERS["weight_decay"]
  with jax.enable_x64(True):
    key = jax.random.key(3)
    params_b = {}
    for name, cin, cout in (("conv1", CHANNELS[0], CHANNELS[1]),
                            ("conv2", CHANNELS[1], CHANNELS[2])):
      params_b[name] = {}
      for i, (a, b) in enumerate(branches):
        key, sub = jax.random.split(key)
        params_b[name][f"kernel_{i}"] = 0.3 * jax.random.normal(
            sub, (cout, cin, a, b), jnp.float64)
    key, sub = jax.random.split(key)
    params_b["head"] = 0.3 * jax.random.normal(sub, (3, CHANNELS[2]),
                                               jnp.float64)

    def head(h, w):
      return h.mean(axis=(2, 3)) @ w.T

    def branched_logits(p, x):
      kernels = lambda n: [p[n][f"kernel_{i}"] for i in range(len(branches))]
      h = jax.nn.relu(oihw_branched_conv(x, kernels("conv1"), branches,
                                         alphas, 1))
      h = jax.nn.relu(oihw_branched_conv(h, kernels("conv2"), branches,
                                         alphas, 2))
      return head(h, p["head"])

    def plain_logits(p, x):
      h = jax.nn.relu(oihw_conv(x, p["conv1"], 1)[1])
      h = jax.nn.relu(oihw_conv(h, p["conv2"], 2)[1])
      return head(h, p["head"])

    def merge(p):
      out = {"head": p["head"]}
      for n in ("conv1", "conv2"):
        kernels = [p[n][f"kernel_{i}"] for i in range(len(branches))]
        out[n] = jnp.asarray(numpy_merge(kernels, branches, alphas, "OIHW"))
      return out

    def nchw_batches():
      return ((jnp.moveaxis(x, -1, 1), y) for x, y in batches(2))

    trained_b = fit(branched_logits, params_b, optimizer(), nchw_batches())
    scaling = sgs_optax.branch_scaling(KERNEL, branches, scales)
    tx = optax.chain(sgs_optax.sgs(scaling, kernel_layout="OIHW"), optimizer())
    trained_m = fit(plain_logits, merge(params_b), tx, nchw_batches())
    expected = merge(trained_b)
    for n in ("conv1", "conv2"):
      err = np.abs(trained_m[n] - expected[n]).max()
      assert err < 1e-9, (n, err)
      assert np.abs(expected[n] - merge(params_b)[n]).max() > 1e-3


# N-D and dilated branch sets. The branched network below is plain lax code:
# SAME pads by the formula, one VALID (dilated) conv per branch on its crop of
# the padded input, and merging by a loop over every tap; nothing from
# sgs_optax but the transform under test.

ND_STEPS = 6
ND_CHANNELS = (2, 3, 3)  # input, conv1 and conv2 output channels.

ND_BRANCH_SETS = {  # kernel, branches, dilations, scales, spatial input size.
    "1d": ((7,), [(7,), (3,), (3,), (1,)], [(1,), (1,), (2,), (1,)],
           [1.0, 0.5, np.array([0.5, 1.0, 2.0]), 2.0], (12,)),
    "3d": ((3, 3, 3), [(3, 3, 3), (1, 3, 3), (3, 1, 1), (1, 1, 1)], None,
           [1.0, 0.7, np.array([1.5, 0.5, 1.0]), 1.5], (5, 5, 4)),
    "2d_dilated": ((7, 7), [(7, 7), (3, 3), (3, 3)], [(1, 1), (2, 2), (3, 3)],
                   [1.0, 1.3, np.array([0.5, 1.0, 2.0])], (9, 8)),
    # The "unireplknet" preset itself, for a 9-tap 1-D kernel: the published
    # sizes (5, 5, 3, 3) with dilations (1, 2, 3, 4), written out here.
    "1d_unireplknet": ((9,), [(9,), (5,), (5,), (3,), (3,)],
                       [(1,), (1,), (2,), (3,), (4,)], None, (14,)),
}


def same_pads(size, kernel, stride):
  """lax's SAME padding for one axis: output ceil(size / stride)."""
  out = -(-size // stride)
  total = max((out - 1) * stride + kernel - size, 0)
  return total // 2, total - total // 2


def nd_dimension_numbers(n):
  letters = "DHW"[-n:]
  return (f"N{letters}C", f"{letters}IO", f"N{letters}C")


def nd_branched_conv(x, kernels, kernel, branches, dilations, alphas, stride):
  n = len(kernel)
  pads = [same_pads(s, k, stride) for s, k in zip(x.shape[1:-1], kernel)]
  xp = jnp.pad(x, [(0, 0), *pads, (0, 0)])
  out = 0.0
  for w, branch, dilation, alpha in zip(kernels, branches, dilations, alphas):
    index = [slice(None)]
    for size, k, b, d in zip(xp.shape[1:-1], kernel, branch, dilation):
      span = (b - 1) * d + 1
      start = (k - span) // 2
      index.append(slice(start, size - (k - span - start)))
    y = jax.lax.conv_general_dilated(
        xp[tuple(index)], w, (stride,) * n, "VALID", rhs_dilation=dilation,
        dimension_numbers=nd_dimension_numbers(n))
    out = out + y * jnp.asarray(alpha)
  return out


def nd_plain_conv(x, w, stride):
  n = w.ndim - 2
  return jax.lax.conv_general_dilated(
      x, w, (stride,) * n, "SAME", dimension_numbers=nd_dimension_numbers(n))


def loop_merge(kernels, kernel, branches, dilations, alphas):
  """W = sum_k alpha_k P_k(V_k), one tap at a time."""
  first = np.asarray(kernels[0])
  merged = np.zeros(tuple(kernel) + first.shape[-2:])
  for w, branch, dilation, alpha in zip(kernels, branches, dilations, alphas):
    w = np.asarray(w)
    for tap in np.ndindex(*branch):
      position = tuple((k - ((b - 1) * d + 1)) // 2 + i * d
                       for k, b, d, i in zip(kernel, branch, dilation, tap))
      merged[position] += np.asarray(alpha) * w[tap]
  return merged


def nd_batches(spatial, seed):
  key = jax.random.key(seed)
  for _ in range(ND_STEPS):
    key, kx, ky = jax.random.split(key, 3)
    yield (jax.random.normal(kx, (3, *spatial, ND_CHANNELS[0]), jnp.float64),
           jax.random.randint(ky, (3,), 0, 3))


def nd_trajectories(branch_set, optimizer):
  """(merged after branched training, merged training with sgs, start)."""
  kernel, branches, dilations, scales, spatial = ND_BRANCH_SETS[branch_set]
  n = len(kernel)
  dilations = dilations or [(1,) * n] * len(branches)
  alphas = scales if scales is not None else [1.0] * len(branches)
  key = jax.random.key(5)
  params_b = {}
  for name, cin, cout in (("conv1", ND_CHANNELS[0], ND_CHANNELS[1]),
                          ("conv2", ND_CHANNELS[1], ND_CHANNELS[2])):
    params_b[name] = []
    for branch in branches:
      key, sub = jax.random.split(key)
      params_b[name].append(0.4 * jax.random.normal(
          sub, (*branch, cin, cout), jnp.float64))
  params_b["head"] = 0.4 * jax.random.normal(key, (ND_CHANNELS[2], 3),
                                             jnp.float64)
  spatial_axes = tuple(range(1, n + 1))

  def branched_logits(p, x):
    h = x
    for name, stride in (("conv1", 1), ("conv2", 2)):
      h = jax.nn.relu(nd_branched_conv(h, p[name], kernel, branches,
                                       dilations, alphas, stride))
    return h.mean(axis=spatial_axes) @ p["head"]

  def plain_logits(p, x):
    h = jax.nn.relu(nd_plain_conv(x, p["conv1"], 1))
    h = jax.nn.relu(nd_plain_conv(h, p["conv2"], 2))
    return h.mean(axis=spatial_axes) @ p["head"]

  def merge(p):
    return {"head": np.asarray(p["head"]), **{
        name: loop_merge(p[name], kernel, branches, dilations, alphas)
        for name in ("conv1", "conv2")}}

  trained_b = fit(branched_logits, params_b, OPTIMIZERS[optimizer](),
                  nd_batches(spatial, 7))
  if scales is None:
    transform = sgs_optax.sgs("unireplknet", kernel_layout="WIO")
  else:
    transform = sgs_optax.sgs(sgs_optax.branch_scaling(
        kernel, branches, scales, dilations), kernel_layout="DHW"[-n:] + "IO")
  start = merge(params_b)
  tx = optax.chain(transform, OPTIMIZERS[optimizer]())
  trained_m = fit(plain_logits, jax.tree.map(jnp.asarray, start), tx,
                  nd_batches(spatial, 7))
  return merge(trained_b), trained_m, start


def nd_max_difference(branch_set, optimizer):
  """The largest kernel difference of the two trajectories, and movement."""
  with jax.enable_x64(True):
    expected, got, start = nd_trajectories(branch_set, optimizer)
    err = max(float(np.abs(np.asarray(got[k]) - expected[k]).max())
              for k in expected)
    moved = min(float(np.abs(expected[k] - start[k]).max())
                for k in ("conv1", "conv2"))
  return err, moved


@pytest.mark.parametrize("optimizer", sorted(OPTIMIZERS))
@pytest.mark.parametrize("branch_set", sorted(ND_BRANCH_SETS))
def test_nd_and_dilated_sgs_matches_branched_training(branch_set, optimizer):
  err, moved = nd_max_difference(branch_set, optimizer)
  assert moved > 1e-3  # the weights really trained.
  assert err < 1e-9, err
