"""The preflight (`python -m mae_jax.preflight`): run for real on the CPU, end to end on the smoke
and ViT-L configs, and each kind of failure it must catch."""

import io
import os
import re
import subprocess
import sys

import pytest
from config_files import ROOT

from mae_jax import aot, preflight
from mae_jax.data import throughput

LAUNCH_ENV = {
    "MAE_TPU_PROJECT": "my-project",
    "MAE_TPU_ZONE": "us-central2-b",
    "MAE_BUCKET": "my-bucket",
    "MAE_GIT_URL": "https://example.com/mae-jax.git",
}


def _env(**extra):
    """The test environment for a preflight process: JAX picks its own number of CPU devices
    (the CPU stand-in needs one per target device), so the forced count is removed."""
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env["XLA_FLAGS"] = re.sub(
        r"--xla_force_host_platform_device_count=\d+", "", env.get("XLA_FLAGS", "")
    ).strip()
    for key in LAUNCH_ENV:
        env.pop(key, None)
    env.update(extra)
    return env


def _run(args, timeout=1200, **env):
    proc = subprocess.run(
        [sys.executable, "-m", "mae_jax.preflight", *args],
        cwd=ROOT,
        env=_env(**env),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    return proc.returncode, proc.stdout, proc.stderr


def _checklist(stdout: str) -> dict[str, tuple[str, str]]:
    """The checklist's rows: check name -> (status, summary)."""
    rows = {}
    tail = stdout[stdout.index("preflight checklist:") :]
    for line in tail.splitlines()[1:]:
        m = re.fullmatch(r"  (PASS|FAIL|SKIP)  (\w+) +[\d.]+ s  (.*)", line)
        if m:
            rows[m.group(2)] = (m.group(1), m.group(3))
    return rows


def _in_process(args):
    """`preflight.main` in this process (8 CPU devices, the CPU stand-in): (status, stdout)."""
    out = io.StringIO()
    real = sys.stdout
    sys.stdout = out
    try:
        rc = preflight.main(["preflight", *args])
    finally:
        sys.stdout = real
    return rc, out.getvalue()


@pytest.mark.slow
def test_smoke_end_to_end_passes(tmp_path):
    """Every check runs for real on the smoke config: exit 0 and the checklist all PASS (memory
    SKIP only where the TPU compiler is missing), the launch dry run's gcloud lines printed; the
    compiled programs go to the config's compilation cache (a rerun loads them). On the 2-block
    test model: the checks run the same code for every model, and its programs compile in about
    two thirds of the smoke model's CPU time."""
    cache = tmp_path / "xla"
    rc, out, err = _run(
        [
            "--config=configs/smoke.py",
            "--config.model.name=mae_vit_test",
            "--topology=v4-8",
            "--target_images_per_sec=1000",
            f"--config.compilation_cache={cache}",
        ],
        **LAUNCH_ENV,
    )
    assert rc == 0, out + err
    assert len(os.listdir(cache)) >= 2, "the model and compile checks' programs are cached"
    rows = _checklist(out)
    assert list(rows) == list(preflight.CHECKS)
    for name in ("plan", "data", "model", "compile", "launch"):
        assert rows[name][0] == "PASS", rows[name]
    has_tpu = aot.find_libtpu() is not None
    assert rows["memory"][0] == ("PASS" if has_tpu else "SKIP"), rows["memory"]
    assert ("-> ready" in out) == has_tpu  # else: "not checked: memory"
    # progress: each check's start and end with its duration
    for i, name in enumerate(preflight.CHECKS, 1):
        assert f"preflight [{i}/6] {name}: " in out
    assert re.search(r"preflight \[3/6\] model: PASS in [\d.]+ s", out)
    assert "images per CPU-second" in rows["data"][1]
    assert "cores per host for 1000 images/s" in rows["data"][1]
    assert re.search(r"step 2: loss [\d.]+, grad norm [\d.]+", out)
    assert "identical" in rows["model"][1]
    assert "per-device total:" in out
    assert "gcloud compute tpus tpu-vm create mae-tpu" in out
    assert "--accelerator-type=v4-8" in out or "--accelerator-type v4-8" in out
    assert "mae_jax.main" in out and "configs/smoke.py" in out


@pytest.mark.slow
def test_vit_large_with_the_cpu_stand_in():
    """The ViT-L recipe on v4-32 with the CPU stand-in (16 host devices, which only a fresh process
    can have): the plan and data pass, the step compiles, and memory is skipped (the stand-in's
    figures are not the TPU's). The data is the embedded set (ImageNet is not here). The step is
    the recipe's (ViT-L widths, bfloat16, batch 4096 over 16 devices) on 2 encoder blocks and 1
    decoder block: the blocks are alike, and all 24 + 8 took twice the CPU time to compile. The
    model check (two ViT-L steps and a 3.3 GiB checkpoint round trip: about 10 minutes and 13 GB
    on 2 cores) is skipped here to keep the suite within its CI budget; the smoke test runs that
    check end to end, the same code."""
    rc, out, err = _run(
        [
            "--config=configs/mae_vit_large.py",
            "--config.model.depth=2",
            "--config.model.decoder_depth=1",
            "--topology=v4-32",
            "--backend=cpu",
            "--config.data.source=embedded",
            "--config.data.name=",
            "--data_examples=64",  # 224-px decoding: the smoke test reads the default 256
            "--skip=model,launch",
        ]
    )
    assert rc == 0, out + err
    rows = _checklist(out)
    assert rows["model"][0] == "SKIP"
    for name in ("plan", "data", "compile"):
        assert rows[name][0] == "PASS", rows[name]
    assert rows["memory"][0] == "SKIP" and "CPU stand-in" in rows["memory"][1]
    assert "mae_vit_large_patch16" in rows["plan"][1]
    assert "batch 4096 (256/device)" in rows["plan"][1]
    assert "mesh: {'data': 16, 'fsdp': 1, 'tensor': 1} on 16 devices" in out
    assert "4 host(s)" in out
    assert rows["compile"][1].startswith("CPU stand-in")
    assert "compiled for backend: cpu" in out


def test_missing_data_folder_fails_naming_the_path(tmp_path):
    missing = str(tmp_path / "no_such_images")
    rc, out = _in_process(
        [
            "--config=configs/smoke.py",
            "--topology=v4-8",
            "--backend=cpu",
            "--config.data.source=folder",
            f"--config.data.path={missing}",
            "--skip=model,compile,launch",
        ]
    )
    assert rc == 1
    rows = _checklist(out)
    assert rows["data"][0] == "FAIL" and missing in rows["data"][1], rows["data"]
    assert rows["plan"][0] == "PASS"  # the smoke config sets total_steps: no data size needed
    assert rows["memory"] == ("SKIP", "needs compile (compile SKIP)")
    assert "-> NOT READY" in out


def test_missing_tfds_data_dir_fails(tmp_path):
    rc, out = _in_process(
        [
            "--config=configs/smoke.py",
            "--topology=v4-8",
            "--config.data.source=tfds",
            "--config.data.name=imagenet2012",
            f"--config.data.data_dir={tmp_path / 'tfds'}",
            "--skip=model,compile,memory,launch",
        ]
    )
    assert rc == 1
    status, summary = _checklist(out)["data"]
    assert status == "FAIL" and str(tmp_path / "tfds") in summary


def test_epoch_plan_without_the_data_size_is_unresolved_not_failed(tmp_path):
    """The ViT-L recipe counts epochs; without its data the plan still validates the rest."""
    rc, out = _in_process(
        [
            "--config=configs/mae_vit_large.py",
            "--topology=v4-32",
            f"--config.data.data_dir={tmp_path}",
            "--skip=data,model,compile,launch",
        ]
    )
    assert rc == 0, out
    status, summary = _checklist(out)["plan"]
    assert status == "PASS" and "unresolved" in summary
    assert "256 per device per micro-step" in out


@pytest.mark.parametrize(
    "args, says",
    [
        (["--config.bach_size=2"], "did you mean 'batch_size'?"),
        (["--config.batch_size=two"], "config.batch_size must be an int"),
        (["--topology=v9-8"], "unknown accelerator 'v9'"),
        (["--skip=modle"], "--skip names unknown checks ['modle']"),
    ],
)
def test_bad_command_line_exits_2(args, says, capsys):
    argv = ["preflight", "--config=configs/smoke.py", "--topology=v4-8", *args]
    assert preflight.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and says in err, err


def test_bad_command_line_in_a_process_exits_2():
    rc, out, err = _run(["--config=configs/smoke.py", "--topology=v4-8", "--config.nope=1"])
    assert rc == 2 and out == ""
    assert err.strip().splitlines()[-1].startswith("error: unknown config key 'nope'")


def test_config_mistake_fails_the_plan_and_skips_what_needs_it():
    rc, out = _in_process(
        [
            "--config=configs/smoke.py",
            "--topology=v4-8",
            "--config.batch_size=6",  # not divisible by the 4 data-parallel devices
            "--skip=data",
        ]
    )
    assert rc == 1
    rows = _checklist(out)
    assert rows["plan"][0] == "FAIL" and "config.batch_size=6" in rows["plan"][1]
    for name in ("model", "compile", "launch"):
        assert rows[name] == ("SKIP", "needs plan (plan FAIL)")
    assert rows["memory"] == ("SKIP", "needs compile (compile SKIP)")


@pytest.mark.slow  # the preflight's model check or an AOT compile of a stand-in topology
def test_non_finite_training_fails_the_model_check():
    """On the 2-block test model (the check is the same for every model; it passes end to end in
    test_smoke_end_to_end_passes), as the round-trip test below: one program."""
    rc, out = _in_process(
        [
            "--config=configs/smoke.py",
            "--config.model.name=mae_vit_test",
            "--topology=v4-8",
            "--config.warmup_steps=0",
            "--config.optim.lr=1e30",
            "--skip=data,compile,launch",
        ]
    )
    assert rc == 1
    status, summary = _checklist(out)["model"]
    assert status == "FAIL" and "non-finite loss or gradients" in summary


@pytest.mark.slow  # the preflight's model check or an AOT compile of a stand-in topology
def test_checkpoint_round_trip_that_changes_a_value_fails(monkeypatch):
    """The round trip compares every restored array with what was saved (the 2-block test
    model, as the test above)."""
    import numpy as np

    from mae_jax import workdir

    real = workdir.Reader.restore

    def restore_with_a_flipped_step(self, target, **kw):
        r = real(self, target, **kw)
        state = dict(r.state, step=np.asarray(r.state["step"]) + 1)
        return workdir.Restored(r.step, state, r.meta)

    monkeypatch.setattr(workdir.Reader, "restore", restore_with_a_flipped_step)
    rc, out = _in_process(
        [
            "--config=configs/smoke.py",
            "--config.model.name=mae_vit_test",
            "--topology=v4-8",
            "--skip=data,compile,launch",
        ]
    )
    assert rc == 1
    status, summary = _checklist(out)["model"]
    assert status == "FAIL" and "restored ['step'] differs from what was saved" in summary


def test_launch_dry_run_passes_the_overrides_on(monkeypatch):
    for key, value in LAUNCH_ENV.items():
        monkeypatch.setenv(key, value)
    rc, out = _in_process(
        [
            "--config=configs/smoke.py",
            "--topology=v4-32",
            "--config.log_every_steps",
            "7",
            "--skip=data,model,compile",
        ]
    )
    assert rc == 0, out
    assert _checklist(out)["launch"][0] == "PASS"
    assert "gcloud compute tpus tpu-vm ssh mae-tpu" in out
    assert "--config.log_every_steps 7" in out
    assert "(4 host(s))" in out


def test_launch_refusal_is_a_failure(monkeypatch):
    for key, value in LAUNCH_ENV.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("MAE_BUCKET", "Not A Bucket")
    rc, out = _in_process(
        ["--config=configs/smoke.py", "--topology=v4-8", "--skip=data,model,compile"]
    )
    assert rc == 1
    status, summary = _checklist(out)["launch"]
    assert status == "FAIL" and "bad bucket 'Not A Bucket'" in summary


def test_memory_verdict():
    """Only the target's own compiler gives a verdict; DOES NOT FIT is a failure."""
    checks = preflight.Checklist(io.StringIO())
    big = dict(total_bytes=40 * 2**30, hbm_bytes=32 * 2**30, fraction_of_hbm=1.25)
    small = dict(big, total_bytes=2**30, fraction_of_hbm=1 / 32)
    cases = {
        "tpu_too_big": (dict(big, stand_in=False, fits=False), "FAIL", "DOES NOT FIT"),
        "stand_in": (dict(big, stand_in=True, fits=False), "SKIP", "CPU stand-in"),
        "tpu_fits": (dict(small, stand_in=False, fits=True), "PASS", "1.00 GiB of 32.00 GiB"),
    }
    for name, (report, status, says) in cases.items():
        result = checks.run(name, "", lambda r=report: preflight.memory_verdict(r, "tpu"))
        assert result.status == status and says in result.summary, result


def test_checklist_isolates_checks():
    out = io.StringIO()
    checks = preflight.Checklist(out, total=3)

    def boom():
        raise KeyError("surprise")

    checks.run("first", "raising", boom)
    checks.run("second", "fine", lambda: "ok")
    checks.run("third", "dependent", lambda: "never", needs=["first"])
    assert [r.status for r in checks.results.values()] == ["FAIL", "PASS", "SKIP"]
    assert checks.results["first"].summary == "KeyError: 'surprise'"
    assert checks.failed
    text = checks.format("t")
    assert "1 passed, 1 failed, 1 skipped -> NOT READY" in text


def test_cores_needed():
    assert throughput.cores_needed(1000.0, 250.0) == 4.0
    with pytest.raises(ValueError, match="must be positive"):
        throughput.cores_needed(1000.0, 0.0)
