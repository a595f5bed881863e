"""The persistent XLA compilation cache: where it goes, turning it off, a bad directory, hits."""

import os

import jax
import jax.numpy as jnp
import pytest

from mae_jax import compile_cache, schema


@pytest.fixture(autouse=True)
def session_cache():
    """Every test here may repoint the cache: put it back on the session's directory."""
    yield
    compile_cache.enable(compile_cache.AUTO)


def _entries(path):
    return sorted(f for f in os.listdir(path) if f.endswith("-cache"))


def _compile_fresh(x):
    """Compile a new program (nothing in memory), returning the compile summary."""
    jax.clear_caches()
    with compile_cache.CompileEvents() as events:
        jax.jit(lambda v: jnp.tanh(v) @ v.T + 3.0)(x).block_until_ready()
    return events.summary()


def test_auto_means_the_env_var_then_jax_own_then_xdg(monkeypatch, tmp_path):
    monkeypatch.setenv(compile_cache.ENV_VAR, str(tmp_path / "mine"))
    assert compile_cache.resolve("auto") == str(tmp_path / "mine")
    assert compile_cache.resolve(None) == str(tmp_path / "mine")
    monkeypatch.setenv(compile_cache.ENV_VAR, "none")
    assert compile_cache.resolve("auto") is None
    monkeypatch.delenv(compile_cache.ENV_VAR)
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "jax"))
    assert compile_cache.resolve("auto") == str(tmp_path / "jax")
    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert compile_cache.resolve("AUTO") == str(tmp_path / "xdg" / "mae_jax" / "xla")
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert compile_cache.resolve("auto") == str(tmp_path / "home" / ".cache" / "mae_jax" / "xla")


def test_explicit_values():
    assert compile_cache.resolve("") is None
    assert compile_cache.resolve(" None ") is None
    assert compile_cache.resolve("gs://bucket/xla/") == "gs://bucket/xla"
    assert compile_cache.resolve("~/x") == os.path.join(os.path.expanduser("~"), "x")
    assert compile_cache.resolve("rel") == os.path.abspath("rel")
    with pytest.raises(ValueError, match="config.compilation_cache must be .* got 3"):
        compile_cache.resolve(3)


def test_the_default_config_has_the_key_on():
    assert schema.defaults("pretrain").compilation_cache == "auto"


def test_a_second_compilation_loads_from_the_cache(tmp_path):
    path = str(tmp_path / "xla")
    assert compile_cache.enable(path) == path
    x = jnp.ones((8, 8))
    first = _compile_fresh(x)
    assert first["xla_programs"] >= 1 and first["xla_cache_hits"] == 0
    assert _entries(path), "nothing written to the cache"
    second = _compile_fresh(x)  # in-memory caches cleared: only the disk cache can serve it
    assert second["xla_cache_hits"] == second["xla_programs"] >= 1
    assert "cache hit" in compile_cache.describe(second)
    assert "cache" not in compile_cache.describe(first)


def test_none_turns_it_off(tmp_path):
    path = str(tmp_path / "xla")
    compile_cache.enable(path)
    x = jnp.ones((4, 4))
    _compile_fresh(x)
    written = _entries(path)
    assert compile_cache.enable("none") is None
    assert not jax.config.jax_enable_compilation_cache
    again = _compile_fresh(x)
    assert again["xla_cache_hits"] == 0 and _entries(path) == written


def test_a_directory_that_cannot_be_created_warns_and_runs_without(tmp_path, warnings_log):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    bad = str(blocker / "xla")  # below a regular file: refused even for root
    assert compile_cache.enable(bad) is None
    assert any("compilation cache off" in m and bad in m for m in warnings_log), warnings_log
    assert not jax.config.jax_enable_compilation_cache
    assert _compile_fresh(jnp.ones((3, 3)))["xla_programs"] >= 1  # still compiles and runs


def test_describe_says_what_the_cache_did():
    d = compile_cache.describe
    assert d({"xla_compile_s": 12.0, "xla_programs": 2, "xla_cache_hits": 0}) == (
        "XLA compile 12.00 s for 2 programs"
    )
    assert "1 loaded from the compilation cache" in d(
        {"xla_compile_s": 5.0, "xla_programs": 2, "xla_cache_hits": 1}
    )
    assert d({"xla_compile_s": 0.1, "xla_programs": 1, "xla_cache_hits": 1}).startswith(
        "XLA 0.10 s, cache hit"
    )
    assert d({"xla_compile_s": 0.5}) == "XLA compile 0.50 s"
