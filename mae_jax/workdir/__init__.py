"""The workdir of a run: its layout, its lock, its checkpoints and every file in it.

`paths` (the path layer, local or `gs://`, and the run's JSON files) is at the bottom; `lock`
(the single writer's lock) uses it; `checkpoints` (the only module that opens Orbax: `Writer`,
`Reader`) uses both; `weights` (a checkpoint read as a model's weights, weights workdirs) sits
on top. Callers use this package's names: `from mae_jax import workdir as wdir; wdir.Reader`.

Layout of WORKDIR:
  checkpoints/<step>/state       Orbax pytree of arrays: params, opt_state, step, ...
  checkpoints/<step>/meta        JSON: model config, task, data position, schedule, ...
  config.json                    the resolved config of the newest start (the numbers used)
  config_history.json            earlier resolved configs, when a rerun changed them
  metrics.jsonl, events.*        metrics (`mae_jax.metrics`)
  eval_results.json              final evaluation of a classification run (`write_results`)
  lock                           the writer's lock: host, pid, start time
  damaged_checkpoints/<step>     checkpoints a writer found unreadable, moved aside (never deleted)
"""

from mae_jax.workdir.checkpoints import (  # noqa: F401 - re-exported
    DiskFullError,
    Reader,
    Restored,
    Writer,
    abstract_checkpoint,
    from_checkpoint,
    is_disk_full,
    place,
    to_checkpoint,
)
from mae_jax.workdir.lock import Lock  # noqa: F401 - re-exported
from mae_jax.workdir.paths import (  # noqa: F401 - re-exported
    CHECKPOINTS,
    CONFIG,
    CONFIG_HISTORY,
    DAMAGED,
    LOCK,
    RESULTS,
    WorkdirError,
    append_text,
    check_writable_dir,
    exists,
    is_remote,
    isdir,
    join,
    listdir,
    makedirs,
    normalize,
    read_json,
    read_results,
    read_text,
    write_json,
    write_results,
    write_text,
)
from mae_jax.workdir.weights import (  # noqa: F401 - re-exported
    Classifier,
    check_new_weights_dir,
    checkpoint_meta,
    is_classifier,
    read_classifier,
    read_head,
    read_mae,
    write_weights,
)
