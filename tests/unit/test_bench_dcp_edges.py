"""Review of ``kronopt bench --model FOLDER`` on a ``torch.distributed.checkpoint`` (DCP) folder (``_dcp_entries``,
``_DcpMetadataUnpickler``, ``_DCP_GLOBALS``): each test here fails on the change as written, and says what is wrong
and what is right.

The ``.metadata`` file is a pickle and may come from anyone; the allow-list must make nothing but DCP's records,
and must not change anything in the process either. Metadata that real DCP saves write (another OS, another
Python, an older torch) must be read; a broken file must be a ``ValueError`` naming it; the model's parameter set
must be the model's.
"""

import importlib
import io
import os
import pathlib
import pickle
import struct
import sys
import types
import warnings

import pytest
import torch

from kronopt.app import bench
from .test_bench_dcp import NAMES_AND_SHAPES, _model, _names_and_shapes, _save, _stepped_adamw

dcp = pytest.importorskip("torch.distributed.checkpoint")
from torch.distributed.checkpoint import metadata as dcp_metadata  # noqa: E402


# -- hand-written pickles -------------------------------------------------------------------------------------------
def _global(module: str, name: str) -> bytes:
    """GLOBAL: pushes ``module.name`` (what find_class returns)."""
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def _str(s: str) -> bytes:
    """BINUNICODE: pushes ``s``."""
    b = s.encode()
    return b"X" + struct.pack("<I", len(b)) + b


def _metadata_folder(tmp_path, data: bytes, name="evil") -> str:
    folder = tmp_path / name
    folder.mkdir()
    (folder / ".metadata").write_bytes(data)
    return str(folder)


def _real_metadata(tmp_path) -> dcp_metadata.Metadata:
    """The Metadata a real DCP save of ``{"model": …, "optim": …}`` wrote, read by DCP's own (trusting) reader."""
    model = _model()
    folder = _save({"model": model.state_dict(), "optim": _stepped_adamw(model).state_dict()}, tmp_path / "real")
    return dcp.FileSystemReader(folder).read_metadata()


# -- the allow-list: nothing made but records, nothing changed --------------------------------------------------------
def test_a_hostile_metadata_cannot_monkeypatch_pathlib_and_redirect_later_file_writes(tmp_path):
    """WRONG: ``find_class`` hands back the allowed *classes* themselves, and pickle's BUILD opcode on a class with a
    ``(None, slotstate)`` state runs ``setattr(cls, name, value)``. So a ``.metadata`` of a few bytes
    (``pathlib.PurePath``, BUILD ``{"_str": "/attacker/file"}``) rewrites ``pathlib.PurePath`` for the whole
    process: every path then turns into the attacker's string, and every later ``Path(...).write_text`` /
    ``open(path)`` in the process (kronopt's, torch's, the user's code) writes the attacker's file instead. The
    model_params call itself reports the error under the hijacked name.
    RIGHT: reading a metadata file changes no class, function or object of the process (e.g. find_class returns
    thin factories, or BUILD on anything but a fresh record instance is refused); the classes are as they were."""
    target = tmp_path / "hijacked"
    data = b"\x80\x02" + _global("pathlib", "PurePath") + b"N}" + _str("_str") + _str(str(target)) + b"s\x86b."
    folder = _metadata_folder(tmp_path, data)
    before = dict(vars(pathlib.PurePath))
    try:
        with pytest.raises(ValueError):
            bench.model_params(folder)
        now = vars(pathlib.PurePath)
        changed = sorted(k for k in set(before) | set(now) if now.get(k) is not before.get(k))
        mine = tmp_path / "mine.txt"
        mine.write_text("the bench's results")
        redirected = target.exists()
    finally:  # put pathlib back before anything else in this process uses it
        for k in set(vars(pathlib.PurePath)) - set(before):
            delattr(pathlib.PurePath, k)
        for k, v in before.items():
            if vars(pathlib.PurePath).get(k) is not v:
                setattr(pathlib.PurePath, k, v)
    assert changed == [], f"reading a hostile .metadata rewrote pathlib.PurePath's {changed}"
    assert not redirected, "a later write to another path went to the file the hostile .metadata named"


