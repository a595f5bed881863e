"""Shared by the package's commands (`main`, `preflight`, `convert`, `visualize`): absl flag
parsing where a bad command line ends in one line `error: ...` and exit status 2, the check of
`--config.KEY=VALUE` overrides against the config file, and library noise kept off the console."""

from __future__ import annotations

import difflib
import logging
import os
import re
import sys
import tempfile
from collections.abc import Callable, Sequence
from typing import Any

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_dict

from mae_jax import config_file, schema
from mae_jax.data import lazy_tf
from mae_jax.spec import first_line

USAGE_ERROR = 2  # exit status of a bad command line


class CommandLineError(Exception):
    """A bad command line, reported as one line `error: ...` and exit status 2."""


def parse(parser: Callable[[list[str]], list[str]], argv: Sequence[str]) -> list[str]:
    """`parser(argv)` (e.g. a `flags.FlagValues`): the arguments left, program name first. An
    absl flag error is raised as `CommandLineError` with its first line."""
    try:
        return parser(list(argv))
    except flags.Error as e:
        raise CommandLineError(first_line(e)) from None


def report(e: CommandLineError) -> int:
    """Print `error: ...` on stderr; the usage-error exit status."""
    print(f"error: {e}", file=sys.stderr, flush=True)
    return USAGE_ERROR


def flags_parser(parser: Callable[[list[str]], list[str]]) -> Callable[[list[str]], list[str]]:
    """`app.run`'s `flags_parser`: `parse`, a bad command line ending the process with `report`
    instead of absl's usage text or a traceback."""

    def run(argv: list[str]) -> list[str]:
        try:
            return parse(parser, argv)
        except CommandLineError as e:
            sys.exit(report(e))

    return run


def call(
    prog: str,
    define_flags: Callable[[flags.FlagValues], None],
    interpret: Callable[[flags.FlagValues, list[str]], Any],
    execute: Callable[[Any], int],
    argv: Sequence[str],
) -> int:
    """A command run in this process (tests): fresh flags, `interpret(flags, positional args)`
    (raising CommandLineError for a bad command line), then `execute(what it returned)`.
    Returns the exit status: 0, 1 (failed) or 2 (bad command line, one line `error: ...`)."""
    fv = flags.FlagValues()
    define_flags(fv)
    try:
        what = interpret(fv, parse(fv, [prog, *argv])[1:])
    except CommandLineError as e:
        return report(e)
    return execute(what)


