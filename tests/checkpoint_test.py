"""Checkpoint and resume of a learned-SGS training run (examples/resnet).

A run interrupted after step K and resumed from its orbax checkpoint, with a
fresh config object and a freshly initialised state, must end bit-identical to
the same run done in one go. K is chosen so that an SGS refresh happens after
the interruption. The jitted functions are shared (cached per recipe) between
the runs; they are stateless, and everything that evolves is in the state.
"""

import dataclasses

import jax
import numpy as np
import optax
import pytest

from examples.resnet import checkpointing
from examples.resnet import config as config_lib
from examples.resnet import input_pipeline
from examples.resnet import main as resnet_main
from examples.resnet import train
import sgs_optax

# 64 images / 16 = 4 steps per epoch, 12 steps. The learned SGS matrices are
# refreshed every max(1, round(3 / 20)) = 1 epoch: before steps 0, 4 and 8.
CONFIG = config_lib.Config(
    epochs=3, batch_size=16, num_train=64, num_test=32, width=4,
    blocks=(1, 1), checkpoint_every=2)
TOTAL = 12
STOP = 6  # interrupted after step 6: the refresh before step 8 is resumed.


def assert_trees_identical(got, want):
  """Same tree structure (NamedTuples, None leaves), dtypes and bits."""
  assert jax.tree.structure(got) == jax.tree.structure(want)
  for path, a, b in zip(
      [jax.tree_util.keystr(p) for p, _ in
       jax.tree_util.tree_leaves_with_path(want)],
      jax.tree.leaves(got), jax.tree.leaves(want)):
    assert a.dtype == b.dtype and a.shape == b.shape, path
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=path)


