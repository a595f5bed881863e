"""Shared by the package's commands (`main`, `convert`, `visualize`): absl flag parsing where a bad
command line ends in one line `error: ...` and exit status 2, and library noise kept off the
console."""

from __future__ import annotations

import logging
import os
import re
import sys
import tempfile
from collections.abc import Callable, Sequence
from typing import Any

from absl import flags
from absl import logging as absl_logging

USAGE_ERROR = 2  # exit status of a bad command line


class CommandLineError(Exception):
    """A bad command line, reported as one line `error: ...` and exit status 2."""


def first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__


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


def run_command(
    interpret: Callable[[flags.FlagValues, list[str]], Any],
    execute: Callable[[Any], int],
) -> None:
    """`python -m ...`: the same command through `app.run` on the global flags (defined by the
    caller's main module, so that `--help` lists them); a bad command line is refused (exit 2)
    before anything runs."""
    from absl import app  # noqa: PLC0415

    def parser(argv: list[str]) -> list[str]:
        args = flags.FLAGS(argv)
        interpret(flags.FLAGS, args[1:])
        return args

    def app_main(argv: list[str]) -> int:
        quiet_library_logs()
        return execute(interpret(flags.FLAGS, argv[1:]))

    app.run(app_main, flags_parser=flags_parser(parser))


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
    min_level = _cpp_min_log_level()
    if min_level <= 0:
        try:
            import tensorflow  # noqa: F401, PLC0415
        except ImportError:
            pass
        return
    caught = tempfile.TemporaryFile()
    sys.stderr.flush()
    saved = os.dup(2)
    os.dup2(caught.fileno(), 2)
    loaded = False
    try:
        import tensorflow  # noqa: F401, PLC0415

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