_ENUM = dcp_metadata._MEM_FORMAT_ENCODING.TORCH_CONTIGUOUS_FORMAT


@pytest.mark.parametrize("target", ["Metadata class", "DCP's memory-format enum member", "torch's layout cache"])
def test_a_hostile_metadata_cannot_change_torch_or_dcp_state(tmp_path, target):
    """WRONG: the allowed globals are process-wide singletons and pickle's BUILD writes into them: BUILD on the class
    ``Metadata`` sets a class attribute; ``_MEM_FORMAT_ENCODING(0)`` (REDUCE) is the enum's one member, and BUILD
    ``{"_value_": 7}`` rewrites it, so every later real ``dcp.save`` in the process writes a memory format of 7
    that no reader can load; BUILD on ``torch.serialization._get_layout`` replaces its ``cache``, so every layout
    unpickled later in the process (DCP's own metadata reader, ``torch.load``, ``weights_only`` too) is the
    attacker's object.
    RIGHT: a refused or accepted metadata file leaves torch's and DCP's objects as they were."""
    mod = "torch.distributed.checkpoint.metadata"
    if target == "Metadata class":
        data = b"\x80\x02" + _global(mod, "Metadata") + b"N}" + _str("planner_data") + _str("x") + b"s\x86b."
        read = lambda: vars(dcp_metadata.Metadata).get("planner_data")  # noqa: E731
    elif target == "DCP's memory-format enum member":
        data = b"\x80\x02" + _global(mod, "_MEM_FORMAT_ENCODING") + b"K\x00\x85R}" + _str("_value_") + b"K\x07sb."
        read = lambda: _ENUM._value_  # noqa: E731
    else:
        data = (b"\x80\x02" + _global("torch.serialization", "_get_layout") + b"}" + _str("cache") + b"}"
                + _str("torch.strided") + _str("not a layout") + b"ssb.")
        read = lambda: dict(torch.serialization._get_layout.cache)  # noqa: E731
    folder = _metadata_folder(tmp_path, data)
    planner_data, value = vars(dcp_metadata.Metadata).get("planner_data"), _ENUM._value_
    cache = torch.serialization._get_layout.cache
    before = read()
    try:
        with pytest.raises(ValueError):
            bench.model_params(folder)
        after = read()
    finally:
        dcp_metadata.Metadata.planner_data = planner_data
        _ENUM._value_ = value
        torch.serialization._get_layout.cache = cache
    assert after == before, f"reading a hostile .metadata changed the {target}: {before!r} -> {after!r}"


def test_a_refused_torch_name_is_not_looked_up_on_torch_first(tmp_path, monkeypatch):
    """WRONG: ``find_class`` tests a name of module ``torch`` with ``getattr(torch, name, None)`` before refusing it,
    and torch's module ``__getattr__`` imports its lazy submodules on such a lookup (``torch._inductor``,
    ``torch._dynamo``, ``torch._export``, ``torch.onnx``) and calls the deprecated attributes' functions: a hostile
    metadata naming ``torch._inductor`` makes the reader import (run) all of torch._inductor, seconds of work,
    before the name is refused.
    RIGHT: the name is checked against torch's dtypes without running anything (e.g. ``vars(torch).get(name)``)."""
    lazy = getattr(torch, "_lazy_modules", {"_dynamo", "_inductor", "_export", "onnx"})
    name = next((n for n in sorted(lazy) if n not in vars(torch)), None)
    if name is None:
        pytest.skip("every lazy torch submodule is imported already")
    imported = []
    real = importlib.import_module

    def spy(module, package=None):
        if package == "torch" and module == f".{name}":
            imported.append(f"torch{module}")
            return types.ModuleType(f"torch{module}")  # no real import: the test stays fast
        return real(module, package)

    monkeypatch.setattr(importlib, "import_module", spy)
    folder = _metadata_folder(tmp_path, b"\x80\x02" + _global("torch", name) + b".")
    with pytest.raises(ValueError, match=f"it names torch.{name}"):
        bench.model_params(folder)
    assert imported == [], f"reading a refused name imported {imported}"


