"""The smoke runs' expected numbers and times live in one place, the `Measured` paragraph of each
smoke config's docstring; every mention in the README and docs/evaluation.md must agree with it
(top-1 / top-5 pairs and run times, in any paragraph that names the config or its workdir)."""

import ast
import re

import pytest
from config_files import ROOT

SMOKE = {  # config -> the names that tie a paragraph to it
    "configs/smoke.py": ("configs/smoke.py", "/tmp/mae_smoke"),
    "configs/finetune_smoke.py": ("finetune_smoke", "/tmp/mae_finetune_smoke"),
    "configs/linprobe_smoke.py": ("linprobe_smoke", "/tmp/mae_linprobe_smoke"),
}
DOCS = ("README.md", "docs/evaluation.md")
PAIR = re.compile(r"top-1 (\d+(?:\.\d+)?)%,\s+(?:#\s+)?top-5 (\d+(?:\.\d+)?)%")
TIME = re.compile(r"\babout (?:a|an|one|\d+(?:\.\d+)?)\s+minutes?\b|\b(\d+(?:\.\d+)?) min\b")


def _read(path):
    with open(f"{ROOT}/{path}") as f:
        return f.read()


def measured(config):
    """`{'top1', 'top5', 'minutes'}` of the `Measured` paragraph of `config`'s docstring."""
    doc = ast.get_docstring(ast.parse(_read(config)))
    found = re.search(r"\nMeasured\b(.*?)(?:\n\n|$)", doc, re.S)
    assert found, f"{config}'s docstring has no 'Measured' paragraph"
    text = found.group(1)
    out = {"minutes": float(re.search(r"(\d+(?:\.\d+)?) min\b", text).group(1))}
    pair = PAIR.search(text)
    if pair:
        out["top1"], out["top5"] = float(pair.group(1)), float(pair.group(2))
    conditions = text.lower()
    assert "device" in conditions and "load average" in conditions, (
        f"{config}: the Measured paragraph must say the device count and the machine's load"
    )
    return out


def _same(shown: str, value: float) -> bool:
    """`shown` is `value` rounded to the decimals `shown` has."""
    decimals = len(shown.split(".")[1]) if "." in shown else 0
    return f"{value:.{decimals}f}" == shown


def paragraphs(text):
    return [p for p in re.split(r"\n\s*\n", text) if p.strip()]


def mentions(path):
    """`(config, kind, shown values, paragraph)` of every number of a smoke run in `path`."""
    for para in paragraphs(_read(path)):
        named = [c for c, keys in SMOKE.items() if any(k in para for k in keys)]
        for m in PAIR.finditer(para):
            yield named, "pair", (m.group(1), m.group(2)), para
        for m in TIME.finditer(para):
            yield named, "time", (m.group(1) or m.group(0)), para


@pytest.mark.parametrize("config", sorted(SMOKE))
def test_each_smoke_config_says_what_it_measured_and_where(config):
    assert measured(config)["minutes"] > 0


@pytest.mark.parametrize("path", DOCS)
def test_every_smoke_number_in_the_docs_is_the_config_s(path):
    expected = {c: measured(c) for c in SMOKE}
    for named, kind, shown, para in mentions(path):
        where = f"{path}: {shown!r} in\n{para[:300]}"
        if kind == "pair" and not named:
            continue  # a number of another run (the paper's, the kNN monitor's)
        assert len(named) == 1, f"{where}\nnames {len(named)} smoke configs: which one is meant?"
        e = expected[named[0]]
        if kind == "pair":
            assert _same(shown[0], e["top1"]) and _same(shown[1], e["top5"]), (
                f"{where}\ndiffers from {named[0]}'s Measured top-1 {e['top1']}, top-5 {e['top5']}"
            )
        else:
            assert shown[0].isdigit() and _same(shown, e["minutes"]), (
                f"{where}\ndiffers from {named[0]}'s Measured {e['minutes']} min"
            )


def test_the_readme_shows_the_downstream_commands_and_links_their_doc():
    readme = _read("README.md")
    for command in ("configs/linprobe_smoke.py", "configs/finetune_smoke.py", "mae_jax.features"):
        assert f"--config={command}" in readme or command in readme
    assert "(docs/evaluation.md)" in readme
    assert "mae_jax.load(" in readme
