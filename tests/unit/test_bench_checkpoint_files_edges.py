"""Edge cases of ``kronopt bench --model`` on checkpoints and folders (``bench.model_params`` /
``checkpoint_params`` / ``_folder_checkpoint``) that the current code gets wrong.

Each test fails on the current code because of a bug; its docstring says what is wrong and what is right.
The CLI turns only a ``ValueError`` from ``model_params`` into a usage error (``Problems.value``): anything else
is a traceback.
"""

from __future__ import annotations

import pathlib

import pytest
import torch

from kronopt.app import bench, cli

TINY = ["--steps", "2", "--warmup", "1", "--threads", "1", "--device", "cpu"]


def test_tensors_saved_from_the_meta_device_are_not_taken_for_one_tied_weight(tmp_path):
    """Wrong: the tied-weight check keys a tensor by ``untyped_storage().data_ptr()`` (with offset, shape, stride
    and dtype), and every meta tensor's storage has data pointer 0. A state dict saved from a model made on the
    meta device (``torch.save(model.state_dict())`` of a ``with torch.device("meta")`` model: the natural way to
    hand the bench a parameter set whose values are never read) loads as meta tensors, so every tensor of the
    same shape after the first is dropped as "tied": a transformer's twelve (768, 768) layers count as one.
    Before this change (HEAD~2) both names were read. Right: only tensors that really share memory are one
    (skip the check where there is no memory: ``t.device.type == "meta"``, or a data pointer of 0)."""
    with torch.device("meta"):
        model = torch.nn.Sequential(torch.nn.Linear(8, 8, bias=False), torch.nn.Linear(8, 8, bias=False))
    torch.save(model.state_dict(), tmp_path / "meta.pt")
    params = bench.model_params(str(tmp_path / "meta.pt"))
    assert params.names == ("0.weight", "1.weight")
    assert params.shapes == ((8, 8), (8, 8))


def test_a_long_factory_spec_is_not_taken_for_a_folder(tmp_path, capsys):
    """Wrong: ``model_params`` now asks ``Path(spec).is_dir()`` of every spec, a factory's too, and on Python <
    3.14 ``Path.is_dir`` raises ``OSError`` (``ENAMETOOLONG``) for a path component over 255 bytes. A factory spec
    with Python-literal arguments easily gets that long (``'mypkg.nets:GPT(vocab_size=50304, n_layer=12, …)'``),
    so a spec that worked before this change (HEAD~2 never looked at the file system for a factory) is now an
    ``OSError`` traceback out of ``cli.main``. Right: a factory spec is made as before (look for a folder only
    where the spec is not a factory call, or treat an ``OSError`` from the check as "not a folder")."""
    (tmp_path / "nets.py").write_text(
        "import torch\n"
        "def build(width=4, note=''):\n"
        "    return torch.nn.Linear(width, width, bias=False)\n"
    )
    spec = f"{tmp_path / 'nets.py'}:build(width=6, note='{'a long description of the run ' * 10}')"
    assert len(spec.rsplit("/", 1)[1]) > 255
    params = bench.model_params(spec)
    assert params.shapes == ((6, 6),)
    assert cli.main(["bench", "adamw", "--model", spec, *TINY]) == 0
    capsys.readouterr()


def test_an_unreadable_folder_is_a_value_error_naming_it(tmp_path, monkeypatch):
    """Wrong: ``_folder_checkpoint`` lists the folder (``iterdir``) outside ``checkpoint_params``' ``try``, so a
    folder the user may not read (``PermissionError``, a folder of another user on a shared machine or cluster)
    is an ``OSError`` traceback, not a usage error. (The test makes ``iterdir`` refuse as the OS would: tests
    run as root here, where ``chmod`` does not block reading.) Right: a ``ValueError`` that names the folder."""
    folder = tmp_path / "ckpt"
    folder.mkdir()
    torch.save({"w": torch.zeros(2, 2)}, folder / "model.pt")
    real_iterdir = pathlib.Path.iterdir

    def iterdir(self):
        if self == folder:
            raise PermissionError(13, "Permission denied", str(self))
        return real_iterdir(self)

    monkeypatch.setattr(pathlib.Path, "iterdir", iterdir)
    with pytest.raises(ValueError, match="ckpt"):
        bench.model_params(str(folder))


def test_an_old_format_file_whose_last_bytes_hold_a_zip_end_signature_is_read(tmp_path):
    """Wrong (rare, and older than this change): whether a torch.save'd file is of the zip format (mapped) or
    the old one (read) is asked of ``zipfile.is_zipfile``, which looks for a zip end record (``PK\\x05\\x06``)
    anywhere in the file's last 64 KiB, and an old-format file ends with raw tensor bytes, which may hold those
    four bytes (here a uint8 buffer does). The file is then loaded with ``mmap=True``, torch refuses it, and the
    message says it ``is not a file written by torch.save``. Right: ask what torch asks
    (``torch.serialization._is_zipfile``: the file starts with a zip's local header, ``PK\\x03\\x04``), and read
    the file."""
    flags = torch.tensor(list(b"PK\x05\x06" + bytes(18)), dtype=torch.uint8)
    torch.save({"w": torch.zeros(5, 3), "flags": flags}, tmp_path / "old.bin", _use_new_zipfile_serialization=False)
    params = bench.model_params(str(tmp_path / "old.bin"))
    assert params.names == ("w",) and params.shapes == ((5, 3),)
