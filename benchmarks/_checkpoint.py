"""Resumable runs: one orbax checkpoint directory per (method, lr, seed) run.

A checkpoint holds the :class:`benchmarks._train.TrainState` after an epoch,
the run's history so far (JSON) and the settings that determine the run
(JSON). Restoring needs a state of the same structure (a freshly initialised
one), so NamedTuple optimizer states come back as they were. Saving keeps
only the latest checkpoint; orbax writes to a temporary directory and renames
it when complete, so a run killed while saving resumes from the previous one.
A checkpoint written with other settings is refused, never silently resumed.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import orbax.checkpoint as ocp


class SettingsMismatchError(ValueError):
  """The checkpoint was written by a run with other settings."""


class RunCheckpoint:
  """Saves and restores one run's state and history.

  Args:
    directory: this run's checkpoint directory (created when needed).
    settings: JSON-ready settings that determine the run; a checkpoint saved
      with other settings raises :class:`SettingsMismatchError` on restore.
    every: save after every ``every``-th epoch (and the last one, see
      :meth:`save`).
  """

  def __init__(self, directory: str, settings: dict[str, Any],
               every: int = 1):
    self.directory = os.path.abspath(directory)
    # A JSON round trip: tuples become lists, as in the saved copy.
    self.settings = json.loads(json.dumps(settings))
    self.every = max(1, every)
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=1, create=True))

  def latest_epoch(self) -> int | None:
    """Epochs done in the latest checkpoint, or None."""
    return self._manager.latest_step()

  def restore(self, template) -> tuple[Any, dict[str, Any]] | None:
    """The latest ``(state, history)``, or None when nothing was saved.

    Args:
      template: a state of the run's structure, shapes and dtypes.

    Returns:
      The restored state and history, or None.

    Raises:
      SettingsMismatchError: the checkpoint has other settings.
    """
    epoch = self._manager.latest_step()
    if epoch is None:
      return None
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, template)
    restored = self._manager.restore(epoch, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract),
        history=ocp.args.JsonRestore(),
        settings=ocp.args.JsonRestore()))
    if restored.settings != self.settings:
      changed = sorted(
          k for k in set(self.settings) | set(restored.settings)
          if self.settings.get(k) != restored.settings.get(k))
      raise SettingsMismatchError(
          f"The checkpoint in {self.directory} was written with other "
          f"settings ({', '.join(changed)} differ). Use another "
          "--checkpoint-dir, or delete it to start over.")
    return restored.state, dict(restored.history)

  def save(self, epoch: int, state, history: dict[str, Any], *,
           last: bool = False) -> None:
    """Saves after ``epoch`` epochs when it is due (or ``last``)."""
    if not last and epoch % self.every:
      return
    self._manager.save(epoch, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        history=ocp.args.JsonSave(history),
        settings=ocp.args.JsonSave(self.settings)), force=True)

  def close(self) -> None:
    """Waits for pending saves and releases the manager."""
    self._manager.wait_until_finished()
    self._manager.close()
