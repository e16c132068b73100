"""A run directory may come from someone else: loading its checkpoint must never execute code.

Each attack writes a marker file if its payload runs. Every one must be refused with a one-line error naming the
file, through ``checkpoint.load`` and through the commands that read other people's checkpoints, and the marker
must never appear.
"""

import io
import os
import pickle
import shutil

import pytest
import torch
import torch.distributed.checkpoint as dcp

from mkt_torchrec.cli import main
from mkt_torchrec.training import checkpoint
from mkt_torchrec.training.checkpoint import UnsafeCheckpoint

from tests.conftest import QUICKSTART, SMALL, CommandOnUnpickle, set_flags


def _short(s: str) -> bytes:  # SHORT_BINUNICODE
    b = s.encode()
    return b"\x8c" + bytes([len(b)]) + b


def _dotted_global_attack(command: str) -> bytes:
    """Protocol 4: STACK_GLOBAL('torch.distributed.checkpoint.filesystem', 'os.system')(command). The module is
    DCP's own (what a module-prefix allow-list admits); the dotted name reaches ``os`` through it."""
    return (b"\x80\x04" + _short("torch.distributed.checkpoint.filesystem") + _short("os.system") + b"\x93"
            + _short(command) + b"\x85" + b"R" + b".")


@pytest.fixture(scope="module")
def good_ckpt(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("ckpt") / "good")
    dcp.save({"model.w": torch.arange(6.0).view(2, 3)}, checkpoint_id=path, no_dist=True)
    return path


def _copy(good: str, tmp_path, name: str) -> str:
    dst = str(tmp_path / name)
    shutil.copytree(good, dst)
    return dst


def _bytes_entry_attack(good: str, tmp_path, command: str) -> str:
    """Metadata made only of DCP's own classes, declaring a bytes entry whose file is a malicious pickle: DCP's
    default load planner would ``torch.load(weights_only=False)`` it."""
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata, MetadataIndex

    ckpt = _copy(good, tmp_path, "bytes")
    buf = io.BytesIO()
    torch.save(CommandOnUnpickle(command), buf)
    with open(os.path.join(ckpt, "payload.distcp"), "wb") as f:
        f.write(buf.getvalue())
    md = checkpoint.SafeFileSystemReader(good).read_metadata()
    md.state_dict_metadata["model.extra"] = BytesStorageMetadata()
    md.storage_data[MetadataIndex("model.extra")] = _StorageInfo("payload.distcp", 0, len(buf.getvalue()))
    md.storage_meta = None
    with open(os.path.join(ckpt, ".metadata"), "wb") as f:
        pickle.dump(md, f)
    return ckpt


def _attacks(good: str, tmp_path, marker: str) -> dict:
    command = f"touch {marker}"
    dotted = _copy(good, tmp_path, "dotted")
    with open(os.path.join(dotted, ".metadata"), "wb") as f:
        f.write(_dotted_global_attack(command))
    reduce = _copy(good, tmp_path, "reduce")
    with open(os.path.join(reduce, ".metadata"), "wb") as f:
        pickle.dump(CommandOnUnpickle(command), f)
    return {"dotted name through an allowed module": dotted, "plain __reduce__": reduce,
            "bytes entry -> torch.load": _bytes_entry_attack(good, tmp_path, command)}


def test_the_attacks_would_run_without_the_guard(good_ckpt, tmp_path):
    """The payloads are real: plain unpickling / DCP's own reader runs them (so the tests below can fail)."""
    from torch.distributed.checkpoint import FileSystemReader

    marker = str(tmp_path / "ran")
    attacks = _attacks(good_ckpt, tmp_path, marker)
    with open(os.path.join(attacks["dotted name through an allowed module"], ".metadata"), "rb") as f:
        pickle.load(f)
    assert os.path.exists(marker)
    os.remove(marker)
    state = {"model.w": torch.zeros(2, 3), "model.extra": io.BytesIO()}
    dcp.load(state, storage_reader=FileSystemReader(attacks["bytes entry -> torch.load"]), no_dist=True)
    assert os.path.exists(marker)


@pytest.mark.parametrize("attack", ["dotted name through an allowed module", "plain __reduce__",
                                    "bytes entry -> torch.load"])