# -- metadata real DCP saves write, refused ---------------------------------------------------------------------------
class _PathAs(pickle.Pickler):
    """Pickles every path as ``cls(*args)``: a path as another OS's or another Python's pickle names it."""

    def __init__(self, f, cls, args):
        super().__init__(f, protocol=4)
        self.cls, self.args = cls, args

    def reducer_override(self, obj):
        if isinstance(obj, pathlib.PurePath):
            return self.cls, self.args
        return NotImplemented


def _dumps_paths_as(md, cls, args) -> bytes:
    f = io.BytesIO()
    _PathAs(f, cls, args).dump(md)
    return f.getvalue()


def test_a_checkpoint_saved_on_windows_is_read_on_posix_and_back(tmp_path):
    """WRONG: a DCP save on Windows records its folder as ``pathlib.WindowsPath`` (``StorageMeta.checkpoint_id``,
    FileSystemWriter's ``Path(path)``). The allow-list lists ``WindowsPath``, but makes it: on Linux or macOS
    ``WindowsPath(...)`` raises "cannot instantiate 'WindowsPath' on your system", so a checkpoint trained on Windows
    is refused ("cannot be read as a checkpoint (NotImplementedError …)"), and one saved on Linux is refused on
    Windows the same way, though the path is never used.
    RIGHT: a concrete path is made as the pure path of its flavour (PureWindowsPath / PurePosixPath); the model's
    tensors are read."""
    md = _real_metadata(tmp_path)
    assert isinstance(md.storage_meta.checkpoint_id, pathlib.PurePath)  # the path every FileSystemWriter save records
    other = (pathlib.PosixPath, ("/runs/ck",)) if os.name == "nt" else (pathlib.WindowsPath, ("C:\\runs\\ck",))
    folder = _metadata_folder(tmp_path, _dumps_paths_as(md, *other), "other-os")
    params = bench.model_params(folder)
    assert _names_and_shapes(params) == NAMES_AND_SHAPES


def test_a_checkpoint_saved_under_python_3_13_is_read(tmp_path, monkeypatch):
    """WRONG: Python 3.13 (which kronopt supports, requires-python >= 3.11) defines the pathlib classes in
    ``pathlib._local``, so every DCP ``.metadata`` written under 3.13 names ``pathlib._local.PosixPath``
    (cpython gh-133789). The allow-list knows only module ``pathlib``: every FileSystemWriter checkpoint saved under
    Python 3.13 is refused ("it names pathlib._local.PosixPath"), on 3.13 itself too.
    RIGHT: ``pathlib._local``'s path classes are paths like ``pathlib``'s (made as pure paths, whichever Python
    reads them); the model's tensors are read."""
    md = _real_metadata(tmp_path)
    local = types.ModuleType("pathlib._local")  # what pickle names under 3.13, stood in for while dumping

    class PosixPath:
        pass

    PosixPath.__module__, PosixPath.__qualname__ = "pathlib._local", "PosixPath"
    local.PosixPath = PosixPath
    monkeypatch.setitem(sys.modules, "pathlib._local", local)
    data = _dumps_paths_as(md, PosixPath, ("/runs/ck",))
    monkeypatch.delitem(sys.modules, "pathlib._local")
    assert b"pathlib._local" in data
    params = bench.model_params(_metadata_folder(tmp_path, data, "py313"))
    assert _names_and_shapes(params) == NAMES_AND_SHAPES


