"""Every public transform under every optax wrapper, against hand composition.

Each case runs one transform (SGS with a preset, an array or learned; CDG with
each metric; their chain) inside one optax wrapper, every transform with every
wrapper once, in float32 or bfloat16, with or without `jit` (each transform
and each wrapper meets all four combinations across the pairs), on a tiny tree
mixing an HWIO conv, an OIHW conv (selected by a per-leaf layout tree), a bias
and a dense kernel. The expected
updates come from an independent numpy reference of the transform (the
matrix written out by hand; a dense solve of the CDG metric) composed with
the wrapper's documented semantics. Under each wrapper, `get_scalings` finds
the SGS state and `refresh_scalings` refreshes a learned one.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sgs_optax

ACB3 = np.array([[1.0, 2, 1], [2, 3, 2], [1, 2, 1]])
GIVEN = np.array([[0.5, 1, 0.5], [1, 4, 1], [0.5, 1, 0.5]])
LAYOUTS = {"conv": {"kernel": "HWIO", "bias": None},
           "torch": {"weight": "OIHW"},
           "dense": {"kernel": None}}
SHAPES = {"conv": {"kernel": (3, 3, 2, 4), "bias": (4,)},
          "torch": {"weight": (6, 2, 3, 3)},
          "dense": {"kernel": (4, 3)}}
OUTPUT_AXIS = {"conv/kernel": 3, "torch/weight": 0}
SPATIAL = {"conv/kernel": lambda s: s[:, :, None, None],
           "torch/weight": lambda s: s[None, None]}


def make_tree(seed, dtype):
  leaves, treedef = jax.tree.flatten(
      SHAPES, is_leaf=lambda x: isinstance(x, tuple))
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return jax.tree.unflatten(treedef, [
      jax.random.normal(k, s, jnp.float32).astype(dtype)
      for k, s in zip(keys, leaves)])


def name_of(path):
  return jax.tree_util.keystr(path, simple=True, separator="/")


# --- independent references -------------------------------------------------


def dense_inverse_metric(n, metric, lam):
  """G^{-1} of the periodic channel metric, as a dense n x n matrix."""
  shift = np.roll(np.eye(n), 1, axis=1)
  minus_laplacian = 2 * np.eye(n) - shift - shift.T
  mean = np.full((n, n), 1.0 / n)
  if metric == "sobolev":
    return np.linalg.inv(np.eye(n) + lam * minus_laplacian)
  if metric == "reweighted_l2":
    return mean + (np.eye(n) - mean) / lam
  mu1 = 4 * np.sin(np.pi / n) ** 2
  return mean + mu1 / lam * np.linalg.pinv(minus_laplacian)


def reference(kind):
  """A numpy function grads -> transformed grads for a transform kind."""

  def sgs_leaf(matrix):
    return lambda name, g: g * SPATIAL[name](matrix)

  def cdg_leaf(metric, lam):
    def apply(name, g):
      axis = OUTPUT_AXIS[name]
      inverse = dense_inverse_metric(g.shape[axis], metric, lam)
      moved = np.moveaxis(g, axis, -1) @ inverse.T
      return np.moveaxis(moved, -1, axis)
    return apply

  leaf = {
      "sgs-acb": sgs_leaf(ACB3),
      "sgs-array": sgs_leaf(GIVEN),
      "sgs-learned": sgs_leaf(np.ones((3, 3))),
      "cdg-sobolev": cdg_leaf("sobolev", 1.0),
      "cdg-reweighted_l2": cdg_leaf("reweighted_l2", 2.0),
      "cdg-reweighted_sobolev": cdg_leaf("reweighted_sobolev", 2.0),
  }
  if kind == "cdg+sgs":
    first, second = leaf["cdg-sobolev"], leaf["sgs-acb"]
    fn = lambda name, g: second(name, first(name, g))
  else:
    fn = leaf[kind]

  def transform(grads):
    return jax.tree_util.tree_map_with_path(
        lambda p, g: fn(name_of(p), g) if name_of(p) in OUTPUT_AXIS else g,
        grads)

  return transform


def make_transform(kind, **layout):
  layout = layout or {"kernel_layout": LAYOUTS}
  if kind.startswith("cdg-"):
    return sgs_optax.cdg(metric=kind[4:], **layout)
  return {
      "sgs-acb": lambda: sgs_optax.sgs("acb", **layout),
      "sgs-array": lambda: sgs_optax.sgs(GIVEN, **layout),
      "sgs-learned": lambda: sgs_optax.sgs(**layout),
      "cdg+sgs": lambda: optax.chain(sgs_optax.cdg(**layout),
                                     sgs_optax.sgs("acb", **layout)),
  }[kind]()


KINDS = ["sgs-acb", "sgs-array", "sgs-learned", "cdg-sobolev",
         "cdg-reweighted_l2", "cdg-reweighted_sobolev", "cdg+sgs"]

# --- wrappers: (build(kind) -> tx, expected(ref, grads_list) -> updates) ----
# Masks and labels select the two conv kernels and leave the rest out.
CONV_ONLY = {"conv": {"kernel": True, "bias": False},
             "torch": {"weight": True}, "dense": {"kernel": False}}
PREFIX = {"conv": True, "torch": True, "dense": False}


def selected(mask_tree, grads, transformed):
  """Transformed where the (possibly prefix) mask is True, else as is."""
  return jax.tree.map(
      lambda m, t, g: jax.tree.map(lambda a, b: a if m else b, t, g),
      mask_tree, transformed, grads)


def labels_of(mask_tree):
  return jax.tree.map(lambda m: "t" if m else "rest", mask_tree)


def clip_factor(grads, max_norm):
  norm = np.sqrt(sum(np.sum(np.square(g)) for g in jax.tree.leaves(grads)))
  return min(1.0, max_norm / norm)


WRAPPERS = {
    "plain": (make_transform, lambda ref, gs: ref(gs[0])),
    "chain-sgd-momentum": (
        lambda k: optax.chain(make_transform(k), optax.sgd(0.1, momentum=0.9)),
        lambda ref, gs: jax.tree.map(lambda u: -0.1 * u, ref(gs[0]))),
    "masked-callable": (
        lambda k: optax.masked(make_transform(k), lambda p: jax.tree.map(
            lambda x: x.ndim == 4, p)),
        lambda ref, gs: selected(CONV_ONLY, gs[0], ref(gs[0]))),
    "masked-tree": (
        lambda k: optax.masked(make_transform(k), CONV_ONLY),
        lambda ref, gs: selected(CONV_ONLY, gs[0], ref(gs[0]))),
    "masked-prefix": (
        lambda k: optax.masked(make_transform(k), PREFIX),
        lambda ref, gs: selected(PREFIX, gs[0], ref(gs[0]))),
    "partition-full": (
        lambda k: optax.partition(
            {"t": make_transform(k), "rest": optax.identity()},
            labels_of(CONV_ONLY)),
        lambda ref, gs: selected(CONV_ONLY, gs[0], ref(gs[0]))),
    "multi_transform-prefix": (
        lambda k: optax.multi_transform(
            {"t": make_transform(k), "rest": optax.identity()},
            labels_of(PREFIX)),
        lambda ref, gs: selected(PREFIX, gs[0], ref(gs[0]))),
    "inject_hyperparams": (
        lambda k: optax.inject_hyperparams(
            lambda: make_transform(k))(),
        lambda ref, gs: ref(gs[0])),
    "multi_steps": (
        lambda k: optax.MultiSteps(make_transform(k),
                                   2).gradient_transformation(),
        lambda ref, gs: ref(jax.tree.map(lambda a, b: (a + b) / 2, *gs))),
    "apply_if_finite": (
        lambda k: optax.apply_if_finite(make_transform(k), 3),
        lambda ref, gs: ref(gs[0])),
    "clip_by_global_norm": (
        lambda k: optax.chain(optax.clip_by_global_norm(1.0),
                              make_transform(k)),
        lambda ref, gs: ref(jax.tree.map(
            lambda g: g * clip_factor(gs[0], 1.0), gs[0]))),
}


def run(tx, grads_list, params, use_jit):
  update = jax.jit(tx.update) if use_jit else tx.update
  state = tx.init(params)
  updates = None
  for grads in grads_list:
    updates, state = update(grads, state, params)
  return updates, state


# Every kind meets every wrapper once; the dtype and jit mode rotate over the
# pairs (a Latin square on the kind and wrapper indices), so that each kind
# and each wrapper runs in all four (dtype, jit) combinations without
# multiplying the matrix by them.
MODES = {"f32-eager": (jnp.float32, False), "bf16-jit": (jnp.bfloat16, True),
         "f32-jit": (jnp.float32, True), "bf16-eager": (jnp.bfloat16, False)}


def _pair(i, kind, j, wrapper):
  mode = list(MODES)[(i + j) % len(MODES)]
  return pytest.param(kind, wrapper, *MODES[mode],
                      id=f"{kind}-{wrapper}-{mode}")


PAIRS = [_pair(i, kind, j, wrapper) for i, kind in enumerate(KINDS)
         for j, wrapper in enumerate(WRAPPERS)]


def test_pairs_cover_every_mode_per_kind_and_wrapper():
  modes = lambda key, k: {tuple(p.values[2:]) for p in PAIRS
                          if p.values[key] == k}
  for kind in KINDS:
    assert len(modes(0, kind)) == len(MODES), kind
  for wrapper in WRAPPERS:
    assert len(modes(1, wrapper)) == len(MODES), wrapper


@pytest.mark.parametrize("kind,wrapper,dtype,use_jit", PAIRS)
def test_updates_equal_hand_composition(kind, wrapper, dtype, use_jit):
  build, expected_fn = WRAPPERS[wrapper]
  params = make_tree(0, dtype)
  steps = 2 if wrapper == "multi_steps" else 1
  grads_list = [make_tree(1 + i, dtype) for i in range(steps)]
  updates, state = run(build(kind), grads_list, params, use_jit)
  as64 = lambda t: jax.tree.map(lambda x: np.asarray(x, np.float64), t)
  want = expected_fn(reference(kind), [as64(g) for g in grads_list])
  # bfloat16 keeps 8 significant bits: compare at that resolution, relative
  # to each leaf's scale (SGS alone moves entries by up to 3x).
  rtol = 1e-5 if dtype == jnp.float32 else 2e-2
  for path, got in jax.tree_util.tree_leaves_with_path(updates):
    assert got.dtype == dtype, name_of(path)
    scale = np.max(np.abs(want_leaf := _at(want, path))) + 1e-12
    np.testing.assert_allclose(np.asarray(got, np.float64) / scale,
                               want_leaf / scale, atol=rtol, rtol=0,
                               err_msg=f"{name_of(path)}")
  if kind.startswith("sgs") or kind == "cdg+sgs":
    scalings = sgs_optax.get_scalings(state)
    assert scalings["torch"]["weight"] is not None


def _at(tree, path):
  for entry in path:
    tree = tree[getattr(entry, "key", getattr(entry, "idx", None))]
  return tree


def hand_captured(params):
  """ConvInputs for the two conv kernels, built without capture."""
  x = jax.nn.relu(jax.random.normal(jax.random.key(5), (2, 6, 6, 2)))
  record = sgs_optax.ConvInput(x, ((1, 1), (1, 1)), kernel_size=(3, 3))
  return {"conv": {"kernel": record}, "torch": {"weight": record}}, record


@pytest.mark.parametrize("wrapper", list(WRAPPERS))
def test_learned_state_refreshes_under_every_wrapper(wrapper):
  build, _ = WRAPPERS[wrapper]
  params = make_tree(0, jnp.float32)
  tx = build("sgs-learned")
  state = tx.init(params)
  captured, record = hand_captured(params)
  new = jax.jit(sgs_optax.refresh_scalings)(state, captured)
  d = sgs_optax.spatial_dependence(record.inputs, (3, 3), padding="SAME")
  want = np.asarray(d) / np.mean(np.asarray(d))
  scalings = sgs_optax.get_scalings(new)
  for got in (scalings["conv"]["kernel"], scalings["torch"]["weight"]):
    np.testing.assert_allclose(got, want, rtol=1e-6)
  assert not np.allclose(want, 1.0)
  # The refreshed state still drives the same transform.
  updates, _ = tx.update(make_tree(1, jnp.float32), new, params)
  assert jax.tree.structure(updates) == jax.tree.structure(params)


def test_tree_map_params_gives_shardings_that_jit_accepts():
  mesh = jax.make_mesh((1,), ("model",))
  spec_of = lambda x: (jax.sharding.PartitionSpec(None, None, None, "model")
                       if x.ndim == 4 else jax.sharding.PartitionSpec())
  params = make_tree(0, jnp.float32)
  param_specs = jax.tree.map(spec_of, params)
  chains = [
      optax.chain(sgs_optax.sgs("acb", kernel_layout=LAYOUTS),
                  optax.sgd(0.1, momentum=0.9)),
      optax.chain(sgs_optax.cdg(kernel_layout=LAYOUTS),
                  sgs_optax.sgs(kernel_layout=LAYOUTS),
                  optax.add_decayed_weights(5e-4),
                  optax.sgd(0.1, momentum=0.9)),
      optax.chain(sgs_optax.sgs(GIVEN, kernel_layout=LAYOUTS,
                                mask=CONV_ONLY), optax.adamw(1e-3)),
  ]
  for tx in chains:
    shardings = optax.tree_utils.tree_map_params(
        tx.init,
        lambda p, spec: jax.sharding.NamedSharding(mesh, spec),
        jax.eval_shape(tx.init, params),
        param_specs,
        transform_non_params=lambda _: jax.sharding.NamedSharding(
            mesh, jax.sharding.PartitionSpec()),
        is_leaf=lambda v: isinstance(v, optax.MaskedNode),
    )
    state = jax.jit(tx.init, out_shardings=shardings)(params)
    step = jax.jit(functools.partial(tx.update, params=params),
                   out_shardings=(None, shardings))
    _, state = step(make_tree(1, jnp.float32), state)
    momentum = optax.tree_utils.tree_get_all_with_path(state, "trace")
    for _, trace in momentum:
      assert trace["conv"]["kernel"].sharding.spec == param_specs["conv"][
          "kernel"]


def test_layout_tree_with_masked_nodes_and_prefix_refresh():
  # A prefix mask leaves whole layers out; capturing them is not an error.
  params = make_tree(0, jnp.float32)
  tx = optax.masked(sgs_optax.sgs(kernel_layout=LAYOUTS),
                    {"conv": False, "torch": True, "dense": False})
  state = tx.init(params)
  captured, _ = hand_captured(params)
  new = sgs_optax.refresh_scalings(state, captured)
  scalings = sgs_optax.get_scalings(new)
  assert scalings["conv"] is None
  assert not np.allclose(scalings["torch"]["weight"], 1.0)
  with pytest.raises(ValueError, match="not a parameter"):
    sgs_optax.refresh_scalings(state, {**captured, "other": captured["conv"]})


def test_array_scaling_must_be_static_under_inject_hyperparams():
  params = make_tree(0, jnp.float32)
  tx = optax.inject_hyperparams(sgs_optax.sgs)(scaling=GIVEN,
                                               kernel_layout=LAYOUTS)
  state = tx.init(params)
  with pytest.raises(ValueError, match="static_args"):
    jax.jit(tx.update)(params, state, params)
  tx = optax.inject_hyperparams(sgs_optax.sgs, static_args=("scaling",))(
      scaling=GIVEN, kernel_layout=LAYOUTS)
  updates, _ = tx.update(params, tx.init(params), params)
  np.testing.assert_allclose(updates["conv"]["kernel"],
                             params["conv"]["kernel"] * GIVEN[..., None, None],
                             rtol=1e-6)


def test_case8_an_eager_change_of_an_injected_array_scaling_applies():
  params = make_tree(0, jnp.float32)
  grads = make_tree(1, jnp.float32)
  tx = optax.inject_hyperparams(sgs_optax.sgs)(scaling=jnp.ones((3, 3)),
                                               kernel_layout=LAYOUTS)
  state = tx.init(params)
  state.hyperparams["scaling"] = jnp.asarray(GIVEN, jnp.float32)
  updates, state = tx.update(grads, state, params)
  for name, spatial in SPATIAL.items():
    layer, leaf = name.split("/")
    np.testing.assert_allclose(updates[layer][leaf],
                               np.asarray(grads[layer][leaf]) * spatial(GIVEN),
                               rtol=1e-6)
  np.testing.assert_array_equal(
      sgs_optax.get_scalings(state)["conv"]["kernel"], GIVEN)
  # A scaling that no longer fits the kernels raises instead of applying
  # to some of them.
  state.hyperparams["scaling"] = jnp.ones((5, 5))
  with pytest.raises(ValueError, match="does not fit any selected"):
    tx.update(grads, state, params)


def restore_abstractly(tx, params, non_params):
  """The orbax abstract-restore idiom: abstract state -> shardings ->
  ShapeDtypeStruct tree -> restore; returns the restored and saved states."""
  import tempfile

  import orbax.checkpoint as ocp

  mesh = jax.make_mesh((1,), ("data",))
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  abstract = jax.eval_shape(tx.init, params)
  shardings = optax.tree_utils.tree_map_params(
      tx.init, lambda _: replicated, abstract,
      transform_non_params=lambda t: non_params(t, replicated),
      is_leaf=lambda v: isinstance(v, optax.MaskedNode))
  target = jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
      abstract, shardings)
  state = tx.init(params)
  with tempfile.TemporaryDirectory() as directory:
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(directory + "/state", state)
    checkpointer.wait_until_finished()
    return checkpointer.restore(directory + "/state", target), state


def test_case6_abstract_restore_of_every_chain_with_the_mapping_form():
  params = make_tree(0, jnp.float32)
  mapping = lambda t, s: jax.tree.map(lambda _: s, t)
  chains = {
      "sgs": optax.chain(sgs_optax.sgs("acb", kernel_layout=LAYOUTS),
                         optax.sgd(0.1, momentum=0.9)),
      "cdg+learned": optax.chain(sgs_optax.cdg(kernel_layout=LAYOUTS),
                                 sgs_optax.sgs(kernel_layout=LAYOUTS),
                                 optax.adamw(1e-3)),
      "masked": sgs_optax.sgs(GIVEN, kernel_layout=LAYOUTS,
                              mask={"conv": True, "torch": False,
                                    "dense": False}),
      "inject": optax.inject_hyperparams(
          sgs_optax.sgs, static_args=("scaling",))(
              scaling="acb", kernel_layout=LAYOUTS),
      "multisteps": optax.MultiSteps(optax.chain(
          sgs_optax.cdg(kernel_layout=LAYOUTS), optax.sgd(0.1)), 2),
  }
  for name, tx in chains.items():
    restored, saved = restore_abstractly(tx, params, mapping)
    assert jax.tree.structure(restored) == jax.tree.structure(saved), name
    jax.tree.map(np.testing.assert_array_equal, restored, saved)
  # The one-sharding form cannot give the table's leaves their shardings
  # (optax's placeholder init cannot know the table's keys): the idiom
  # fails with the error the sharding how-to names.
  with pytest.raises(ValueError, match=r"(?s)(pytree structure error.*"
                     r"\.scalings|Custom node type mismatch.*ScalingTable)"):
    restore_abstractly(chains["sgs"], params, lambda t, s: s)


def test_case6_the_sharding_howtos_restore_block_runs_and_restores():
  """The how-to's code, as written, then the orbax restore it prepares."""
  import pathlib
  import re
  import tempfile

  import orbax.checkpoint as ocp

  howto = (pathlib.Path(__file__).resolve().parents[1] / "docs" / "howto" /
           "sharded.md").read_text()
  section = howto.split("## Restoring a checkpoint", 1)[1]
  code = re.search(r"```python\n(.*?)```", section, re.DOTALL).group(1)
  namespace = {}
  exec(compile(code, "sharded.md", "exec"),  # pylint: disable=exec-used
       namespace)
  tx, params, target = (namespace[k] for k in ("tx", "params", "target"))
  state = tx.init(params)
  with tempfile.TemporaryDirectory() as directory:
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(directory + "/state", state)
    checkpointer.wait_until_finished()
    restored = checkpointer.restore(directory + "/state", target)
  assert jax.tree.structure(restored) == jax.tree.structure(state)
  assert isinstance(restored[1].scalings, sgs_optax.ScalingTable)
  # The error the how-to quotes is the one-sharding form's.
  replicated = namespace["replicated"]
  one = optax.tree_utils.tree_map_params(
      tx.init, lambda _: replicated, namespace["abstract_state"],
      transform_non_params=lambda _: replicated)
  # The how-to quotes the message of each jax release it supports (the
  # wording changed in 0.10.2); the one raised here must be one of them.
  quoted = [re.sub(r"\n    ", "\n", q) for q in
            re.findall(r"    (ValueError: .*?)\n\n", section, re.DOTALL)]
  assert len(quoted) == 2, quoted
  with pytest.raises(ValueError) as raised:
    jax.tree.map(lambda a, s: a, namespace["abstract_state"], one)
  assert "ValueError: " + str(raised.value) in quoted