def test_checkpoint_load_refuses_every_attack(good_ckpt, tmp_path, attack):
    marker = str(tmp_path / "ran")
    ckpt = _attacks(good_ckpt, tmp_path, marker)[attack]
    state = {"model.w": torch.zeros(2, 3)}
    with pytest.raises(UnsafeCheckpoint) as e:
        checkpoint.load(ckpt, state, no_dist=True)
    message = str(e.value)
    assert "\n" not in message and os.path.join(ckpt, ".metadata") in message and "refused" in message
    assert not os.path.exists(marker)


def test_good_checkpoint_still_loads(good_ckpt):
    state = {"model.w": torch.zeros(2, 3)}
    checkpoint.load(good_ckpt, state, no_dist=True)
    assert torch.equal(state["model.w"], torch.arange(6.0).view(2, 3))


@pytest.mark.parametrize("content", [b"", b"\x80\x04\x95", os.urandom(200)])
def test_truncated_or_random_metadata_is_a_one_line_error(good_ckpt, tmp_path, content):
    ckpt = _copy(good_ckpt, tmp_path, "broken")
    with open(os.path.join(ckpt, ".metadata"), "wb") as f:
        f.write(content)
    with pytest.raises(ValueError) as e:
        checkpoint.load(ckpt, {"model.w": torch.zeros(2, 3)}, no_dist=True)
    assert "\n" not in str(e.value) and ".metadata" in str(e.value)


def test_stage2_refuses_a_crafted_mem_run(small_dataset, tmp_path, capsys):
    """``mkt train --stage tem --mem-run`` on someone else's run directory whose checkpoint is an attack."""
    sets = set_flags(*SMALL, "train.max_steps=2", "data.batch_size=128")
    mem = str(tmp_path / "mem")
    assert main(["train", "--config", QUICKSTART, *sets, "--stage", "mem", "--data", small_dataset,
                 "--run-dir", mem]) == 0
    latest = checkpoint.latest_checkpoint(mem)
    marker = str(tmp_path / "ran")
    with open(os.path.join(latest, ".metadata"), "wb") as f:
        f.write(_dotted_global_attack(f"touch {marker}"))
    capsys.readouterr()
    code = main(["train", "--config", QUICKSTART, *sets, "--stage", "tem", "--data", small_dataset,
                 "--run-dir", str(tmp_path / "tem"), "--mem-run", mem])
    err = capsys.readouterr().err.strip()
    assert code == 1 and "refused" in err and len(err.splitlines()) == 1, err
    assert not os.path.exists(marker)


def test_truncated_tensor_data_is_a_one_line_error(good_ckpt, tmp_path):
    ckpt = _copy(good_ckpt, tmp_path, "truncated")
    data = next(os.path.join(ckpt, n) for n in os.listdir(ckpt) if n.endswith(".distcp"))
    with open(data, "r+b") as f:
        f.truncate(10)
    with pytest.raises(ValueError) as e:
        checkpoint.load(ckpt, {"model.w": torch.zeros(2, 3)}, no_dist=True)
    assert "\n" not in str(e.value) and "unreadable checkpoint data" in str(e.value) and ckpt in str(e.value)


def test_a_failed_write_on_a_full_disk_says_so(tmp_path, monkeypatch):
    """torch's own message for a short write is 'unexpected pos 704 vs 598', which never says 'no space left'."""
    import collections

    def short_write(*args, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc:603] . unexpected pos 704 vs 598")

    monkeypatch.setattr(checkpoint.dcp, "save", short_write)
    monkeypatch.setattr(checkpoint.shutil, "disk_usage", lambda p: collections.namedtuple("U", "total used free")(
        10 << 30, (10 << 30) - (3 << 20), 3 << 20))
    monkeypatch.setattr(checkpoint.dist, "barrier", lambda *a, **k: None)
    with pytest.raises(OSError) as e:
        checkpoint.save(str(tmp_path / "run"), 5, {"w": torch.zeros(2)}, {}, False, 1)
    message = str(e.value)
    assert "\n" not in message and "step-00000005" in message and "disk is probably full" in message
    assert "unexpected pos 704 vs 598" in message