def assert_trees_differ(a, b):
  assert any(not np.array_equal(x, y)
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def conv_matrices(state):
  scalings = sgs_optax.get_scalings(state.opt_state)
  return {jax.tree_util.keystr(p): np.asarray(m)
          for p, m in jax.tree_util.tree_leaves_with_path(scalings)}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """An uninterrupted run, and the same run interrupted then resumed."""
  root = tmp_path_factory.mktemp("checkpoints")
  data = input_pipeline.load(CONFIG)
  full = train.train_and_evaluate(CONFIG, data=data)  # no checkpointing.
  run_dir = str(root / "run")
  interrupted = train.train_and_evaluate(
      dataclasses.replace(CONFIG, checkpoint_dir=run_dir, stop_after=STOP),
      data=data)
  # The step-STOP checkpoint itself (the resumed run's saves rotate it out).
  manager = checkpointing.checkpoint_manager(
      dataclasses.replace(CONFIG, checkpoint_dir=run_dir))
  try:
    assert manager.latest_step() == STOP
    fresh = train.make_functions(config_lib.recipe(CONFIG), TOTAL)
    at_stop = checkpointing.restore_checkpoint(
        manager, CONFIG, target=fresh.init(data.x_train[:1]))
  finally:
    manager.close()
  # A fresh config object; the data are reloaded and the state re-initialised
  # before the checkpoint is restored into it.
  resumed = train.train_and_evaluate(config_lib.Config(
      epochs=3, batch_size=16, num_train=64, num_test=32, width=4,
      blocks=(1, 1), checkpoint_every=2, checkpoint_dir=run_dir, resume=True))
  return dict(full=full, interrupted=interrupted, resumed=resumed,
              at_stop=at_stop, run_dir=run_dir, data=data)


def test_resumed_run_is_bit_identical_to_uninterrupted_run(runs):
  full, interrupted, resumed = (
      runs["full"], runs["interrupted"], runs["resumed"])
  assert int(interrupted.step) == STOP
  assert int(interrupted.refresh_count) == 2  # before steps 0 and 4.
  assert int(full.step) == int(resumed.step) == TOTAL
  assert int(full.refresh_count) == int(resumed.refresh_count) == 3
  assert_trees_identical(resumed, full)
  # Not vacuous: training moved everything that the comparison covers, and
  # the refresh after the interruption changed every learned matrix.
  assert_trees_differ(interrupted.params, full.params)
  assert_trees_differ(interrupted.batch_stats, full.batch_stats)
  before, after = conv_matrices(interrupted), conv_matrices(full)
  assert set(before) == set(after) and len(before) == 5  # stem + 4 in blocks.
  for name in before:
    assert before[name].shape == (3, 3)
    assert not np.allclose(before[name], 1.0), name
    assert not np.array_equal(before[name], after[name]), name


def test_checkpoint_restores_the_exact_tree(runs):
  """NamedTuple optimizer states, None leaves, dtypes, keys and counters."""
  config = dataclasses.replace(CONFIG, checkpoint_dir=runs["run_dir"])
  manager = checkpointing.checkpoint_manager(config)
  try:
    assert manager.latest_step() == TOTAL
    assert sorted(manager.all_steps()) == [8, 10, 12]  # max_to_keep=3.
    fns = train.make_functions(config_lib.recipe(config), TOTAL)
    target = fns.init(runs["data"].x_train[:1])
    restored = checkpointing.restore_checkpoint(manager, config, target)
    assert_trees_identical(restored, runs["full"])
    sgs_state, decay_state, sgd_state = restored.opt_state
    assert isinstance(sgs_state, sgs_optax.SpatialScalingState)
    assert isinstance(decay_state, optax.EmptyState)
    assert isinstance(sgd_state[0], optax.TraceState)
    assert isinstance(sgd_state[1], optax.ScaleByScheduleState)
    assert int(sgd_state[1].count) == TOTAL
    assert isinstance(sgs_state.scalings, sgs_optax.ScalingTable)
    assert sgs_state.scalings.learned
    scalings = sgs_optax.get_scalings(restored.opt_state)
    assert scalings["head"]["kernel"] is None
    assert scalings["head"]["bias"] is None
    assert scalings["stage2_block1"]["shortcut_conv"]["kernel"] is None  # 1x1
    assert scalings["stem_bn"]["scale"] is None
    assert restored.rng.dtype == np.uint32
    jax.random.wrap_key_data(restored.rng, impl=config.prng_impl)  # a key.

    # A checkpoint from another recipe (here the learning rate) is refused.
    with pytest.raises(ValueError, match="learning_rate"):
      checkpointing.restore_checkpoint(
          manager, dataclasses.replace(config, learning_rate=0.05), target)
  finally:
    manager.close()


@pytest.mark.parametrize("field", ["rng", "data_key", "refresh_count"])
def test_resume_is_driven_by_the_checkpointed_field(runs, tmp_path, field):
  """Editing one field of the step-6 checkpoint changes the resumed run.

  So the augmentation key, the data order and the refresh schedule really come
  from the checkpoint, and the bit-identity above could fail.
  """
  state = runs["at_stop"]
  assert_trees_identical(state, runs["interrupted"])
  if field == "refresh_count":
    # One refresh more on record: the one before step 8 is skipped.
    edited = state.replace(refresh_count=state.refresh_count + 1)
  else:
    value = getattr(state, field)
    edited = state.replace(**{field: value.at[-1].add(np.uint32(1))})
  edited_config = dataclasses.replace(CONFIG, checkpoint_dir=str(tmp_path))
  manager = checkpointing.checkpoint_manager(edited_config)
  try:
    checkpointing.save_checkpoint(manager, edited_config, edited)
    manager.wait_until_finished()
  finally:
    manager.close()
  resumed = train.train_and_evaluate(
      dataclasses.replace(edited_config, resume=True), data=runs["data"])
  assert int(resumed.step) == TOTAL
  assert_trees_differ(resumed.params, runs["full"].params)
  if field == "refresh_count":
    np.testing.assert_array_equal(
        np.stack(list(conv_matrices(resumed).values())),
        np.stack(list(conv_matrices(runs["interrupted"]).values())))


def test_command_line_interrupt_and_resume(runs, tmp_path):
  argv = ["--epochs", "3", "--batch-size", "16", "--num-train", "64",
          "--num-test", "32", "--width", "4", "--blocks", "1", "1",
          "--checkpoint-every", "2", "--checkpoint-dir", str(tmp_path),
          "--no-baseline"]  # The SGD baseline would only add a compilation.
  first = resnet_main.main(argv + ["--stop-after", str(STOP)])
  assert first["step"] == STOP and first["refresh_count"] == 2
  second = resnet_main.main(argv + ["--resume"])
  assert second["step"] == TOTAL and second["refresh_count"] == 3
  assert_trees_identical(second["state"], runs["full"])
  full_accuracy = train.evaluate(CONFIG, runs["full"], runs["data"])
  assert second["accuracy"] == full_accuracy
  # Resuming a finished run trains no further.
  third = resnet_main.main(argv + ["--resume"])
  assert_trees_identical(third["state"], runs["full"])