def test_a_checkpoint_saved_by_torch_before_2_3_is_read(tmp_path):
    """WRONG: until torch 2.3 (pytorch#116248) DCP's ``TensorStorageMetadata.properties`` was
    ``torch.distributed._shard.sharded_tensor.metadata.TensorProperties`` (with that module's
    ``MEM_FORMAT_ENCODING``), and every ``.metadata`` of those releases names them. DCP still reads them (the module
    and classes are kept for that), but the allow-list refuses them ("it names
    torch.distributed._shard.sharded_tensor.metadata.TensorProperties"): no checkpoint saved by torch <= 2.2 can be
    benched.
    RIGHT: the old module's ``TensorProperties`` and ``MEM_FORMAT_ENCODING`` are allowed too; the model's tensors
    are read."""
    from torch.distributed._shard.sharded_tensor import metadata as old

    md = _real_metadata(tmp_path)
    for meta in md.state_dict_metadata.values():
        if isinstance(meta, dcp_metadata.TensorStorageMetadata):
            meta.properties = old.TensorProperties(dtype=meta.properties.dtype)  # as torch 2.0-2.2 wrote them
    folder = _metadata_folder(tmp_path, pickle.dumps(md), "torch22")
    read_by_dcp = dcp.FileSystemReader(folder).read_metadata()  # DCP itself reads it
    assert type(read_by_dcp.state_dict_metadata["model.block.weight"].properties) is old.TensorProperties
    params = bench.model_params(folder)
    assert _names_and_shapes(params) == NAMES_AND_SHAPES


# -- a broken file: a ValueError naming it -----------------------------------------------------------------------------
@pytest.mark.parametrize("data", [
    pytest.param(b"", id="empty"),
    pytest.param(b"\x80\x04", id="cut-after-the-protocol"),
    pytest.param(b"\x80\x04\x8d" + struct.pack("<Q", 2**63 + 5), id="BINUNICODE8-too-long"),
    pytest.param(b"\x80\x04\x95" + struct.pack("<Q", 2**63 + 5), id="FRAME-too-long"),
    pytest.param(b"\x80\x04\x95" + struct.pack("<Q", 2**62), id="FRAME-of-4-EiB"),
])
def test_an_empty_cut_or_overlong_metadata_is_a_value_error(tmp_path, data):
    """WRONG: ``checkpoint_params`` turns only OSError, KeyError, TypeError, ValueError, AttributeError, RuntimeError
    and UnpicklingError into its ValueError, but unpickling an empty or cut ``.metadata`` (a save killed while
    writing it, a copy cut short) raises ``EOFError: Ran out of input``, and a 12-byte file claiming a longer
    string or frame than memory raises ``OverflowError`` / ``MemoryError``: the CLI prints a traceback, not a
    usage error.
    RIGHT: a ValueError saying the file cannot be read as a checkpoint, naming it."""
    folder = _metadata_folder(tmp_path, data, "broken")
    with pytest.raises(ValueError, match="cannot be read as a checkpoint"):
        bench.model_params(folder)


@pytest.mark.parametrize("size", [
    pytest.param(torch.Size([-3, 4]), id="negative"),
    pytest.param(["6", "4"], id="strings"),
    pytest.param([2.5, 4], id="float"),
    pytest.param([2**70], id="past-int64"),
])
def test_a_tensor_size_that_is_not_a_size_is_refused_naming_the_file(tmp_path, size):
    """WRONG: ``_dcp_entries`` takes ``tuple(meta.size)`` as it comes: a metadata whose size is negative, strings,
    floats or past int64 gives a ParamSet of such shapes, and the bench then fails far from the file (a TypeError
    traceback in ``torch.randn`` or a sort, or "need at least one shape, every dimension ≥ 1" without the file's
    name). The safetensors reader refuses such a shape (``_safetensors_entries``: ints, 0 <= x < 2**63).
    RIGHT: a ValueError naming the ``.metadata`` file and the tensor."""
    md = _real_metadata(tmp_path)
    md.state_dict_metadata["model.block.weight"].size = size
    folder = _metadata_folder(tmp_path, pickle.dumps(md), "sizes")
    with pytest.raises(ValueError, match=r"\.metadata"):
        bench.model_params(folder)


