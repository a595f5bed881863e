"""The config schema (`mae_jax.schema`): every accepted key of every task reaches the resolved
config or is refused with a sentence; plan-owned keys are refused; periods in steps or epochs;
docs/config.md is the schema's key reference.

Regenerate docs/config.md with `python tests/test_schema.py`."""

import json
import os
import re
import sys

import pytest
from config_files import ROOT, load_config

from mae_jax import cli, schema, train
from mae_jax import spec as spec_
from mae_jax.tasks import classify as cs
from mae_jax.tasks import pretrain

RECIPES = {
    "pretrain": "configs/smoke.py",
    "finetune": "configs/finetune_smoke.py",
    "linear_probe": "configs/linprobe_smoke.py",
    "evaluate": "configs/evaluate.py:smoke",
}
# Values the generic rule (`_other`) cannot pick: names that must exist, cross-key constraints.
VALUES = {
    "model.name": "mae_vit_test",
    "model.dtype": "bfloat16",
    "model.param_dtype": "bfloat16",
    "model.attention_impl": "xla",
    "model.remat": "full",
    "model.mask_ratio": 0.5,
    "model.img_size": 32,
    "model.patch_size": 8,
    "model.embed_dim": 64,
    "model.num_heads": 8,
    "model.decoder_embed_dim": 64,
    "model.decoder_num_heads": 8,
    "data.image_size": 64,
    "data.train_split": "validation",
    "data.eval_split": "train",
    "data.crop_ratio": (0.5, 2.0),
    "optim.no_decay_names": ("cls_token",),
    "optim.num_layers": 4,
    "sharding_rules": (("batch", ("data", "fsdp")),),
    "profile_steps": (1, 2),
    "grad_accum_steps": 2,
    "knn_k": 5,
    "batch_size": 32,
    "rand_augment": "rand-m9-inc1",
}


def _keys(tab, prefix=""):
    """`(dotted key, (default, spec, meaning))` of every key of the table `tab`."""
    for k, v in tab.items():
        if isinstance(v, dict):
            yield from _keys(v, f"{prefix}{k}.")
        else:
            yield prefix + k, v


def _other(path, spec, current):
    """A valid value of a key of `spec` other than `current`."""
    if path in VALUES:
        return VALUES[path]
    if isinstance(spec, tuple):
        return next(c for c in spec if c != current)
    kind = spec.lstrip("?")[:3]
    if kind in ("boo", "str"):
        return not current if kind == "boo" else "x"
    interval = re.search(r"[\[(]([\d.]+),([\d.]+)", spec)
    if interval:
        middle = (float(interval[1]) + float(interval[2])) / 2
        return middle if current != middle else float(interval[1])
    if kind == "int":
        return (current if current is not None else 0) + 1
    return (current or 0) + 0.5


def _get(tree, path):
    for part in path.split("."):
        tree = tree[part]
    return tree


def _set(config, path, value):
    *groups, last = path.split(".")
    for g in groups:
        config = config[g]
    config[last] = value


def _resolve(config):
    """The resolved config of `config` (`config.json`) for a 2,400-image set: the plan."""
    if config.task == "pretrain":
        return train.resolved_config(config, pretrain.plan(config, 2400).run)
    if config.task == "evaluate":
        schema.check(config, "evaluate")
        return json.loads(config.to_json_best_effort())
    return train.resolved_config(config, cs.plan(config).run)


