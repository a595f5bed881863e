"""Bad files and bad output paths: each ends in one clear ValueError naming the file.

Real files are written (by our export code or torch) and then damaged.
"""

import errno
import json
import os
import pickle

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("safetensors")

from test_convert_torch import _Evil  # noqa: E402

from mae_jax import convert  # noqa: E402
from mae_jax.models import create  # noqa: E402

NAME = "mae_vit_test"


@pytest.fixture(scope="module")
def model():
    return create(NAME)


def _cut_in_half(path):
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])


def _raises_one_sentence(path, *words, source=None):
    """Loading `path` (or the `source` holding it) raises a one-line ValueError naming `path`
    and holding `words`."""
    with pytest.raises(ValueError) as info:
        convert.from_pytorch(path if source is None else source, NAME)
    message = str(info.value)
    assert str(path) in message and "\n" not in message, message
    for word in words:
        assert word in message, message
    return message


# ----------------------------------------------------------------------------- reading
def test_truncated_safetensors_file_is_named_as_truncated(model, tmp_path):
    path = convert.save(
        convert.to_pytorch(model, "timm"), str(tmp_path / "enc.safetensors"), "timm", model.config
    )
    size = os.path.getsize(path)
    _cut_in_half(path)
    msg = _raises_one_sentence(path, "is truncated", f"{size:,} bytes its header describes")
    assert "re-download or re-export" in msg
    open(path, "wb").close()
    _raises_one_sentence(path, "is empty (0 bytes)", "expected a safetensors file")


def test_hf_directory_with_truncated_weights_or_bad_config_names_the_file(model, tmp_path):
    hf = str(tmp_path / "hf")
    convert.save(convert.to_pytorch(model, "hf"), hf, "hf", model.config)
    weights, config = os.path.join(hf, "model.safetensors"), os.path.join(hf, "config.json")
    _cut_in_half(weights)
    _raises_one_sentence(weights, "is truncated", source=hf)
    with open(config, "w") as f:
        f.write('{"hidden_size": 32,')  # cut short
    _raises_one_sentence(
        config, "is not valid JSON", "expected the Hugging Face model config", source=hf
    )
    with open(config, "w") as f:
        json.dump([1, 2], f)
    _raises_one_sentence(config, "holds a JSON list", "expected", source=hf)
    open(config, "w").close()
    _raises_one_sentence(config, "is empty", source=hf)
    os.remove(config)
    _raises_one_sentence(hf, "has no config.json", "expected a Hugging Face model directory")


def test_empty_and_truncated_pth_are_not_called_unsafe(model, tmp_path):
    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")
    msg = _raises_one_sentence(empty, "is empty (0 bytes)", "expected a PyTorch state dict")
    assert "weights_only" not in msg and "refuse" not in msg
    path = convert.save(
        convert.to_pytorch(model), str(tmp_path / "mae.pth"), "official", model.config
    )
    _cut_in_half(path)
    msg = _raises_one_sentence(path, "is truncated", "re-download or re-export")
    assert "weights_only" not in msg and "refuse" not in msg
    legacy = str(tmp_path / "legacy.pth")  # the pre-zip torch.save format
    torch.save({"w": torch.zeros(64, 64)}, legacy, _use_new_zipfile_serialization=False)
    _cut_in_half(legacy)
    msg = _raises_one_sentence(legacy, "is truncated")
    assert "weights_only" not in msg


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_unsafe_pickle_keeps_its_refusal_and_other_junk_is_called_damaged(tmp_path):
    marker = str(tmp_path / "pwned")
    evil = str(tmp_path / "evil.pth")
    torch.save({"model": {"w": torch.zeros(2)}, "payload": _Evil(marker)}, evil)
    _raises_one_sentence(evil, "weights_only=True", "refuses", "open was not an allowed global")
    plain = str(tmp_path / "plain.pth")
    with open(plain, "wb") as f:
        pickle.dump(_Evil(marker), f)
    _raises_one_sentence(plain, "weights_only=True", "refuses")
    assert not os.path.exists(marker)
    text = tmp_path / "notes.pth"
    text.write_text("not a checkpoint\n")
    msg = _raises_one_sentence(text, "is damaged or not a PyTorch state dict")
    assert "refuse" not in msg
    listed = str(tmp_path / "list.pth")
    torch.save([torch.zeros(2)], listed)
    _raises_one_sentence(listed, "expected a state dict (a mapping), got list")