# -- the folder and the model's parameter set -------------------------------------------------------------------------
def test_a_lightning_sharded_checkpoint_folder_is_read_from_its_metadata(tmp_path):
    """WRONG: Lightning's sharded checkpoints (FSDPStrategy ``state_dict_type="sharded"``, ModelParallelStrategy,
    Fabric's ``save``) are a DCP folder of ``{"model": …, "optimizer_0": …}`` plus ``meta.pt``, a torch.save'd dict
    of the rest of the checkpoint (epoch, global_step, loops, callbacks…; ``_METADATA_FILENAME = "meta.pt"``).
    ``_folder_checkpoint`` looks for the ``.metadata`` only when the folder holds no ``.pt`` file, so it picks
    ``meta.pt`` and fails ("not a mapping of names to tensors"): no Lightning sharded checkpoint can be benched.
    RIGHT: a folder holding a DCP ``.metadata`` is read as the DCP checkpoint (the loose torch.save'd file beside
    it is not the model); the model's tensors are read."""
    model = _model()
    state = {"model": model.state_dict(), "optimizer_0": _stepped_adamw(model).state_dict()}
    folder = _save(state, tmp_path / "epoch=0")
    torch.save({"epoch": 0, "global_step": 10, "pytorch-lightning_version": "2.4.0", "loops": {}, "callbacks": {},
                "lr_schedulers": [], "hyper_parameters": {"lr": 1e-3}}, f"{folder}/meta.pt")
    params = bench.model_params(folder)
    assert _names_and_shapes(params) == NAMES_AND_SHAPES


@pytest.mark.parametrize("layout", ["an ema's own 'model' entry", "an optimizer's 'state_dict' entry"])
def test_a_known_key_met_deeper_in_another_entry_is_not_taken_for_the_model(tmp_path, layout):
    """WRONG: ``_dcp_entries`` takes every tensor whose path holds the key anywhere (``wanted in at[:-1]``), from
    every entry, and the first of ``_STATE_DICT_KEYS`` met anywhere wins over one at the top. So
    ``{"model": sd, "ema": {"model": ema_sd, "decay": …}}`` gives the model's 5 names and then the same 5 names
    again (10 parameters, each name twice), and ``{"model": sd, "optimizer": {"state_dict": opt_sd, …}}`` gives the
    optimizer's moments (``state.0.exp_avg``…) instead of the model, because ``state_dict`` comes first in the
    list. The torch.save reader, on the same dicts, reads the top-level ``model``.
    RIGHT: the model is the entry under the key met nearest the top (the top-level ``model`` here), its tensors
    only: the model's 5 names, once each."""
    model = _model()
    if layout == "an ema's own 'model' entry":
        state = {"model": model.state_dict(), "ema": {"model": _model().state_dict(), "decay": 0.999}}
    else:
        optimizer = {"state_dict": _stepped_adamw(model).state_dict(), "name": "adamw"}
        state = {"model": model.state_dict(), "optimizer": optimizer}
    torch.save(state, tmp_path / "same.pt")
    assert _names_and_shapes(bench.model_params(str(tmp_path / "same.pt"))) == NAMES_AND_SHAPES
    params = bench.model_params(_save(state, tmp_path / "ck"))
    assert _names_and_shapes(params) == NAMES_AND_SHAPES


@pytest.mark.parametrize("scalar", [pytest.param(torch.tensor(3), id="int-step"),
                                    pytest.param(torch.tensor(0.25), id="float-best-loss")])
def test_a_scalar_at_the_top_does_not_hide_the_only_state_dict(tmp_path, scalar):
    """WRONG: "else the tensors at the top" takes any tensor at the top, a 0-d counter or metric too: for
    ``{"net": model.state_dict(), "step": torch.tensor(3)}`` the only top tensor is the int64 step, so the bench
    says the checkpoint "holds no floating tensor to step"; with ``"best_loss": torch.tensor(0.25)`` it silently
    benches a "model" of one 0-d parameter named ``best_loss``. The torch.save reader, on the same dict, reads
    ``net`` (its only state dict).
    RIGHT: a counter or metric at the top does not make the top the model; the only entry holding the model's
    tensors (``net``) is read: its 5 parameters."""
    model = _model()
    state = {"net": model.state_dict(), "best_loss" if scalar.is_floating_point() else "step": scalar}
    torch.save(state, tmp_path / "same.pt")
    assert _names_and_shapes(bench.model_params(str(tmp_path / "same.pt"))) == NAMES_AND_SHAPES
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        params = bench.model_params(_save(state, tmp_path / "ck"))
    assert _names_and_shapes(params) == NAMES_AND_SHAPES