@pytest.mark.parametrize("task", sorted(schema.TASKS))
def test_every_key_reaches_the_resolved_config_or_is_refused(task):
    period = {k: p for p in schema.PERIODS for k in (p.steps_key, p.epochs_key)}
    reached = refused = 0
    for path, (_, spec, _) in _keys(schema.table(task)):
        if path == "task":
            continue
        config = load_config(RECIPES[task])
        value = _other(path, spec, _get(config, path))
        p = period.get(path)
        if p is not None:  # the twin key set to 0: one of the pair is given
            _set(config, p.epochs_key if path == p.steps_key else p.steps_key, 0)
        _set(config, path, value)
        try:
            resolved = _resolve(config)
        except ValueError as e:  # one sentence naming the key (init_from.path 'x' does not exist)
            said = str(e)
            assert "\n" not in said and path.split(".")[-1] in said, (path, said)
            refused += 1
            continue
        if p is not None and path == p.epochs_key:
            assert resolved[p.epochs_key] is None, path
            assert resolved[p.steps_key] == max(1, round(value * (2400 // config.batch_size)))
        elif path != "optim.lr":  # written out as the peak lr
            assert _get(resolved, path) == json.loads(json.dumps(value)), path
        reached += 1
    assert reached > 3 * refused, (reached, refused)


@pytest.mark.parametrize("key", sorted(schema.PLAN_OWNED))
def test_plan_owned_keys_are_refused_with_the_key_to_set(key, tmp_path):
    config = load_config("configs/smoke.py")
    with config.optim.unlocked():
        _set(config, key, 8)
    with pytest.raises(ValueError, match=f"^config.{key} is set by the run's plan, not by hand"):
        pretrain.plan(config, 2400)
    with pytest.raises(cli.CommandLineError, match=f"config.{key} is set by the run's plan") as e:
        cli.check_command_line(["main", "--config=configs/smoke.py", f"--config.{key}=8"])
    assert ("config.batch_size" in str(e.value)) == (key == "optim.batch_size")


def test_periods_in_steps_or_epochs():
    config = load_config("configs/smoke.py")  # 2,400 images at batch 64: 37 steps per epoch
    config.total_steps, config.epochs = 0, 2.0
    config.checkpoint_every_steps, config.checkpoint_every_epochs = None, 0.5
    resolved = _resolve(config)
    assert (resolved["total_steps"], resolved["checkpoint_every_steps"]) == (74, 18)
    assert resolved["epochs"] is None and resolved["checkpoint_every_epochs"] is None
    config.checkpoint_every_steps = 10
    with pytest.raises(ValueError, match="checkpoint_every_steps=10 and config.checkpoint_every"):
        _resolve(config)
    config.checkpoint_every_steps, config.total_steps, config.epochs = 0, 20, 0
    with pytest.raises(ValueError, match="config.checkpoint_every_epochs=0.5 needs the data set"):
        train.plan(config, None)


def test_values_are_refused_with_key_value_and_kind():
    config = load_config("configs/smoke.py")
    for path, value, expected in [
        ("batch_size", 0, "config.batch_size must be a positive integer, got 0"),
        ("data.flip", 1, "config.data.flip must be True or False, got 1"),
        ("optim.b2", 1.0, r"config.optim.b2 must be a number in \[0, 1\), got 1.0"),
        ("knn_temperature", float("nan"), "config.knn_temperature must be a number > 0, got nan"),
    ]:
        c = config.to_dict()  # a dict: a ConfigDict refuses some types itself
        _set(c, path, value)
        with pytest.raises(ValueError, match=f"^{expected}$"):
            schema.check(c, "pretrain")
    config.unlock()
    config.optim.weight_decy = 0.1
    with pytest.raises(ValueError, match=r"\['optim.weight_decy'\]; did you mean 'weight_decay'"):
        schema.check(config, "pretrain")


# ------------------------------------------------------------------------------ docs
DOC = os.path.join(ROOT, "docs", "config.md")


def _changes(tab: dict, base: dict) -> dict:
    return {k: v for k, v in tab.items() if k not in base or v != base[k]}


BLOCKS = (  # (heading, the keys it lists)
    ("Every training task", {k: v for k, v in schema.COMMON.items() if v != "model"}),
    ("Pretraining adds or changes", _changes(schema.PRETRAIN, schema.COMMON)),
    ("Linear probing and fine-tuning add or change", _changes(schema.CLASSIFY, schema.COMMON)),
    ("Fine-tuning adds or changes", _changes(schema.FINETUNE, schema.CLASSIFY)),
    (
        "Evaluation (plus `model`, `data`, `mesh`, `sharding_rules`, `compilation_cache` as above)",
        {k: schema.EVALUATE[k] for k in ("task", "checkpoint", "eval_batch_size")},
    ),
)


def render() -> str:
    """docs/config.md from the schema."""
    lines = [
        "# Config keys",
        "",
        "Generated from `mae_jax/schema.py` by `python tests/test_schema.py` (tests/test_schema.py",
        "checks it). A config is validated against its task's keys before anything is written:",
        "an unknown key or a bad value is one sentence naming `config.<key>`, the value and what",
        "is expected.",
        "",
        "Periods are given in steps or in epochs: `<name>_steps` or `<name>_epochs` (0 or None:",
        "not given; both given is an error), converted to steps with the data set's steps per",
        "epoch and written to the run's `config.json` in steps. `model.*` holds a preset `name`",
        "plus any `MAEConfig` field (None: the preset's), checked by `models.resolve`.",
        "",
        "Set by the run's plan, refused in a config: "
        + "; ".join(f"`{k}` ({v})" for k, v in schema.PLAN_OWNED.items())
        + ".",
    ]
    for heading, tab in BLOCKS:
        lines += [
            "",
            f"## {heading}",
            "",
            "| key | value | default | meaning |",
            "|---|---|---|---|",
        ]
        for key, (default, spec, doc) in _keys(tab):
            lines.append(f"| `{key}` | {spec_.expected(spec)} | `{default!r}` | {doc} |")
    return "\n".join(lines) + "\n"


def test_docs_key_reference_is_the_schema():
    with open(DOC, encoding="utf-8") as f:
        assert f.read() == render(), "docs/config.md is stale: python tests/test_schema.py"


def _key_lists():
    """The key lists of README.md (the `Keys` bullet, the kNN monitor's keys) and
    docs/evaluation.md (its 'Config keys' section)."""
    readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    evaluation = open(os.path.join(ROOT, "docs", "evaluation.md"), encoding="utf-8").read()
    yield re.search(r"\n- Keys \(.*?\n- ", readme, re.S)[0]
    yield re.search(r"\nKeys: `knn_every_steps`.*?\n\n", readme, re.S)[0]
    yield re.search(r"\n## Config keys\n.*?\n## ", evaluation, re.S)[0]


def test_docs_key_lists_name_schema_keys():
    paths = {path for task in schema.TASKS for path, _ in _keys(schema.table(task))}
    names = paths | {p.rsplit(".", 1)[-1] for p in paths} | {p.split(".")[0] for p in paths}
    for text in _key_lists():
        for token in re.findall(r"`([a-z][a-z0-9_.]*)`", text):
            if token not in ("config.json", "none", "inc1"):  # a file and values
                assert token in names, f"{token!r} is not a config key: {text[:60]!r}"


if __name__ == "__main__":
    sys.path.insert(0, ROOT)
    with open(DOC, "w", encoding="utf-8") as f:
        f.write(render())


@pytest.mark.parametrize(
    "value,spec,ok",
    [
        (3, "int>=1", True),
        (True, "int>=1", False),  # a bool is not a number
        (2.0, "int>=1", False),
        (None, "?int>=1", True),
        (1.0, "num(0,1]", True),
        (0.0, "num(0,1]", False),
        (float("inf"), "num>=0", False),
        (-0.5, "num[-1,0)", True),
        ("b", ("a", "b"), True),
    ],
)
def test_one_spec_checks_values_for_the_schema_and_the_python_apis(value, spec, ok):
    assert spec_.ok(spec, value) is ok
    if not ok:  # the caller's error class, the name, the expected kind and the value
        with pytest.raises(KeyError, match=f"x must be {re.escape(spec_.expected(spec))}, got"):
            spec_.require("x", value, spec, KeyError)
