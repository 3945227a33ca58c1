"""Async Orbax checkpoints of the train state and the data-iterator state.

A step is one directory `<directory>/<step>/` with two items: `state` (the pytree of arrays) and
`data` (the iterator's JSON state), so resuming restores both or neither.

Why a checkpoint cut short by `kill -9` is never resumed from (orbax 0.12.8, local filesystem):

- Orbax writes a step into `<step>.orbax-checkpoint-tmp/`, and when every item is written it adds
  `commit_success.txt` and renames the directory to `<step>/`. A rename within one filesystem is
  atomic, so a killed save leaves only the tmp directory, which orbax's step listing never reports.
- Orbax counts any directory named like a step as complete (it checks the name, not the contents), so
  a step directory that no orbax commit produced, such as a half-finished `cp -r` or `rsync` of a run,
  would be resumed from. We also require `commit_success.txt`, the last file every orbax commit writes
  (in either of its atomicity modes), and check it with orbax's own test,
  `is_path_finalized(..., temporary_path_cls=CommitFileTemporaryPath)`.
- The same check leaves out a step whose async save is still running in this process, which the
  manager already lists.

Orbax fsyncs neither the commit file nor the rename: this covers a killed process, not a machine that
loses power.
"""

import pathlib
from typing import Any

import orbax.checkpoint as ocp
from etils import epath
from orbax.checkpoint import checkpoint_managers

_COMMITTED = ocp.path.atomicity.CommitFileTemporaryPath
COMMIT_FILE = 'commit_success.txt'  # the last file every orbax commit writes


class Checkpointer:
  """Saves every `every_steps` steps, keeps the newest `keep`, restores the newest complete step."""

  def __init__(
      self,
      directory: epath.PathLike,
      *,
      every_steps: int,
      keep: int,
      async_save: bool = True,
      primary_host: int | None = 0,
  ):
    """`primary_host`: the process that writes shared files (orbax's meaning; None: every process)."""
    options = ocp.CheckpointManagerOptions(
        # Orbax's default policy also saves whatever step comes first in an empty directory; we save
        # on the interval only, plus at a preemption sync point announced to all hosts.
        save_decision_policy=checkpoint_managers.AnySavePolicy([
            checkpoint_managers.FixedIntervalPolicy(every_steps),
            checkpoint_managers.PreemptionCheckpointingPolicy(),
        ]),
        preservation_policy=checkpoint_managers.LatestN(keep),
        enable_async_checkpointing=async_save,
        multiprocessing_options=ocp.options.MultiprocessingOptions(primary_host=primary_host),
    )
    # Orbax's array writer rejects relative paths, and `--workdir` is often one.
    self._manager = ocp.CheckpointManager(epath.Path(directory).resolve(), options=options)

  @property
  def directory(self) -> pathlib.Path:
    return pathlib.Path(str(self._manager.directory))

  def latest_step(self) -> int | None:
    return max(self.steps(), default=None)

  def steps(self) -> list[int]:
    """The complete checkpoints' steps."""
    return list(filter(self._is_complete, self._manager.all_steps()))

  def should_save(self, step: int) -> bool:
    return self._manager.should_save(step)

  def save(self, step: int, state: Any, data_state: dict, *, force: bool = False) -> bool:
    """Starts saving `step`; returns whether it did. The caller may donate `state` right after.

    An async save returns once the arrays are copied to host memory; the write to disk continues in
    the background. `force` saves off the interval (preemption, end of training); a step that is
    already saved is skipped rather than raising, so a forced save may follow a periodic one.
    """
    if step in self._manager.all_steps():
      return False
    args = ocp.args.Composite(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state))
    return self._manager.save(step, args=args, force=force)

  def restore(self, abstract_state: Any, step: int | None = None) -> tuple[int, Any, dict] | None:
    """Restores `step` (default: the newest complete one) as `(step, state, data_state)`.

    Leaves of `abstract_state` are `jax.ShapeDtypeStruct`s whose `sharding` says where each restored
    array goes, on any mesh. None when there is no complete checkpoint.
    """
    # A pending save may be about to delete the step we read (keep-last-N).
    self.wait()
    step = self.latest_step() if step is None else step
    if step is None:
      return None
    if not self._is_complete(step):
      raise FileNotFoundError(f'no complete checkpoint for step {step} in {self._manager.directory}')
    args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore())
    restored = self._manager.restore(step, args=args)
    return step, restored.state, restored.data

  def wait(self):
    self._manager.wait_until_finished()

  def close(self):
    self._manager.close()

  def _is_complete(self, step: int) -> bool:
    path = self._manager.directory / str(step)
    return ocp.path.step.is_path_finalized(path, temporary_path_cls=_COMMITTED)


def newest_on_disk(directory: pathlib.Path) -> int | None:
  """The newest step directory holding orbax's commit file, found with plain file-system calls and no
  lock, so a signal handler may call it while the main thread is inside orbax (the same test as
  `is_path_finalized` for a step directory, the module docstring says why)."""
  if not directory.is_dir():
    return None
  return max((int(p.name) for p in directory.iterdir()
              if p.name.isdigit() and (p / COMMIT_FILE).exists()), default=None)
