"""A workdir's checkpoint read as a model's weights (read-only, safe while its run trains), and
weights workdirs: what `python -m mae_jax.convert import` writes (checkpoint 0, meta `kind:
weights`) for runs to start from and for evaluation."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
from flax import nnx

from mae_jax import models
from mae_jax.models.classifier import LINEAR_PROBE_TRAINABLE, Head, from_head, merge_trees
from mae_jax.workdir.checkpoints import Reader, Writer
from mae_jax.workdir.paths import CONFIG, WorkdirError, exists, isdir, join, normalize, read_json


def checkpoint_meta(reader: Reader, step: int | None, what: str) -> tuple[int, dict]:
    """`(step, meta)` of checkpoint `step` (default: the newest with a readable meta), whose
    meta must say which model it holds (`what`: the kind of checkpoint, for the message)."""
    if step is None:
        found = reader.latest_meta()
        if found is None:
            raise WorkdirError(f"there is no finalized checkpoint in {reader.directory}")
    elif step in reader.steps():
        found = (step, reader.meta(step))
    else:
        raise WorkdirError(
            f"there is no checkpoint {step} in {reader.directory}; available: {reader.steps()}"
        )
    if "model" not in found[1]:
        raise WorkdirError(
            f"checkpoint {found[0]} in {reader.directory} says nothing of its model (meta keys "
            f"{sorted(found[1])}); is it an mae-jax {what} checkpoint?"
        )
    return found


def _same_model(reader: Reader, step: int, meta: dict):
    def check(other: dict, s: int):
        if other.get("model") != meta["model"]:
            raise WorkdirError(
                f"checkpoint {s} in {reader.directory} holds another model than checkpoint {step}"
            )

    return check


def read_mae(path, step: int | None = None, **overrides):
    """`(step, config, params)` of an MAE workdir's checkpoint `step` (default: the newest
    intact one), read-only (safe while that run trains): the model config from its meta
    (`overrides` replace fields, e.g. `img_size`) and only its `params`, as numpy arrays."""
    reader = Reader(path)
    found = checkpoint_meta(reader, step, "pretraining")
    config = models.resolve(found[1]["model"], **overrides)
    check = _same_model(reader, *found)
    restored = reader.restore_params(models.abstract_params(config), step=step, check_meta=check)
    return restored.step, config, restored.state


@dataclasses.dataclass(frozen=True)
class Classifier:
    """A classifier checkpoint read to the host (`read_classifier`)."""

    step: int
    config: models.MAEConfig
    head: Head
    tree: dict  # Params and BatchNorm statistics, numpy, the checkpoint's block layout
    pos_embed: np.ndarray | None  # [1, 1+L, D] when the checkpoint holds its own (imported)
    meta: dict


def is_classifier(meta: dict) -> bool:
    """Whether a checkpoint meta is a classifier's (fine-tuning, linear probing, or imported)."""
    return "num_classes" in meta


def read_head(meta: dict, reader: Reader, root: str, step: int) -> Head:
    """The head of a classifier checkpoint; workdirs written before the meta held
    `global_pool` take it from the run's `config.json`."""
    where = f"checkpoint {step} in {reader.directory}"
    if "global_pool" not in meta:
        config_file = join(root, CONFIG)
        if exists(config_file):
            meta = {**meta, "global_pool": read_json(config_file).get("global_pool")}
    return Head.from_meta(meta, where)


def read_classifier(path, step: int | None = None) -> Classifier:
    """A classifier workdir's checkpoint `step` (default: the newest intact one), read-only:
    its model config and head from the meta, and its Params and BatchNorm statistics (the
    training layout's 'params', 'frozen' and 'batch_stats' entries merged), as numpy arrays."""
    reader = Reader(path)
    found, meta = checkpoint_meta(reader, step, "fine-tuning or linear-probing")
    if not is_classifier(meta):
        raise WorkdirError(
            f"checkpoint {found} in {reader.directory} is not a classifier's (its meta has no "
            f"num_classes): expected a fine-tuning or linear-probing workdir"
        )
    config = models.resolve(meta["model"])
    head = read_head(meta, reader, normalize(path), found)
    model = nnx.eval_shape(lambda: from_head(config, head))
    # The entries as the writer split them: a linear-probing run trains the head only.
    trained = head.linear_probe and meta.get("kind") != "weights"
    split = nnx.split(
        model, LINEAR_PROBE_TRAINABLE if trained else nnx.Param, nnx.Param, nnx.BatchStat, ...
    )[1:4]
    target = {
        name: nnx.to_pure_dict(part)
        for name, part in zip(("params", "frozen", "batch_stats"), split)
        if jax.tree.leaves(part)
    }
    if meta.get("pos_embed") == "learned":
        table = model.pos_embed.get_value()
        target["pos_embed"] = jax.ShapeDtypeStruct(table.shape, table.dtype)
    restored = reader.restore(
        target, step=step, partial=True, check_meta=_same_model(reader, found, meta)
    )
    parts = restored.state
    tree = merge_trees(*(parts[k] for k in ("params", "frozen", "batch_stats") if k in parts))
    pos = None if "pos_embed" not in parts else np.asarray(parts["pos_embed"])
    return Classifier(
        restored.step, config, head, jax.tree.map(np.asarray, tree), pos, restored.meta
    )


def check_new_weights_dir(root) -> None:
    """Refuses a workdir that already holds checkpoints (read-only check)."""
    root = normalize(root)
    if exists(root) and not isdir(root):
        raise WorkdirError(f"the workdir {root} exists and is a file, not a directory")
    steps = Reader(root).steps() if exists(root) else []
    if steps:
        raise WorkdirError(
            f"{root} already holds checkpoints (steps {steps}); import into a new --workdir"
        )


def write_weights(root, state: dict, meta: dict) -> str:
    """A weights workdir (what `convert import` writes): `state` and `meta` as checkpoint 0 of
    a new workdir, finalized before returning. A workdir with checkpoints is refused."""
    with Writer(root, keep=None, async_save=False, handle_sigterm=False) as writer:
        check_new_weights_dir(writer.root)
        writer.save(0, state, meta)
        writer.wait()
        return writer.root