def reporting(run: Callable[[Any], Any]) -> Callable[[Any], int]:
    """`run(options)` as a command's `execute`: 0, or 1 with one line `error: ...` on stderr
    for a ValueError or OSError (a bad input file, a missing checkpoint)."""

    def execute(options: Any) -> int:
        try:
            run(options)
        except (ValueError, OSError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        return 0

    return execute


def run_command(
    interpret: Callable[[flags.FlagValues, list[str]], Any],
    execute: Callable[[Any], int],
) -> None:
    """`python -m ...`: the same command through `app.run` on the global flags (defined by the
    caller's main module, so that `--help` lists them); a bad command line is refused (exit 2)
    before anything runs."""

    def parser(argv: list[str]) -> list[str]:
        args = flags.FLAGS(argv)
        interpret(flags.FLAGS, args[1:])
        return args

    def app_main(argv: list[str]) -> int:
        quiet_library_logs()
        return execute(interpret(flags.FLAGS, argv[1:]))

    app.run(app_main, flags_parser=flags_parser(parser))


# ------------------------------------------------------------------ config files and overrides
# --config.a.b=v, --config.a.b v, --noconfig.a.b (absl also accepts one leading dash)
_OVERRIDE = re.compile(r"--?(no)?config\.([^=]*)(?:=(.*))?", re.DOTALL)
# type of a config field -> (absl parser, what it expects)
_TYPE_CHECKS = {
    bool: (flags.BooleanParser(), "a bool (true or false)"),
    int: (flags.IntegerParser(), "an int"),
    float: (flags.FloatParser(), "a float"),
}


def config_path(args: list[str]) -> str | None:
    """The value of the last `--config` in `args` (None without one)."""
    path = None
    for i, arg in enumerate(args):
        name, eq, value = arg.lstrip("-").partition("=")
        if arg.startswith("-") and name == "config":
            path = value if eq else (args[i + 1] if i + 1 < len(args) else None)
    return path


def load_config(path: str) -> Any:
    """`mae_jax.config_file.load`, its errors as `CommandLineError` (exit 2)."""
    try:
        return config_file.load(path)
    except config_file.ConfigFileError as e:
        raise CommandLineError(str(e)) from None


def _field_type(config: config_dict.ConfigDict, key: str) -> type | None:
    """The type of `config.KEY`; `CommandLineError` when `config` has no such key (None when
    the key is left to ml_collections: indexing, or a group that is None)."""
    holder, parts = config, key.split(".")
    for depth, part in enumerate(parts):
        if "[" in part or holder is None:
            return None
        where = ".".join(["config", *parts[:depth]])
        if not isinstance(holder, config_dict.ConfigDict):
            raise CommandLineError(
                f"unknown config key {key!r}: {where} is {holder!r}, not a group of keys"
            )
        if part not in holder:
            refused = schema.refusal(".".join(parts[: depth + 1]))
            if refused:
                raise CommandLineError(refused)
            known = sorted(holder.keys())
            close = difflib.get_close_matches(part, known, n=1)
            prefix = "".join(p + "." for p in parts[:depth])
            hint = (
                f"did you mean {prefix + close[0]!r}?"
                if close
                else f"{where} has keys {', '.join(known)}"
            )
            raise CommandLineError(f"unknown config key {key!r}; {hint}")
        if depth == len(parts) - 1:
            return holder.get_type(part)
        holder = holder[part]
    return None


def check_command_line(argv: list[str]) -> None:
    """Load the `--config` file and check each `--config.KEY[=VALUE]` of `argv` against it
    (key, and type of value), raising `CommandLineError` for the first problem."""
    args = flags.FLAGS.read_flags_from_files(argv[1:], force_gnu=False)
    if "--" in args:
        args = args[: args.index("--")]
    path = config_path(args)
    if path is None:
        return  # absl reports the missing --config
    config = load_config(path)
    if not isinstance(config, config_dict.ConfigDict):
        return
    for i, arg in enumerate(args):
        m = _OVERRIDE.fullmatch(arg)
        if not m:
            continue
        negated, key, value = m.groups()
        field_type = _field_type(config, key)
        if negated:
            continue
        if value is None and field_type is not bool and i + 1 < len(args):
            value = args[i + 1]  # `--config.KEY VALUE`
        if value is not None and field_type in _TYPE_CHECKS:
            parser, expected = _TYPE_CHECKS[field_type]
            try:
                parser.parse(value)
            except (TypeError, ValueError):
                raise CommandLineError(f"config.{key} must be {expected}, got {value!r}") from None


def config_overrides(args: list[str]) -> list[str]:
    """The `--config.KEY[=VALUE]` arguments of `args` as given (with the separate value of a
    `--config.KEY VALUE`), e.g. to pass them on to the training command."""
    out = []
    for i, arg in enumerate(args):
        m = _OVERRIDE.fullmatch(arg)
        if not m:
            continue
        out.append(arg)
        negated, _, value = m.groups()
        if not negated and value is None and i + 1 < len(args) and not args[i + 1].startswith("-"):
            out.append(args[i + 1])
    return out


def check_and_parse(
    flag_values: flags.FlagValues | None = None,
) -> Callable[[list[str]], list[str]]:
    """A parser of `flag_values` (default the global flags) for a command with a `--config`
    file flag: each `--config.KEY[=VALUE]` is checked against the file (`check_command_line`)
    before absl parses; raises `CommandLineError` for a bad command line (use with `parse`)."""

    def run(argv: list[str]) -> list[str]:
        fv = flags.FLAGS if flag_values is None else flag_values
        try:
            check_command_line(argv)
            return fv(argv)
        except (AttributeError, KeyError, TypeError, ValueError) as e:  # ml_collections overrides
            raise CommandLineError(
                f"cannot apply the --config overrides: {first_line(e)}"
            ) from None

    return run


def config_flags_parser(
    flag_values: flags.FlagValues | None = None,
) -> Callable[[list[str]], list[str]]:
    """`app.run`'s `flags_parser` of `check_and_parse`: a bad command line ends the process in
    `error: ...` and exit status 2."""
    return flags_parser(check_and_parse(flag_values))


# ------------------------------------------------------------------ library noise
# Libraries that log through stdlib loggers of their own (JAX's "Unable to initialize backend
# 'tpu'" probe, TensorFlow's Python side): their INFO lines are dropped by level.
LIBRARY_LOGGERS = ("jax", "tensorflow")
_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep


class OwnInfoOnly(logging.Filter):
    """Pass warnings and errors, and records below WARNING only when mae_jax code logged them.

    Orbax and TensorFlow Datasets log through absl, as mae_jax does: all of them use the one
    stdlib logger "absl", so the record's source file is the only thing that tells a library's
    INFO line from ours.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or os.path.abspath(record.pathname).startswith(
            _PACKAGE_DIR
        )


_OWN_INFO_ONLY = OwnInfoOnly()


def quiet_library_logs() -> None:
    """Keep libraries' INFO lines off the console, ours on (call once absl logging is set up,
    i.e. in the main function of `app.run`). A level set on a library's logger (e.g. from
    `JAX_LOGGING_LEVEL`) is kept."""
    for name in LIBRARY_LOGGERS:
        logger = logging.getLogger(name)
        if logger.level == logging.NOTSET:
            logger.setLevel(logging.WARNING)
    absl_logging.get_absl_handler().addFilter(_OWN_INFO_ONLY)  # once: the same instance


# absl C++ log line: severity, month and day, time, thread, C++ source file and line
_ABSL_CPP_LINE = re.compile(r"([IWEF])\d{4} [\d:.]+ +\d+ [^ ]+\.(?:cc|cpp|h):\d+\] ")
_ABSL_CPP_NOTICE = (
    "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR"
)


def _cpp_min_log_level() -> int:
    try:
        return int(os.environ.get("TF_CPP_MIN_LOG_LEVEL", "0"))
    except ValueError:
        return 0


def drop_cpp_log_lines(text: str, min_level: int) -> str:
    """`text` less absl C++ log lines below `min_level` (0 INFO .. 3 FATAL) and absl's notice
    that logging is not initialized."""
    kept = []
    for line in text.splitlines(keepends=True):
        if line.rstrip("\r\n") == _ABSL_CPP_NOTICE:
            continue
        m = _ABSL_CPP_LINE.match(line)
        if m and "IWEF".index(m.group(1)) < min_level:
            continue
        kept.append(line)
    return "".join(kept)


def import_tensorflow_quietly() -> None:
    """Import TensorFlow (when installed) honouring `TF_CPP_MIN_LOG_LEVEL` while it loads.

    TensorFlow's libraries log through absl C++ logging as they load ("oneDNN custom operations
    are on", once per library, each after absl's "before absl::InitializeLog()" notice): before
    TensorFlow applies TF_CPP_MIN_LOG_LEVEL, and no environment variable reaches that logging.
    So file descriptor 2 goes to a temporary file during the import, and what it caught is
    copied back to stderr less those lines. TF_CPP_MIN_LOG_LEVEL=0 (or unset) imports plainly.
    """
    if "tensorflow" in sys.modules:
        return
    lazy_tf.set_environment()
    min_level = _cpp_min_log_level()
    if min_level <= 0:
        try:
            import tensorflow  # noqa: F401 - optional and heavy: only commands that need it
        except ImportError:
            pass
        return
    caught = tempfile.TemporaryFile()
    sys.stderr.flush()
    saved = os.dup(2)
    os.dup2(caught.fileno(), 2)
    loaded = False
    try:
        import tensorflow  # noqa: F401 - optional and heavy: only commands that need it

        loaded = True
    except ImportError:
        pass  # its users report it (e.g. metrics: TensorBoard disabled)
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
        caught.seek(0)
        text = caught.read().decode(errors="replace")
        caught.close()
        if loaded:  # a failed import shows all it printed
            text = drop_cpp_log_lines(text, min_level)
        sys.stderr.write(text)
        sys.stderr.flush()
