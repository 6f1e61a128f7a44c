"""Saving and restoring the whole train state with orbax-checkpoint.

The recipe (the config without its run-control fields) is saved beside the
state, and a checkpoint written with another recipe is refused.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import orbax.checkpoint as ocp

from examples.resnet.config import Config
from examples.resnet.config import RUN_CONTROL_FIELDS


def _config_record(config: Config) -> dict[str, Any]:
  record = dataclasses.asdict(config)
  for field in RUN_CONTROL_FIELDS:
    record.pop(field)
  return json.loads(json.dumps(record))  # tuples -> lists, as JSON stores.


def checkpoint_manager(config: Config) -> ocp.CheckpointManager:
  """A manager keeping the 3 latest checkpoints in ``config.checkpoint_dir``."""
  return ocp.CheckpointManager(
      os.path.abspath(config.checkpoint_dir),
      options=ocp.CheckpointManagerOptions(max_to_keep=3, create=True),
  )


def save_checkpoint(manager: ocp.CheckpointManager, config: Config,
                    state: Any) -> None:
  """Saves ``state`` (a pytree with a ``step``) and the recipe."""
  manager.save(
      int(state.step),
      args=ocp.args.Composite(
          state=ocp.args.StandardSave(state),
          config=ocp.args.JsonSave(_config_record(config)),
      ),
      force=True,
  )


def restore_checkpoint(manager: ocp.CheckpointManager, config: Config,
                       target: Any, step: int | None = None) -> Any:
  """Restores the state saved at ``step`` (default: the latest).

  ``target`` (a freshly initialised state) gives the tree structure, so the
  optimizer's NamedTuples, the ``None`` leaves of the SGS state and the
  dtypes come back exactly as they were.

  Args:
    manager: the run's checkpoint manager.
    config: the run; its recipe must be the checkpoint's.
    target: a state of the same structure, shapes and dtypes.
    step: the step to restore (default: the latest).

  Returns:
    The restored state.

  Raises:
    ValueError: if the checkpoint was written by a run with another recipe.
  """
  step = manager.latest_step() if step is None else step
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
  restored = manager.restore(
      step,
      args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract),
          config=ocp.args.JsonRestore(),
      ),
  )
  saved, wanted = restored.config, _config_record(config)
  different = sorted(k for k in set(saved) | set(wanted)
                     if saved.get(k) != wanted.get(k))
  if different:
    raise ValueError(
        f"checkpoint at step {step} in {config.checkpoint_dir} was written "
        f"with a different recipe: {[(k, saved.get(k)) for k in different]}.")
  return restored.state