# ----------------------------------------------------------------------------- writing
@pytest.mark.parametrize("fmt,name", [("official", "out.pth"), ("timm", "out.safetensors")])
def test_output_under_a_regular_file_is_a_clear_error(model, tmp_path, fmt, name):
    blocker = tmp_path / "file.txt"
    blocker.write_text("keep me")
    sd = convert.to_pytorch(model, fmt)
    for out in (blocker / name, blocker / "sub" / name):
        with pytest.raises(ValueError) as info:
            convert.save(sd, str(out), fmt, model.config)
        msg = str(info.value)
        assert msg.startswith(f"cannot write {out}: {blocker} is a file, not a directory"), msg
    with pytest.raises(ValueError, match="is a file, not a directory"):
        convert.save(convert.to_pytorch(model, "hf"), str(blocker / "hf"), "hf", model.config)
    assert blocker.read_text() == "keep me"
    assert sorted(os.listdir(tmp_path)) == ["file.txt"]


def _disk_full(obj, target, *args, **kwargs):
    """`torch.save` / `json.dump` that writes a little, then finds the disk full."""
    if hasattr(target, "write"):
        target.write("partial")
    else:
        with open(target, "wb") as f:
            f.write(b"partial")
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_failed_write_leaves_no_partial_files(model, tmp_path, monkeypatch):
    with monkeypatch.context() as m:
        m.setattr(torch, "save", _disk_full)
        out = tmp_path / "a" / "b" / "out.pth"
        with pytest.raises(ValueError, match=f"^cannot write {out}: no space left on device$"):
            convert.save(convert.to_pytorch(model), str(out), "official", model.config)
    with monkeypatch.context() as m:
        m.setattr(json, "dump", _disk_full)  # the config.json write fails after the weights
        out = tmp_path / "c" / "hf"
        with pytest.raises(ValueError, match="config.json: no space left on device$"):
            convert.save(convert.to_pytorch(model, "hf"), str(out), "hf", model.config)
    assert os.listdir(tmp_path) == []
    occupied = tmp_path / "busy.pth"
    occupied.mkdir()  # the output name is taken by a directory: the final rename fails
    with pytest.raises(ValueError, match=f"^cannot write {occupied}: is a directory$"):
        convert.save(
            convert.to_pytorch(model), str(occupied), "official", model.config, overwrite=True
        )
    assert os.listdir(tmp_path) == ["busy.pth"] and os.listdir(occupied) == []


@pytest.mark.skipif(
    hasattr(os, "geteuid") and os.geteuid() == 0,
    reason="running as root: permission bits do not stop writes",
)
def test_read_only_directory_is_a_clear_error(model, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        for fmt, out in (
            ("official", ro / "out.pth"),
            ("timm", ro / "out.safetensors"),
            ("hf", ro / "hf"),
            ("official", ro / "sub" / "out.pth"),
        ):
            with pytest.raises(ValueError) as info:
                convert.save(convert.to_pytorch(model, fmt), str(out), fmt, model.config)
            msg = str(info.value)
            assert msg.startswith(f"cannot write {out}: permission denied in {ro}"), msg
            assert os.listdir(ro) == []
    finally:
        ro.chmod(0o755)


# ----------------------------------------------------------------------------- file modes
@pytest.mark.parametrize("umask", [0o022, 0o027], ids=["umask022", "umask027"])
def test_written_files_get_the_usual_mode(model, tmp_path, umask):
    old = os.umask(umask)
    try:
        paths = [
            convert.save(
                convert.to_pytorch(model), str(tmp_path / "a.pth"), "official", model.config
            ),
            convert.save(
                convert.to_pytorch(model, "timm"),
                str(tmp_path / "b.safetensors"),
                "timm",
                model.config,
            ),
        ]
        hf = convert.save(convert.to_pytorch(model, "hf"), str(tmp_path / "hf"), "hf", model.config)
        paths += [os.path.join(hf, "model.safetensors"), os.path.join(hf, "config.json")]
    finally:
        os.umask(old)
    modes = {os.path.basename(p): oct(os.stat(p).st_mode & 0o777) for p in paths}
    assert modes == dict.fromkeys(modes, oct(0o666 & ~umask))
    back = convert.from_pytorch(str(tmp_path / "a.pth"), NAME)
    np.testing.assert_array_equal(
        np.asarray(back.blocks[0].mlp.fc1.kernel.get_value()),
        np.asarray(model.blocks[0].mlp.fc1.kernel.get_value()),
    )
