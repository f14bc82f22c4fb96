"""``kronopt bench``: optimizer step time (mean and median), state bytes and the memory a step faults
in, kronopt against its peers.

The optimizers (presets, TOML files, and other libraries' optimizers named
``package.Class``: ``torch.AdamW``, ``torch.Muon``, ``pytorch_optimizer.SOAP``,
``heavyball.SOAP``, … see :mod:`kronopt.app.peers`; or any optimizer class importable
from ``PYTHONPATH``, named ``module:Class`` and built with its defaults) are stepped interleaved in one
process on the same gradients, round robin each step, so machine noise hits each
alike. ``--scaling 128,256,512`` adds a table of step time against the model width;
``--alone`` replays each kronopt optimizer's matrix work alone in the same rounds and gives
each step's mean over it. A peer that raises is dropped from the rest of its run and reported
as failed, with the exception and the step; kronopt's own optimizers raise through (a bug of ours).
``--world 1,2,4`` instead runs each world size as that many CPU processes on gloo
(:func:`bench_world`): replicated parameters and the same gradients on every rank,
as DDP leaves them, kronopt's work sharding dividing the optimizer's work.

The parameters are a transformer-shaped set (``--d``, ``--layers``), the user's shapes
(``--shapes``) or the user's own model (``--model module:factory``, :func:`model_params`:
its parameters' names, which kronopt's routing reads, shapes and dtypes; ``--dtype`` sets
every parameter's dtype), held as a :class:`ParamSet`; their values and gradients are drawn
at random.
"""

import argparse
import ast
import contextlib
import gc
import hashlib
import importlib
import importlib.util
import json
import math
import os
import pickle
import random

try:
    import resource  # Unix: the process's page faults
except ImportError:  # Windows
    resource = None  # type: ignore[assignment]
import re
import statistics
import sys
import tempfile
import time
import warnings
import weakref
from functools import partial
from pathlib import Path
from collections.abc import Callable, Iterator, Mapping, Sequence
from types import ModuleType
from typing import Any

import attrs
import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import kronopt
from kronopt import linalg, malloc

from . import _args, peers, stage_times
from ._args import Problems


class TransientMemory(TorchDispatchMode):
    """The most bytes of tensor memory made while the mode is on and alive at once (``peak``), on any device.

    Every tensor an operator returns whose storage is new (not an input's: a view or an in-place result
    counts nothing) is counted from its making until its storage is freed, however long that is: a
    step's temporaries and the new state it writes in, and what the step keeps (a first call's state);
    a counted storage that an operator grows (``resize_``, an ``out=`` resized) counts its growth, and a
    tensor made from Python data (``torch.tensor``, which reaches the mode as ``lift_fresh``) counts. A
    wrapper subclass (FSDP2's ``DTensor``) counts the tensors it wraps; meta tensors and sparse ones
    count nothing. What the allocator adds (rounding, a cache's fragments) is not seen; on a GPU,
    ``torch.cuda.max_memory_allocated`` gives that."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        #: each counted storage's bytes so far, in a cell its finalizer reads when it is freed
        self._sizes: weakref.WeakKeyDictionary[torch.UntypedStorage, list[int]] = weakref.WeakKeyDictionary()

    def _freed(self, cell: list[int]) -> None:
        self.live -= cell[0]

    def _add(self, nbytes: int) -> None:
        self.live += nbytes
        self.peak = max(self.peak, self.live)

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None) -> Any:
        kwargs = kwargs or {}
        given = [s for t in tree_flatten((args, kwargs))[0] for s in _storages(t)]
        # torch.tensor(data) makes its tensor before the dispatcher sees it, as lift_fresh's input: new all the same,
        # where torch.from_numpy's (and as_tensor's of an array) is the array's own memory, which cannot be resized
        lifted = func is torch.ops.aten.lift_fresh.default
        inputs = {s.data_ptr() for s in given if not (lifted and s.resizable())}
        out = func(*args, **kwargs)
        made = [s for t in tree_flatten(out)[0] for s in _storages(t)]
        for storage in given + made:
            cell = self._sizes.get(storage)
            if cell is not None and storage.nbytes() > cell[0]:  # grown in place
                self._add(storage.nbytes() - cell[0])
                cell[0] = storage.nbytes()
        for storage in made:
            nbytes = storage.nbytes()
            if not nbytes or storage.data_ptr() in inputs or storage in self._sizes:
                continue
            cell = [nbytes]
            self._sizes[storage] = cell
            self._add(nbytes)
            weakref.finalize(storage, self._freed, cell)
        return out


def _storages(t: Any) -> list[torch.UntypedStorage]:
    """The storages a tensor holds its numbers in: its own, or those of the tensors a wrapper subclass
    wraps (``__tensor_flatten__``); a storage passed as an operand itself; none for anything else, a
    meta or a sparse tensor."""
    if isinstance(t, torch.UntypedStorage):  # an operand of its own (Tensor.set_)
        return [t]
    if not isinstance(t, Tensor):
        return []
    if type(t) is not Tensor and hasattr(t, "__tensor_flatten__"):
        inner, _ = t.__tensor_flatten__()
        return [s for name in inner for s in _storages(getattr(t, name))]
    if t.is_meta or t.layout != torch.strided:
        return []
    try:
        return [t.untyped_storage()]
    except (RuntimeError, NotImplementedError):  # a subclass without a storage of its own
        return []


#: a transformer-shaped layer's parameters: each one's name and its shape in multiples of the width (none that a
#: preset routes by name: ``out`` is no ``output``)
_LAYER_PARTS: tuple[tuple[str, tuple[int, ...]], ...] = (
    ("attn.qkv.weight", (3, 1)), ("attn.out.weight", (1, 1)), ("mlp.up.weight", (4, 1)), ("mlp.down.weight", (1, 4)),
    ("norm1.weight", (1,)), ("norm2.weight", (1,)),
)


def transformer_shapes(d: int, layers: int) -> list[tuple[int, ...]]:
    """Per layer: qkv (3d, d), out (d, d), mlp up (4d, d), mlp down (d, 4d) and two gains (d,)."""
    return [tuple(k * d for k in multiples) for _, multiples in _LAYER_PARTS] * layers


def transformer_set(d: int, layers: int, dtype: torch.dtype | None = None) -> "ParamSet":
    """:func:`transformer_shapes` as a parameter set of ``dtype`` (float32 by default), each named by its layer,
    ``layers.<l>.attn.qkv.weight`` …, so that ``--groups layers`` puts each layer in a group."""
    shapes = transformer_shapes(d, layers)
    names = [f"layers.{k}.{part}" for k in range(layers) for part, _ in _LAYER_PARTS]
    return ParamSet(shapes, names, [dtype or torch.float32] * len(shapes))


#: ``--groups``: how a bench puts its parameters in param groups (:func:`param_groups`)
GROUPINGS: tuple[str, ...] = ("one", "decay", "layers")

#: ``--groups layers``: each numbered layer's learning rate over that of the layer numbered one above it
LAYER_DECAY = 0.9


@attrs.frozen
class ParamSet:
    """The parameters a bench steps: their shapes, the names kronopt's optimizers see them by (routing
    reads the names: an embedding or a head may go to the fallback) and their dtypes. Their values are
    drawn at random, as their gradients are, so only these three matter to the step.

    Attributes:
        shapes: one shape per parameter.
        names: one name per parameter, as ``model.named_parameters()`` gives them.
        dtypes: one floating dtype per parameter.
        source: where the set came from, for the report (``None``: shapes given as such).
        grouping: how the optimizers put the parameters in param groups, one of :data:`GROUPINGS`
            (:func:`param_groups`; ``--groups``).
    """

    shapes: tuple[tuple[int, ...], ...] = attrs.field(converter=lambda shapes: tuple(tuple(s) for s in shapes))
    names: tuple[str, ...] = attrs.field(converter=tuple)
    dtypes: tuple[torch.dtype, ...] = attrs.field(converter=tuple)
    source: str | None = None
    grouping: str = attrs.field(default="one", validator=attrs.validators.in_(GROUPINGS))

    def __attrs_post_init__(self) -> None:
        if not len(self.shapes) == len(self.names) == len(self.dtypes):
            raise ValueError(
                f"a parameter set needs one name and one dtype per shape, got {len(self.shapes)} shapes, "
                f"{len(self.names)} names and {len(self.dtypes)} dtypes"
            )

    @classmethod
    def of(cls, shapes: "Sequence[tuple[int, ...]] | ParamSet", dtype: torch.dtype | None = None) -> "ParamSet":
        """``shapes`` as a set of ``dtype`` parameters (float32 by default) named ``blocks.<i>.weight``; a set as it
        is, or with every parameter in ``dtype`` where one is given."""
        if isinstance(shapes, ParamSet):
            return shapes if dtype is None else attrs.evolve(shapes, dtypes=[dtype] * len(shapes.shapes))
        shapes = [tuple(s) for s in shapes]
        return cls(shapes, [f"blocks.{i}.weight" for i in range(len(shapes))], [dtype or torch.float32] * len(shapes))

    @property
    def numel(self) -> int:
        return sum(math.prod(s) for s in self.shapes)  # in Python's integers: a shape past int64 is refused, not wrapped

    def draw(self, gen: torch.Generator) -> list[Tensor]:
        """One tensor per parameter from ``gen``, standard normal, in its shape and dtype (on the CPU)."""
        return [torch.randn(s, generator=gen, dtype=d) for s, d in zip(self.shapes, self.dtypes)]


def _layer(name: str) -> int | None:
    """The layer a parameter's name places it in: its first dotted part that is a number, else ``None``."""
    return next((int(part) for part in name.split(".") if part.isdecimal()), None)  # (isdigit takes "²", int() not)


def param_groups(params: ParamSet) -> list[tuple[list[int], dict[str, float]]]:
    """The param groups ``params.grouping`` makes: each group's parameters (positions in the set) and its rates,
    ``lr_scale`` (a factor on the optimizer's own learning rate) and ``weight_decay``, which every optimizer of a bench,
    kronopt's and the peers', takes once built (:func:`_set_rates`), over the rates its constructor gave it.

    * ``"one"``: every parameter in one group (the default).
    * ``"decay"``: the split language-model training scripts make: the parameters of two or more dimensions keep the
      optimizer's weight decay, the others (gains, biases) take none.
    * ``"layers"``: a group per layer, read from the name: its first dotted part that is a number
      (``model.layers.7.mlp.up_proj.weight``: 7), the parameters whose names hold none (an embedding, a final norm, a
      head) in one group; each numbered layer's learning rate is :data:`LAYER_DECAY` times that of the layer numbered
      one above it, the top layer's and the unnumbered group's the optimizer's own (layer-wise learning-rate decay,
      as fine-tuning uses it). The transformer-shaped set names its parameters by layer (:func:`transformer_set`);
      ``--shapes`` names each ``blocks.<i>.weight``: a learning rate per parameter there.

    Groups come in the order of their first parameter; none is empty. A rate's value changes no step's work (a
    weight decay of 0 may: torch's AdamW then skips it, as kronopt's write does)."""
    n = len(params.shapes)
    if params.grouping == "decay":
        decayed = [i for i, s in enumerate(params.shapes) if len(s) >= 2]
        flat = [i for i, s in enumerate(params.shapes) if len(s) < 2]
        return [(g, rates) for g, rates in ((decayed, {}), (flat, {"weight_decay": 0.0})) if g]
    if params.grouping == "layers":
        layers = [_layer(name) for name in params.names]
        top = max((layer for layer in layers if layer is not None), default=0)
        order: dict[int | None, list[int]] = {}
        for i, layer in enumerate(layers):
            order.setdefault(layer, []).append(i)
        return [(g, {} if layer is None else {"lr_scale": LAYER_DECAY ** (top - layer)}) for layer, g in order.items()]
    return [(list(range(n)), {})]


#: ``path/to/nets.py:factory`` and its arguments, if any
_IN_FILE = re.compile(r"^(?P<path>.+\.py):(?P<attr>[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*)\s*(?P<args>\(.*)?$", re.DOTALL)


#: a Hugging Face Hub model's id, ``name`` or ``org/name``, and a revision after ``@`` (a branch, a tag, a commit)
_HUB_ID = re.compile(
    r"(?P<repo>(?:[A-Za-z0-9_][A-Za-z0-9_.-]*/)?[A-Za-z0-9_][A-Za-z0-9_.-]*)"
    r"(?:@(?P<revision>[A-Za-z0-9_.-]+(?:/[A-Za-z0-9_.-]+)*))?"
)


#: a commit's hash, the name of a snapshot in the Hugging Face cache (and all a ref file may hold)
_COMMIT = re.compile(r"[0-9a-f]{40}")


def _hub_cache() -> Path:
    """The Hugging Face Hub's cache folder, found as ``huggingface_hub`` finds it: ``HF_HUB_CACHE`` (or its old
    name ``HUGGINGFACE_HUB_CACHE``), else ``HF_HOME/hub``, else ``$XDG_CACHE_HOME/huggingface/hub``, else
    ``~/.cache/huggingface/hub``."""
    def expanded(path: str) -> str:  # "~user" and "$VAR" as huggingface_hub expands them (an unknown user: as it is)
        return os.path.expandvars(os.path.expanduser(path))

    cache = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    if cache:
        return Path(expanded(cache))
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME") or "~/.cache", "huggingface")
    return Path(expanded(home)) / "hub"


def _hub_snapshot(spec: str) -> Path | None:
    """The folder the Hugging Face cache holds of the Hub model ``spec`` (``org/name`` or ``name``, and
    ``@revision``: default ``main``), read offline: nothing is downloaded; ``None`` where ``spec`` is no such id.
    Its files are the checkpoint's and config's that were downloaded (a config alone will do).

    Raises:
        ValueError: ``spec`` is such an id, but the cache holds no snapshot of that revision.
    """
    hub_id = _HUB_ID.fullmatch(spec)
    if hub_id is None or ".." in spec or "--" in hub_id["repo"]:
        return None
    repo, revision = hub_id["repo"], hub_id["revision"] or "main"
    folder = _hub_cache() / f"models--{repo.replace('/', '--')}"
    ref = folder / "refs" / revision  # a branch's or tag's commit; a commit names its snapshot itself
    try:
        commit = ref.read_text().strip() if ref.is_file() else revision
        if _COMMIT.fullmatch(commit) and (folder / "snapshots" / commit).is_dir():
            return folder / "snapshots" / commit
    except (OSError, ValueError):  # an unreadable ref, a name the file system refuses
        pass
    at = f" --revision {revision}" if hub_id["revision"] else ""
    raise ValueError(
        f"{spec!r} is no file or folder here, no module:factory (a callable making a torch.nn.Module, e.g. "
        f"mypkg.nets:build), and no Hugging Face model in the cache (no snapshot of revision {revision!r} under "
        f"{str(folder)!r}): the bench downloads nothing; download its config.json (or its weights) first, e.g. "
        f"hf download {repo} config.json{at}"
    )


def _factory_call(spec: str) -> tuple[str, list[Any], dict[str, Any]]:
    """``module:factory`` and the arguments of ``module:factory(arg, …, key=value, …)`` (Python literals)."""
    in_file = _IN_FILE.match(spec)
    if in_file and "(" in in_file["path"] and not Path(in_file["path"]).is_file():
        in_file = None  # "x.py:" inside an argument's string, not a path
    if in_file:  # a path may hold "(" and ":" itself: the factory is what follows its last ".py:"
        name, paren, rest = f"{in_file['path']}:{in_file['attr']}", in_file["args"] or "", (in_file["args"] or "")[1:]
    else:
        name, paren, rest = spec.partition("(")
        name = name.strip()
    if not (in_file or peers.is_import_name(name)):
        raise ValueError(
            f"{spec!r} is not module:factory (a callable making a torch.nn.Module, e.g. mypkg.nets:build, "
            "path/to/nets.py:build, or mypkg.nets:Net(width=256) with Python literals as its arguments)"
        )
    if not paren:
        return name, [], {}
    try:
        call = ast.parse(f"f({rest}", mode="eval").body
        # one call of the factory itself: not a call of what it returns (f(3)(4)), nor of its attribute
        if not (isinstance(call, ast.Call) and isinstance(call.func, ast.Name) and call.func.id == "f"):
            raise SyntaxError("not one call")
        args = [ast.literal_eval(a) for a in call.args]
        keys = [k.arg for k in call.keywords]
        if None in keys or len(set(keys)) != len(keys):  # **mapping, or a keyword given twice
            raise ValueError("keywords")
        kwargs = {k.arg: ast.literal_eval(k.value) for k in call.keywords}
    except (SyntaxError, ValueError, TypeError):
        raise ValueError(
            f"the arguments of {spec!r} are not Python literals given as (arg, …, key=value, …), e.g. "
            "mypkg.nets:Net(width=256, heads=4)"
        ) from None
    return name, args, kwargs  # type: ignore[return-value]


def _module_file(path: Path) -> ModuleType:
    """The Python file ``path`` run as a module of its own, as ``python path`` would run it: its folder first on
    ``sys.path`` (so its own imports find the files beside it), the module entered in ``sys.modules`` under a
    name of its own path (so what it defines can be found by name, as an imported module's can)."""
    if not path.is_file():
        raise FileNotFoundError(f"no file {str(path)!r}")
    path = path.resolve()
    digest = hashlib.sha1(str(path).encode()).hexdigest()[:12]
    name = f"kronopt_bench_model_{digest}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"{str(path)!r} is not a Python module")
    if str(path.parent) not in sys.path:
        sys.path.insert(0, str(path.parent))
    module = importlib.util.module_from_spec(spec)
    before = sys.modules.get(name)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        if before is None:
            del sys.modules[name]
        else:
            sys.modules[name] = before
        raise
    return module


#: the parameter dtypes a bench draws values and gradients in
_DRAWN: tuple[torch.dtype, ...] = (torch.float32, torch.bfloat16, torch.float16, torch.float64)

#: the checkpoint files ``--model`` reads the parameters of, by their names' endings (in any case): safetensors,
#: an index of shards (``model.safetensors.index.json``, ``pytorch_model.bin.index.json``), torch.save'd files
_CHECKPOINTS: tuple[str, ...] = (".safetensors", ".index.json", ".pt", ".pth", ".bin", ".ckpt")

#: in a folder, the files a checkpoint of the Hugging Face layout is read from, first found first (the order
#: ``transformers`` loads them in)
_FOLDER_NAMES: tuple[str, ...] = (
    "model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json",
)

#: the files a trainer leaves beside a model's weights (its pickled arguments, the optimizer's and scheduler's
#: states, the random generators'), which are never the model's tensors
_TRAINER_FILES = re.compile(
    r"(training_args|optimizer|scheduler|scaler|rng_state.*|random_states.*)\.(bin|pt|pth)", re.IGNORECASE
)

#: the keys a torch.save'd training checkpoint keeps its model's state dict under, first found first (Lightning's
#: ``.ckpt``: ``state_dict``; many training scripts: ``model``)
_STATE_DICT_KEYS: tuple[str, ...] = ("state_dict", "model", "model_state_dict", "module")

#: safetensors' names of the floating dtypes a bench draws
_SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64,
}

#: the floating buffers a checkpoint's tensor names give away: torch's batch and instance norms keep their running
#: statistics under these names
_NORM_STATISTICS = re.compile(r"(^|\.)running_(mean|var)$")

#: ``(name, shape, dtype)`` of a checkpoint's tensor; dtype ``None``: one the bench does not draw
_Entry = tuple[str, tuple[int, ...], torch.dtype | None]


def _is_checkpoint(name: str) -> bool:
    return name.lower().endswith(_CHECKPOINTS)


def _safetensors_header(path: Path) -> dict[str, Any]:
    """The JSON header of a safetensors file (its first 8 bytes, little-endian, give its length); no tensor is read."""
    with path.open("rb") as f:
        size = int.from_bytes(f.read(8), "little")
        if not 2 <= size <= 100 * 2**20:
            raise ValueError(f"{str(path)!r} is not a safetensors file (a header of {size} bytes)")
        header = json.loads(f.read(size))
    if not isinstance(header, dict):
        raise ValueError(f"{str(path)!r} is not a safetensors file (its header is not a table)")
    return {k: v for k, v in header.items() if k != "__metadata__"}


def _checked_shape(name: str, shape: Any, kind: type) -> tuple[int, ...]:
    """``shape``, a ``kind`` (a safetensors header's list, a DCP record's tuple) of sizes, as a tuple.

    Raises:
        ValueError: it is not one, or a size is negative or past int64 (naming the tensor).
    """
    if type(shape) is not kind or not all(type(x) is int and 0 <= x < 2**63 for x in shape):
        raise ValueError(f"tensor {name!r} has shape {shape!r}, not a list of sizes")
    return tuple(shape)


def _safetensors_entries(path: Path) -> list[_Entry]:
    """The tensors a safetensors file's header names (a safetensors file holds no two names of one tensor)."""
    return [
        (name, _checked_shape(name, entry["shape"], list), _SAFETENSORS_DTYPES.get(entry["dtype"]))
        for name, entry in _safetensors_header(path).items()
    ]


def _exists(spec: str, test: Callable[[Path], bool] = Path.exists) -> bool:
    """``test`` of ``spec`` as a path; ``False`` where it is no path at all (a factory's spec: a part too long, a
    NUL)."""
    try:
        return test(Path(spec))
    except (OSError, ValueError):
        return False


def _is_folder(spec: str) -> bool:
    return _exists(spec, Path.is_dir)


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, dict) and all(isinstance(k, str) and isinstance(v, Tensor) for k, v in obj.items())


def _torch_entries(path: Path) -> tuple[list[_Entry], str, list[str]]:
    """The tensors of a ``torch.save``d state dict, or of the one a training checkpoint holds under one of
    :data:`_STATE_DICT_KEYS`, a tied weight once (by its first name), where in the file they were found
    (``""``: the file itself), and the tied names dropped."""
    # mapped, not read; a file of torch.save's old format cannot be mapped, and is read. The zip format is told by
    # its first bytes, a zip entry's header (zipfile.is_zipfile looks for an end record near the end, which an old
    # format file's tensor bytes may hold)
    with path.open("rb") as f:
        zipped = f.read(4) == b"PK\x03\x04"
    saved = _args.load_torch_file(path, mmap=zipped)
    where = ""
    if not _is_state_dict(saved) and isinstance(saved, dict):
        key = next((k for k in _STATE_DICT_KEYS if _is_state_dict(saved.get(k)) and saved[k]), None)
        if key is None:  # a dict holding one state dict under a key of its own
            nested = [k for k, v in saved.items() if _is_state_dict(v) and v]
            key = nested[0] if len(nested) == 1 else None
            if len(nested) > 1:
                raise ValueError(
                    f"it holds several state dicts, under {', '.join(map(repr, nested))}; save the one to bench alone"
                )
        if key is not None:
            saved, where = saved[key], f"its {key!r} entry"
    if not _is_state_dict(saved):
        raise ValueError("not a mapping of names to tensors (a state_dict()), nor a checkpoint holding one")
    seen: set[tuple[Any, ...]] = set()
    entries: list[_Entry] = []
    tied: list[str] = []
    for n, t in saved.items():  # a tied weight (a head sharing the embedding's) is saved under both names
        # one storage's memory, read by its address: a meta tensor's (saved from a model made on the meta
        # device, or without its data) is 0 for every tensor, and says nothing
        address = t.untyped_storage().data_ptr() if t.layout == torch.strided and not t.is_meta and t.numel() else 0
        if address:
            key = (address, t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)
            if key in seen:
                tied.append(n)
                continue
            seen.add(key)
        entries.append((n, tuple(t.shape), t.dtype if t.dtype in _DRAWN else None))
    return entries, where, tied


#: the record classes a ``torch.distributed.checkpoint`` metadata file names, by module (older torch kept the
#: tensor properties among the sharded tensor's), read as plain records
_DCP_RECORDS: dict[str, frozenset[str]] = {
    "torch.distributed.checkpoint.metadata": frozenset({
        "Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata", "TensorProperties",
        "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING",
    }),
    "torch.distributed._shard.sharded_tensor.metadata": frozenset({"TensorProperties", "MEM_FORMAT_ENCODING"}),
    "torch.distributed.checkpoint.filesystem": frozenset({"_StorageInfo"}),
}

#: the path classes a metadata file may name (a save's folder), by module (``pathlib._local`` from Python 3.13 on)
_DCP_PATHS: dict[str, frozenset[str]] = {
    module: frozenset({"Path", "PosixPath", "WindowsPath", "PurePath", "PurePosixPath", "PureWindowsPath"})
    for module in ("pathlib", "pathlib._local")
}

#: torch's dtypes by the names a pickle gives them
_DTYPES_BY_NAME: dict[str, torch.dtype] = {
    name: dtype for name in dir(torch) if isinstance(dtype := torch.__dict__.get(name), torch.dtype)
}


class _Record:
    """A stand-in for one of DCP's record classes: it takes whatever the pickle gives it and holds it, nothing
    more (a class of its own per file, so that a pickle setting attributes on a class sets them on this one)."""

    def __init__(self, *args: Any) -> None:
        self.args = args

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple) and len(state) == 2 and all(isinstance(x, dict | None) for x in state):
            state = {**(state[0] or {}), **(state[1] or {})}  # (dict, slots) of a class with __slots__
        if isinstance(state, dict):
            self.__dict__.update({k: v for k, v in state.items() if isinstance(k, str)})
        else:
            self.state = state


class _DcpMetadataUnpickler(pickle.Unpickler):
    """Reads a ``.metadata`` file of ``torch.distributed.checkpoint`` (a pickle) without making anything of torch's
    or DCP's: its records become :class:`_Record` stand-ins, sizes tuples, dtypes their names, paths strings, and
    any other name is refused. DCP's own reader unpickles whatever the file names, and hands the pickle the very
    classes it could then change."""

    def __init__(self, file: Any) -> None:
        super().__init__(file)
        self._classes: dict[str, type] = {}

    def find_class(self, module: str, name: str) -> Any:
        if name in _DCP_RECORDS.get(module, ()):
            return self._classes.setdefault(name, type(name, (_Record,), {}))
        if name in _DCP_PATHS.get(module, ()):
            return lambda *parts: "/".join(map(str, parts))
        if module == "torch" and name == "Size":
            return lambda sizes=(): tuple(sizes)
        if module == "torch" and name in _DTYPES_BY_NAME:
            return _DtypeName(name)
        if module == "torch.serialization" and name == "_get_layout":
            return lambda layout: str(layout)
        if module == "collections" and name == "OrderedDict":
            return lambda *items: dict(*items)
        raise pickle.UnpicklingError(f"it names {module}.{name}, which a checkpoint's metadata does not hold")


class _DtypeName(str):
    """A dtype's name where the pickle names a dtype (a ``str``: a pickle cannot change it)."""

    __slots__ = ()


#: the metadata file each rank of a ``torch.distributed.checkpoint`` save writes of its own under
#: ``use_collectives=False`` (``__0.metadata``, ``__1.metadata``, …), where a coordinated save writes one
#: ``.metadata``
_RANK_METADATA = re.compile(r"__(0|[1-9][0-9]*)\.metadata")


#: what reading a checkpoint file that is not one may raise (a cut or overlong pickle: EOFError, OverflowError,
#: MemoryError)
_UNREADABLE = (
    OSError, KeyError, TypeError, ValueError, AttributeError, RuntimeError, pickle.UnpicklingError, EOFError,
    OverflowError, MemoryError,
)


def _unreadable(exc: BaseException) -> str:
    """Why a file could not be read, from what reading it raised (:data:`_UNREADABLE`)."""
    return str(exc) if isinstance(exc, ValueError) else f"{type(exc).__name__}: {exc}"


def _is_dcp_metadata(name: str) -> bool:
    """Whether a file's ``name`` (in any case) is a DCP metadata file's, global or a rank's."""
    return name.lower() == ".metadata" or _RANK_METADATA.fullmatch(name.lower()) is not None


def _is_metadata_or_config(name: str) -> bool:
    return name == "config.json" or _is_dcp_metadata(name)


def _rank_metadata_files(folder: Path) -> list[Path]:
    """The rank-local metadata files of a DCP folder (:data:`_RANK_METADATA`, as torch names them), by rank."""
    ranks = {int(m[1]): f for f in folder.iterdir() if (m := _RANK_METADATA.fullmatch(f.name)) and f.is_file()}
    return [ranks[r] for r in sorted(ranks)]


def _dcp_files(path: Path) -> list[Path]:
    """The metadata files read for the DCP metadata file ``path``: a ``.metadata`` alone, a rank's with every
    rank's of its folder (a rank file named in another case than torch's: alone)."""
    if path.name.lower() == ".metadata":
        return [path]
    ranks = _rank_metadata_files(path.parent)
    return ranks if path.name in {f.name for f in ranks} else [path]


def _dcp_tensors(path: Path) -> dict[Any, tuple[tuple[str, ...], tuple[int, ...], torch.dtype | None]]:
    """The tensors one DCP metadata file records: by key, their path in the saved dict (a key without a path is a
    path of one), size and dtype (``None``: one torch does not name)."""
    with path.open("rb") as f:
        metadata = _DcpMetadataUnpickler(f).load()
    if type(metadata).__name__ != "Metadata" or not isinstance(getattr(metadata, "state_dict_metadata", None), dict):
        raise ValueError("not the metadata of a torch.distributed.checkpoint")
    planner = getattr(metadata, "planner_data", None)
    paths = planner if isinstance(planner, dict) else {}
    found = {}
    for key, meta in metadata.state_dict_metadata.items():
        if type(meta).__name__ == "TensorStorageMetadata":
            at = paths.get(key)
            at = tuple(map(str, at)) if isinstance(at, tuple) and at else (str(key),)
            properties = getattr(meta, "properties", None)  # its state a tuple, the dtype first (or a table)
            dtype = getattr(properties, "dtype", None) or (getattr(properties, "state", None) or (None,))[0]
            dtype = _DTYPES_BY_NAME.get(dtype) if isinstance(dtype, _DtypeName) else None
            found[key] = (at, _checked_shape(str(key), getattr(meta, "size", None), tuple), dtype)
    return found


def _dcp_entries(path: Path) -> tuple[list[_Entry], str]:
    """The tensors a ``torch.distributed.checkpoint`` folder holds, by its metadata alone (no shard is opened; a
    tensor saved in parts by several ranks has its whole size there), and where they were found: the model's
    state dict under the first of :data:`_STATE_DICT_KEYS` at the top of the saved dict (``{"model": …, "optim":
    …}``), else at the shallowest depth one is met (an app state's ``{"app": {"model": …}}``), else the tensors at
    the top that are not all 0-d (a ``model.state_dict()`` saved as such, or beside an optimizer's nested state),
    else those of its only entry. The metadata is the folder's ``.metadata``, or, for a save without rank
    coordination (``use_collectives=False``: no ``.metadata``, one ``__<rank>.metadata`` a rank), every rank's,
    their tensors merged (a rank's file records the tensors that rank saved). Nothing ties one save's rank files
    together, so a folder that a save of fewer ranks reused still holds, and gives, the older ranks' files (the
    source line says how many ranks' files were read).

    Raises:
        ValueError: a metadata file is not one (naming a rank's), or two ranks' files give a tensor the bench
            reads different sizes or dtypes.
    """
    files = _dcp_files(path)
    tensors: dict[Any, tuple[tuple[str, ...], tuple[int, ...], torch.dtype | None]] = {}
    disagree: dict[tuple[str, ...], str] = {}  # by path: two ranks' records of a tensor, said
    for file in files:
        try:
            records = _dcp_tensors(file)
        except _UNREADABLE as exc:
            if file == path:
                raise
            raise ValueError(f"its rank file {file.name} cannot be read ({_unreadable(exc)})") from None
        for key, (at, size, dtype) in records.items():
            first = tensors.setdefault(key, (at, size, dtype))
            if first[1:] != (size, dtype) and first[0] not in disagree:
                disagree[first[0]] = (
                    f"its ranks' metadata files disagree on the tensor {str(key)!r} ({size}, {dtype} in {file.name}; "
                    f"{first[1]}, {first[2]} in an earlier one)"
                )
    found = list(tensors.values())
    where, prefix = "", ()  # the entry read, and its path in the saved dict
    for depth in range(max((len(at) for at, _, _ in found), default=1) - 1):
        met = {at[depth] for at, _, _ in found if len(at) > depth + 1}
        chosen = next((w for w in _STATE_DICT_KEYS if w in met), None)
        if chosen is None:
            continue
        under = [
            (at[: depth + 1], at[depth + 1:], s, d) for at, s, d in found if len(at) > depth + 1 and at[depth] == chosen
        ]
        prefixes = sorted({".".join(prefix) for prefix, _, _, _ in under})
        if len(prefixes) > 1:
            raise ValueError(
                f"it holds several state dicts, under {', '.join(map(repr, prefixes))}; save the one to bench alone"
            )
        found, where, prefix = [(rest, s, d) for _, rest, s, d in under], f"its {prefixes[0]!r} entry", under[0][0]
        break
    else:
        top = [t for t in found if len(t[0]) == 1]
        groups = sorted({at[0] for at, _, _ in found if len(at) > 1})
        if groups and not any(size for _, size, _ in top):  # only scalars (a step, a loss) at the top
            if len(groups) > 1:
                raise ValueError(
                    f"it holds several entries ({', '.join(map(repr, groups))}) and no model's state dict at its top: "
                    "save the model's state dict under 'model', or alone"
                )
            found, where = [(at[1:], s, d) for at, s, d in found if len(at) > 1], f"its {groups[0]!r} entry"
            prefix = (groups[0],)
        else:
            found = top
    # ranks that disagree on a tensor read here (one of the entry's floating tensors) make the save unreadable;
    # elsewhere (a loader's order, a rank's own metrics) each rank reads its own file, as DCP's load does
    said = next((disagree[prefix + at] for at, _, d in found if d in _DRAWN and prefix + at in disagree), None)
    if said is not None:
        raise ValueError(said)
    return [(".".join(at), size, dtype if dtype in _DRAWN else None) for at, size, dtype in found], where


def _file_entries(path: Path) -> tuple[list[_Entry], str, int]:
    """The tensors of a checkpoint file, where in it they were found (``""``: the file itself), and how many
    tied names (a weight ``torch.save`` kept under two) were dropped."""
    name = path.name.lower()
    if _is_dcp_metadata(name):
        return *_dcp_entries(path), 0
    if name.endswith(".index.json"):
        shards = json.loads(path.read_bytes()).get("weight_map")
        if not isinstance(shards, dict) or not all(isinstance(v, str) for v in shards.values()):
            raise ValueError("its weight_map is not a table of tensor names to shard files")
        for shard in dict.fromkeys(shards.values()):
            if shard.lower().endswith(".index.json") or not _is_checkpoint(shard):
                raise ValueError(f"its shard {shard!r} is not a safetensors or torch.save'd file")
        if missing := _missing_shards(path):
            raise ValueError(
                f"its shards {_listed(missing)} are not beside it: download them, or give the model's config.json"
            )
        entries: list[_Entry] = []
        tied = 0
        for shard in dict.fromkeys(shards.values()):  # each tensor from the shard the index names for it
            if shard.lower().endswith(".safetensors"):
                found, dropped = _safetensors_entries(path.parent / shard), []
            else:
                found, _, dropped = _torch_entries(path.parent / shard)
            entries += [e for e in found if shards.get(e[0]) == shard]
            tied += sum(shards.get(n) == shard for n in dropped)
        return entries, "", tied
    if name.endswith(".safetensors"):
        return _safetensors_entries(path), "", 0
    entries, where, dropped = _torch_entries(path)
    return entries, where, len(dropped)


#: one part of a sharded checkpoint of several (``model-00001-of-00004.safetensors``), which holds some of the
#: model's tensors and is read through its index (the one part of a checkpoint of one is the whole)
_SHARD = re.compile(r".*-[0-9]{5}-of-(?P<parts>[0-9]{5})\.[^.]+", re.IGNORECASE)


def _is_part(name: str) -> bool:
    return (part := _SHARD.fullmatch(name)) is not None and int(part["parts"]) > 1


def _missing_shards(index: Path) -> list[str]:
    """The shard files an index of shards names that are not beside it (none where the index cannot be read as
    one: reading it then says why)."""
    try:
        shards = json.loads(index.read_bytes()).get("weight_map")
        if not isinstance(shards, dict):
            return []
        return sorted({s for s in shards.values() if isinstance(s, str) and not (index.parent / s).is_file()})
    except (OSError, ValueError, AttributeError):  # not JSON, not a table, a name the file system refuses
        return []


def _listed(names: Sequence[str]) -> str:
    return f"{', '.join(names[:3])}{', …' if len(names) > 3 else ''}"


def _folder_checkpoint(folder: Path) -> Path:
    """The checkpoint file a folder holds: the first of :data:`_FOLDER_NAMES` present (a Hugging Face model's or
    trainer's folder), else a ``torch.distributed.checkpoint``'s ``.metadata`` (Lightning's keeps a ``meta.pt``
    beside it), else its lowest rank's ``__<rank>.metadata`` (a save without rank coordination;
    :func:`_dcp_entries` reads every rank's), else its only index of shards, else its only safetensors file,
    else its only torch.save'd file, parts of a sharded checkpoint (:data:`_SHARD`) aside; with none of these,
    its ``config.json`` (:func:`config_params`). An index whose shards are not all there (a download of the
    JSON files, or one cut short) is passed over, as if absent.

    Raises:
        ValueError: the folder holds no checkpoint file nor config (naming an index without its shards, shards
            without their index, or subfolders holding a DCP checkpoint, where it holds those), or several
            files of one kind and none of those names.
    """
    config = folder / "config.json"
    files = sorted(
        f.name for f in folder.iterdir()
        if f.is_file() and _is_checkpoint(f.name) and not _TRAINER_FILES.fullmatch(f.name)
    )
    incomplete = {name: missing for name in files if name.lower().endswith(".index.json") and (
        missing := _missing_shards(folder / name)
    )}
    files = [name for name in files if name not in incomplete]
    for name in _FOLDER_NAMES:
        if name in files:
            return folder / name
    if (folder / ".metadata").is_file():  # a torch.distributed.checkpoint (Lightning's keeps a meta.pt beside it)
        return folder / ".metadata"
    if ranks := _rank_metadata_files(folder):  # one saved without rank coordination: a metadata file a rank
        return ranks[0]
    parts = [f for f in files if _is_part(f)]
    files = [f for f in files if f not in parts]
    kinds = (
        [f for f in files if f.lower().endswith(".index.json")], [f for f in files if f.lower().endswith(".safetensors")]
    )
    for kind in (*kinds, [f for f in files if not any(f in k for k in kinds)]):
        if len(kind) == 1:
            return folder / kind[0]
        if kind:
            raise ValueError(
                f"the folder {str(folder)!r} holds several checkpoint files ({', '.join(kind)}): name the one to read"
            )
    if config.is_file():  # a model's folder without its weights, or with some of them
        return config
    held = "no checkpoint file (one named *" + ", *".join(_CHECKPOINTS) + ")"
    if incomplete:
        name, missing = next(iter(incomplete.items()))
        held = f"the index {name} without its shards ({_listed(missing)})"
    elif parts:
        held = f"parts of a sharded checkpoint ({_listed(parts)}) without their index"
    dcp = sorted(f.name for f in folder.iterdir() if f.is_dir() and (
        (f / ".metadata").is_file() or _rank_metadata_files(f)
    ))
    within = f"; its subfolders {_listed(dcp)} hold a torch.distributed.checkpoint: give one of them" if dcp else ""
    raise ValueError(f"the folder {str(folder)!r} holds {held} and no Hugging Face config.json{within}")


def checkpoint_params(path: Path) -> ParamSet:
    """The parameters a checkpoint holds, by name, shape and dtype, without reading their values: a
    ``.safetensors`` file (its header only), an index of shards (``model.safetensors.index.json``,
    ``pytorch_model.bin.index.json``: each tensor from the shard it names), a ``torch.save``d state dict (``.pt``,
    ``.pth``, ``.bin``: memory-mapped, not read; a file of ``torch.save``'s old format cannot be mapped, and is
    read) or a training checkpoint holding one (Lightning's ``.ckpt`` under ``state_dict``, a script's under
    ``model``, …), a ``torch.distributed.checkpoint`` folder (its ``.metadata``, or every rank's
    ``__<rank>.metadata`` of a save without rank coordination, :func:`_dcp_entries`), or a folder
    holding one of these (:func:`_folder_checkpoint`). A name's ending is matched in
    any case. Tensors of a dtype the bench does not draw (integer buffers, float8) are left out, and so are empty
    ones, and a batch or instance norm's running statistics (:data:`_NORM_STATISTICS`); a checkpoint keeps no
    note of which tensors were trainable, so any other floating buffer counts as a parameter.

    Raises:
        ValueError: the file is missing or is not such a checkpoint, or holds no floating tensor.
    """
    try:
        if path.is_dir():
            path = _folder_checkpoint(path)
    except OSError as exc:
        raise ValueError(f"the folder {str(path)!r} cannot be read ({type(exc).__name__}: {exc})") from None
    if not path.is_file():
        raise ValueError(f"no checkpoint file {str(path)!r}")
    if path.name == "config.json":
        return config_params(path)
    try:
        entries, where, tied = _file_entries(path)
    except _UNREADABLE as exc:
        raise ValueError(f"{str(path)!r} cannot be read as a checkpoint ({_unreadable(exc)})") from None
    norms = [n for n, _, d in entries if d is not None and _NORM_STATISTICS.search(n)]
    kept = [(n, s, d) for n, s, d in entries if d is not None and all(s) and not _NORM_STATISTICS.search(n)]
    if not kept:  # all(()): a 0-d scale is kept
        raise ValueError(f"the checkpoint {str(path)!r} holds no floating tensor to step")
    left_out = len(entries) - len(kept) - len(norms)
    notes = [
        where,
        f"{tied} tied tensors counted once" if tied else "",
        f"{len(norms)} norm statistics left out" if norms else "",
        f"{left_out} other tensors left out" if left_out else "",
    ]
    label = path.name  # a DCP folder's metadata by its folder; a save's rank-local files are read together
    if _is_dcp_metadata(path.name):
        folder = path.absolute().parent.name  # "": a name of one part, in the folder it was run in
        label = f"{folder}/{path.name}"
        if _RANK_METADATA.fullmatch(path.name) and (n := len(_dcp_files(path))):
            label = f"{folder}/__*.metadata of {n} rank{'s' if n > 1 else ''}"
    source = ", ".join(filter(None, [f"checkpoint {label}", *notes]))
    return ParamSet([s for _, s, _ in kept], [n for n, _, _ in kept], [d for _, _, d in kept], source=source)


def model_params(spec: str) -> ParamSet:
    """The trainable parameters of the model ``module:factory`` or ``module:factory(arg, …, key=value, …)`` (a
    callable, e.g. a module class, returning a ``torch.nn.Module``, called with those arguments, Python literals;
    its module importable from ``PYTHONPATH``, or a Python file named ``path/to/nets.py``): their names
    (``named_parameters()``, a tied weight once, an empty one left out), shapes and dtypes. The model is made on
    the meta device, which holds no memory (a model of billions of numbers costs nothing to read), and made for
    real only where its factory cannot run there (it reads a value, say).

    ``spec`` may instead be a checkpoint (:func:`checkpoint_params`): a ``.safetensors`` file, an index of shards
    (``*.safetensors.index.json``, ``*.bin.index.json``), a ``torch.save``d state dict or training checkpoint
    (``.pt``, ``.pth``, ``.bin``, ``.ckpt``), a ``torch.distributed.checkpoint``'s ``.metadata`` or a rank's
    ``__<rank>.metadata`` (the folder's save read), a folder holding one, or a Hugging Face ``config.json`` (or a folder
    holding one and no weights), whose model ``transformers`` makes (:func:`config_params`); or a Hugging Face
    Hub model's id, ``org/name`` or ``name`` with an optional ``@revision``, whose snapshot in the local cache is
    such a folder (:func:`_hub_snapshot`; nothing is downloaded). A path may start with ``~`` (the home folder). A
    spec that is none of these, nor written as a path, is a factory's.

    Raises:
        ValueError: ``spec`` is not spelled so, names a file or folder that is missing or a file of another
            kind, does not import, is not callable, does not make a module, or the module has no trainable
            parameter, one of a lazy module (no shape yet) or one of another dtype than float32, bfloat16,
            float16 and float64 (the message says which).
    """
    local = os.path.expanduser(spec)  # "~/models/x": a shell leaves the tilde of --model=~/… or of a quoted path
    named_file = _is_checkpoint(local) or _is_metadata_or_config(Path(local).name)
    if _is_folder(local) or (named_file and _exists(local)):
        return checkpoint_params(Path(local))
    if _exists(local):
        factory = f"; a Python file's factory is named after it, e.g. {spec}:build" if local.endswith(".py") else ""
        raise ValueError(
            f"{spec!r} is a file the bench does not read: give a checkpoint (*{', *'.join(_CHECKPOINTS)}), a folder "
            f"holding one, a config.json, a Hugging Face Hub model's id or a module:factory{factory}"
        )
    try:
        snapshot = _hub_snapshot(spec)
    except ValueError:
        if not (named_file or spec.lower().endswith((".py", ".json", ".toml"))):
            raise
        snapshot = None  # a file's name that is no cached model's id either: the file is missing
    if snapshot is not None:  # a Hub model's id, found in the local cache
        params = checkpoint_params(snapshot)
        return attrs.evolve(params, source=f"{spec} from the Hugging Face cache: {params.source}")
    if named_file:
        return checkpoint_params(Path(local))  # it says the file is missing
    # a path's text: no factory's ":", and a path's separator (a Hub id's one "/" was looked for above) or a file's
    # extension (nets.py, weights.pt: no module on PYTHONPATH is named so)
    written_as_path = ":" not in spec and (
        spec.startswith((".", "/", "~")) or "\\" in spec or "/" in spec or os.sep in spec
        or spec.lower().endswith((".py", ".json", ".toml", *_CHECKPOINTS))
    )
    if written_as_path or (_IN_FILE.match(spec) is None and re.match(r"[A-Za-z]:[\\/]", spec)):  # C:\…, C:/…
        raise ValueError(f"no file or folder {spec!r}")
    name, args, kwargs = _factory_call(spec)
    module_name, _, attr = name.rpartition(":")
    try:
        module = (
            _module_file(Path(os.path.expanduser(module_name))) if module_name.endswith(".py")
            else importlib.import_module(module_name)
        )
    except (Exception, SystemExit) as exc:  # any import failure (a script's exit too) is the user's to see, in one line
        where = "" if module_name.endswith(".py") else "; is it on PYTHONPATH?"
        raise ValueError(f"{module_name!r} cannot be imported ({type(exc).__name__}: {exc}{where})") from None
    try:
        factory = peers._resolve(module, attr)
    except AttributeError:
        raise ValueError(f"module {module_name!r} has no {attr!r}") from None
    if not callable(factory):
        raise ValueError(f"{name} is not callable: it must make the model")
    called = spec if args or kwargs else f"{name}()"
    try:
        with torch.device("meta"):
            model = factory(*args, **kwargs)
    except (Exception, SystemExit):  # a factory that reads values (or loads weights) cannot run on the meta device
        try:
            model = factory(*args, **kwargs)
        except (Exception, SystemExit) as exc:
            raise ValueError(f"{called} raised {type(exc).__name__}: {exc}") from None
    if not isinstance(model, torch.nn.Module):
        raise ValueError(f"{called} made a {type(model).__name__}, not a torch.nn.Module")
    return _module_params(model, spec, f"model {spec}")


def _module_params(model: torch.nn.Module, spec: str, source: str) -> ParamSet:
    """The trainable parameters of ``model`` (made from ``spec``), by name, shape and dtype.

    Raises:
        ValueError: it has none, one of a lazy module (no shape yet) or one of a dtype the bench does not draw.
    """
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    lazy = [n for n, p in named if isinstance(p, torch.nn.parameter.UninitializedParameter)]
    if lazy:
        raise ValueError(
            f"the model of {spec} has parameters with no shape yet (lazy modules: their first forward makes them): "
            f"{', '.join(lazy)}"
        )
    named = [(n, p) for n, p in named if p.numel()]  # nothing to step, as kronopt leaves them out
    if not named:
        raise ValueError(f"the model of {spec} has no trainable parameter")
    odd = [f"{n} ({p.dtype})" for n, p in named if p.dtype not in _DRAWN]
    if odd:
        raise ValueError(
            f"the model of {spec} has parameters of a dtype the bench does not step (it takes "
            f"{', '.join(str(d).removeprefix('torch.') for d in _DRAWN)}): {', '.join(odd)}"
        )
    return ParamSet(
        [tuple(p.shape) for _, p in named], [n for n, _ in named], [p.dtype for _, p in named], source=source
    )


#: a config's keys that could make ``transformers`` fetch or run a repository's code while it makes the model,
#: and change no parameter: the classes of ``auto_map`` (code in the model's repository), an attention
#: implementation (a kernel from the Hub)
_CONFIG_CODE_KEYS: tuple[str, ...] = ("auto_map", "attn_implementation", "_attn_implementation")


@contextlib.contextmanager
def _hub_offline() -> Iterator[None]:
    """The Hugging Face Hub's offline mode for a while (what ``HF_HUB_OFFLINE=1`` sets at import): a config that
    names something on the Hub (a backbone by its repository) fails rather than reach the network."""
    try:
        import huggingface_hub.constants as hub
    except ImportError:  # no Hub client, no Hub
        yield
        return
    saved = hub.HF_HUB_OFFLINE
    hub.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        hub.HF_HUB_OFFLINE = saved


def config_params(path: Path) -> ParamSet:
    """The trainable parameters of the model a Hugging Face ``config.json`` describes, made by the
    ``transformers`` package on the meta device (no weights needed, nor memory): the class its
    ``architectures`` names, else the auto classes' (``AutoModelForSeq2SeqLM``'s for an encoder-decoder,
    ``AutoModelForCausalLM``'s, ``AutoModel``'s, the first that knows it). Each parameter's dtype is the one
    ``transformers`` makes it in from the config (the weights' ``dtype``, a router kept in float32 so).
    Nothing reaches the network or runs a repository's code: the config's ``auto_map`` and attention
    implementation are left out (they change no parameter), remote code is refused and the Hub is offline.

    Raises:
        ValueError: ``transformers`` is not installed, the file is not such a config, or no model can be made
            from it (a model whose code lives in its repository, one that names a part on the Hub, say).
    """
    try:
        import transformers
    except ImportError:
        raise ValueError(
            f"{str(path)!r} is a Hugging Face config: making its model needs the transformers package "
            "(pip install transformers)"
        ) from None
    try:
        raw = json.loads(path.read_bytes())
        if not isinstance(raw, dict) or not isinstance(raw.get("model_type"), str):
            raise ValueError("not a Hugging Face model's config (no model_type)")
        raw = {k: v for k, v in raw.items() if k not in _CONFIG_CODE_KEYS}
        with _hub_offline():
            config = transformers.AutoConfig.for_model(**raw)
            makers: list[Callable[[], Any]] = []
            for arch in raw.get("architectures") or []:
                if isinstance(arch, str) and isinstance(cls := getattr(transformers, arch, None), type):
                    makers.append(partial(getattr(cls, "_from_config", cls), config))  # under the config's dtype
                    break
            autos = ("AutoModelForCausalLM", "AutoModel")
            if getattr(config, "is_encoder_decoder", False) is True:  # a causal LM of it would be its decoder alone
                autos = ("AutoModelForSeq2SeqLM", *autos)
            makers += [
                partial(getattr(transformers, auto).from_config, config, trust_remote_code=False) for auto in autos
            ]
            failures = []
            for make in makers:
                try:
                    with torch.device("meta"):
                        model = make()
                    break
                except ValueError as exc:  # this auto class does not know the config's model
                    failures.append(str(exc).splitlines()[0] if str(exc) else "ValueError")
            else:
                raise ValueError(f"transformers makes no model of it: {failures[-1]}")
    except (Exception, SystemExit) as exc:  # anything transformers raises on a config is the user's to see
        detail = str(exc) if isinstance(exc, ValueError) else f"{type(exc).__name__}: {exc}"
        raise ValueError(f"{str(path)!r} cannot be made into a model ({detail[:300]})") from None
    if not isinstance(model, torch.nn.Module):
        raise ValueError(f"{str(path)!r} made a {type(model).__name__}, not a torch.nn.Module")
    return _module_params(model, str(path), f"{type(model).__name__} of {path.name}")


def _is_peer(name: str) -> bool:
    """Whether ``name`` is another library's optimizer (``package.Class`` or ``module:Class``), not kronopt's."""
    return name in peers.PEERS or peers.is_import_name(name)


def _make(
    name: str, params: list[torch.nn.Parameter], param_set: "ParamSet | Sequence[str] | None" = None
) -> tuple[Any, Any]:
    """The optimizer ``name`` on ``params``: a peer on the list (its own defaults), a kronopt preset or config on
    the named parameters (``param_set``'s names, which its routing reads; default ``blocks.<i>.weight``), in the
    set's param groups (:func:`param_groups`: one without a set, or given its names alone) with their rates."""
    if not isinstance(param_set, ParamSet):
        default = ParamSet.of([tuple(p.shape) for p in params])
        param_set = default if param_set is None else attrs.evolve(default, names=param_set)
    groups = param_groups(param_set)
    at = [g for g, _ in groups]
    if _is_peer(name):
        try:
            if name in peers.PEERS:
                opt, size = peers.build(name, params, param_set.names, at)
            else:
                opt, size = peers.build_imported(name, params, at)
        except BaseException as exc:  # (the bench reports a peer's failure with its notes)
            if len(at) > 1:
                exc.add_note(
                    f"built in {len(at)} param groups (--groups {param_set.grouping}); --groups one builds it on a "
                    "plain list of tensors"
                )
            raise
    else:
        made = kronopt.build(peers.in_groups(list(zip(param_set.names, params)), at), name)
        opt, size = made, made.state_bytes
    _set_rates(opt, params, groups)
    return opt, size


def _set_rates(opt: Any, params: Sequence[Tensor], groups: Sequence[tuple[list[int], dict[str, float]]]) -> None:
    """Each param group of ``opt`` (of each optimizer a :class:`peers.StepAll` holds) takes the rates of the group of
    :func:`param_groups` its parameters come from: its learning rate times ``lr_scale``, ``weight_decay`` as given. A
    group whose learning rate is ``None`` (an optimizer of relative steps) keeps it; an optimizer without
    ``param_groups`` (a wrapper of another) keeps the rates it was built with, with a warning."""
    rates = {id(params[i]): r for g, r in groups if r for i in g}
    if not rates:
        return
    for o in opt.opts if isinstance(opt, peers.StepAll) else (opt,):
        if not hasattr(o, "param_groups"):
            warnings.warn(
                f"{type(o).__module__}:{type(o).__qualname__} holds no param_groups: built in the groups, it keeps the "
                "rates it was built with",
                stacklevel=2,
            )
            continue
        for group in o.param_groups:
            r = next((rates[id(p)] for p in group["params"] if id(p) in rates), None)
            if r is None:
                continue
            if "lr_scale" in r and group.get("lr") is not None:  # (an optimizer may hold no rate: Adafactor's relative step)
                group["lr"] = group["lr"] * r["lr_scale"]
            if "weight_decay" in r and "weight_decay" in group:
                group["weight_decay"] = r["weight_decay"]


def _check_run(names: Sequence[str], shapes: Sequence[tuple[int, ...]], steps: int, warmup: int) -> None:
    """The arguments :func:`bench` and :func:`bench_world` share; raises ``ValueError`` naming the first bad one."""
    if steps < 1 or warmup < 0:
        raise ValueError(f"need steps ≥ 1 and warmup ≥ 0, got steps={steps}, warmup={warmup}")
    if not shapes or any(d < 1 for s in shapes for d in s):
        raise ValueError(f"need at least one shape, every dimension ≥ 1, got {list(shapes)}")
    if not names:
        raise ValueError("need at least one optimizer")


def bench(
    names: Sequence[str],
    shapes: "Sequence[tuple[int, ...]] | ParamSet",
    *,
    steps: int,
    warmup: int,
    device: str,
    dtype: torch.dtype | None = None,
    seed: int = 0,
    repeat: int = 1,
    makers: Mapping[str, Callable[[], tuple[Any, Any]]] | None = None,
    memory_steps: int = 0,
    stage_steps: int = 0,
) -> list[dict[str, Any]]:
    """Step time and state bytes per optimizer, measured interleaved in one run.

    Each of the ``warmup + steps`` rounds gives every optimizer the same
    gradients and times one ``step()`` of each in turn, in an order of its own
    (:func:`_round_order`: a shuffle seeded by ``seed``, so that no optimizer always
    follows the same one); only the last ``steps`` rounds count. ``mean_ms`` is the
    mean over those steps, so it includes the steps that refresh a preconditioner
    (every 10th for SOAP); ``median_ms`` is the typical step, which skips them when
    they are rarer than one in two.

    With ``repeat > 1`` the whole run (fresh optimizers, warm-up included) is made
    ``repeat`` times and each figure is the median over the runs
    (:func:`aggregate_runs`): on a shared machine a ratio moves by several percent
    from one run to the next, and the spread says by how much.

    ``memory_steps`` more rounds follow the timed ones, untimed, each step under a
    :class:`TransientMemory`: ``step_bytes`` is the most tensor memory one of those steps
    held at once (its temporaries and the new state it writes in; 10 rounds hold a
    refresh of the presets). The scratch tensors a kronopt optimizer keeps across steps
    (``KronOptimizer.scratch_bytes``: on a CPU, plain Muon's look-ahead stack and iteration
    buffers, the Adam scratch sets) were made by an earlier step and are held through this
    one: they count as its temporaries. A peer that raises in those rounds keeps its times, and its
    ``step_bytes`` is ``None``.

    ``stage_steps`` more rounds follow those, untimed for the table, in which each kronopt optimizer's step is
    split by stage slot (:mod:`kronopt.app.stage_times`): ``stages`` is the mean ms per step of its factor
    estimator, basis, inner rule, split and post stage, of kronopt's own work around them (``kronopt``: the
    gradients' stacking and checks, the state writes, bookkeeping and Python) and of the clocked steps themselves
    (``step_ms``); ``None`` for a peer, a stand-in of ``makers`` and without ``stage_steps``.

    ``fault_bytes`` is the memory an optimizer's timed step took fresh from the operating system, on
    the mean: the process's minor page faults during its steps (:func:`_minor_faults`, every thread's)
    times the page size. On a CPU the C allocator may hand a step's freed temporaries back to the
    system and the next step faults each page in again (zeroed): with glibc, muon's steps on 4 layers
    of d = 256 took 30–35 ms where they faulted nothing and 42–47 where they faulted about 35 MiB
    a step, depending only on where earlier allocations had left the heap's top. A large figure here
    says that part of the time is the allocator's, which ``--retain-freed-memory`` (:mod:`kronopt.malloc`)
    takes away for every optimizer of the run. ``None`` where the platform counts no faults.

    Python's cyclic collector is kept out of the comparison the same way: once the warm-up is done,
    the objects the process holds are frozen (:func:`_long_lived_frozen`), so a full collection (a
    tenth of a second here) does not land in whichever timed step happens to trigger it.

    ``shapes`` is the parameter set: a list of shapes (parameters named ``blocks.<i>.weight``) or a
    :class:`ParamSet` (a model's names, shapes and dtypes: :func:`model_params`); ``dtype``, where given, is
    every parameter's (by default float32, or the set's own).

    ``makers`` builds the named stand-ins that are not optimizers (name → a function
    returning the stand-in and its state bytes: the replays of the matrix work of :func:`replay_makers`,
    which ``--scaling`` and ``--alone`` time beside the steps).

    A peer (``package.Class`` or ``module:Class``) that raises, when built or at a step, is
    another library's bug: it is stepped no more in that run, its times so far are dropped,
    and the others go on. Its row holds ``failed`` (the step, 0 when built, and the exception)
    and no figures. A peer that fails in any of the ``repeat`` runs is reported failed, with
    the first failure and the number of runs that failed; the runs it completed are not
    reported (their medians would sit beside the others' medians of more runs). It is built
    afresh in each run all the same: a failure may depend on the load or the threads. When the
    first optimizer named failed, no row has a ``vs_first``. kronopt's own optimizers and the
    ``makers`` are not caught: their exceptions end the bench.

    Returns:
        One dict per name, in order: ``optimizer``, ``mean_ms``, ``median_ms``,
        ``state_bytes``, ``step_bytes`` (``None`` without ``memory_steps``), ``stages`` (``None`` without
        ``stage_steps``), ``fault_bytes``, ``vs_first`` (its mean over the first optimizer's mean),
        ``vs_first_range`` (the lowest and highest of that ratio over the runs), ``runs``,
        ``run_means`` and ``failed`` (``None``, or as :func:`aggregate_runs` gives it; the
        figures are then ``None``).

    Raises:
        ValueError: ``steps < 1``, ``warmup < 0``, ``repeat < 1``, no names, no shapes, or a dimension < 1.
    """
    params = ParamSet.of(shapes, dtype)
    _check_run(names, params.shapes, steps, warmup)
    if repeat < 1:
        raise ValueError(f"bench needs repeat ≥ 1, got {repeat}")
    if memory_steps < 0:
        raise ValueError(f"bench needs memory_steps ≥ 0, got {memory_steps}")
    if stage_steps < 0:
        raise ValueError(f"bench needs stage_steps ≥ 0, got {stage_steps}")
    runs = [
        _bench_once(
            names, params, steps=steps, warmup=warmup, device=device, seed=seed, makers=makers,
            memory_steps=memory_steps, stage_steps=stage_steps, repeat_index=i,
        )
        for i in range(repeat)
    ]
    return aggregate_runs(runs)


def aggregate_runs(runs: Sequence[Sequence[dict[str, Any]]]) -> list[dict[str, Any]]:
    """The rows of several runs of one table (the same optimizers in the same order) as one table: per
    optimizer the median over the runs of ``mean_ms``, ``median_ms`` and ``vs_first`` (each run's own
    ratio, so a run on a busier machine slows every optimizer in it alike), the lowest and highest
    ratio (``vs_first_range``), the number of runs and each run's ``mean_ms`` (``run_means``, for
    :func:`ratios`). ``state_bytes`` and ``step_bytes`` are the first run's, ``fault_bytes`` the median, and
    each figure of ``stages`` the median over the runs.

    An optimizer that failed in any run (its row's ``failed`` set, :func:`bench`) gets ``failed``: the
    first failure's ``step`` and ``error`` and the number of ``runs`` that failed, and ``None`` for
    every figure, the runs it completed left out; if it is the first optimizer, the others get no
    ``vs_first`` (nor its range). The others' ``failed`` is ``None``."""
    if not runs:
        raise ValueError("aggregate_runs needs at least one run")
    first_failed = any(run[0].get("failed") for run in runs)
    out = []
    for i, row in enumerate(runs[0]):
        failures = [run[i]["failed"] for run in runs if run[i].get("failed")]
        if failures:
            out.append(
                {
                    "optimizer": row["optimizer"], "mean_ms": None, "median_ms": None, "state_bytes": None,
                    "step_bytes": None, "fault_bytes": None, "vs_first": None, "vs_first_range": None, "runs": len(runs),
                    "run_means": None, "stages": None,
                    "failed": {**failures[0], "runs": len(failures)},
                }
            )
            continue
        ratios = None if first_failed else [run[i]["vs_first"] for run in runs]
        out.append(
            {
                "optimizer": row["optimizer"],
                "mean_ms": statistics.median(run[i]["mean_ms"] for run in runs),
                "median_ms": statistics.median(run[i]["median_ms"] for run in runs),
                "state_bytes": row["state_bytes"],
                "step_bytes": row.get("step_bytes"),
                "fault_bytes": _median_or_none([run[i].get("fault_bytes") for run in runs]),
                "vs_first": None if ratios is None else statistics.median(ratios),
                "vs_first_range": None if ratios is None else (min(ratios), max(ratios)),
                "runs": len(runs),
                "run_means": [run[i]["mean_ms"] for run in runs],
                "stages": _median_stages([run[i].get("stages") for run in runs]),
                "failed": None,
            }
        )
    return out


def _median_stages(splits: Sequence[Mapping[str, float] | None]) -> dict[str, float] | None:
    """Each figure of the runs' stage splits (:func:`bench`'s ``stages``), the median over the runs; ``None``
    where the runs have none."""
    found = [s for s in splits if s is not None]
    if not found:
        return None
    return {key: statistics.median(s[key] for s in found) for key in found[0]}


def ratios(rows: Sequence[dict[str, Any]], pairs: Sequence[tuple[str, str]]) -> list[dict[str, Any]]:
    """The ratio ``a / b`` of the mean step times of each pair of optimizers in :func:`bench`'s rows (or one world
    size's of :func:`bench_world`),
    taken run by run (each run's own, as ``vs_first``): ``pair``, ``ratio`` (the median over the
    runs), ``range`` (the lowest and highest), ``runs`` and ``failed``: the names of the pair that
    failed (:func:`bench`), whose pair has no ``ratio`` nor ``range`` (``None``), else ``()``.

    Raises:
        KeyError: a name of a pair is not in ``rows``.
    """
    by_name = {r["optimizer"]: r for r in rows}
    out = []
    for a, b in pairs:
        row_a, row_b = by_name[a], by_name[b]
        failed = tuple(n for n, r in ((a, row_a), (b, row_b)) if r.get("failed"))
        if failed:
            out.append({"pair": (a, b), "ratio": None, "range": None, "runs": row_a.get("runs", 1), "failed": failed})
            continue
        per_run = [x / y if y > 0 else float("nan") for x, y in zip(row_a["run_means"], row_b["run_means"])]
        out.append(
            {"pair": (a, b), "ratio": statistics.median(per_run), "range": (min(per_run), max(per_run)),
             "runs": len(per_run), "failed": ()}
        )
    return out


def _round_order(runs: list[Any], k: int, seed: int, repeat_index: int = 0) -> list[Any]:
    """The order round ``k`` of run ``repeat_index`` (of ``--repeat``'s) steps ``runs`` in: a shuffle drawn from
    ``seed``, ``repeat_index`` and ``k`` alone (the same on every rank of a ``--world`` run), so that no optimizer
    always steps right after the same one, and each run of a repeat draws other orders. A step's time depends on what the step
    before it left in the caches and the allocator: on 4 layers of d = 256 (a 2-core Zen 5), dykaf / soap read
    1.187 (1.184–1.209) stepped in a fixed order with soap first and 1.225 (1.213–1.230) in the reverse order,
    three runs each."""
    order = list(runs)
    random.Random(f"round order {seed} {repeat_index} {k}").shuffle(order)
    return order


@contextlib.contextmanager
def _long_lived_frozen() -> Iterator[Callable[[], None]]:
    """A function that, called once the warm-up is done, collects the garbage and then moves every object the
    process holds into the collector's permanent generation (``gc.freeze``) until the block ends, even by an
    exception.

    CPython's cyclic collector runs a full collection once enough objects have outlived the younger ones, and a
    full collection scans every object of the process: torch's, the peers' modules, every optimizer's state
    (about 300 000 objects here, 110–160 ms a collection on a 2-core Zen 5). Whichever optimizer's step happens to
    trigger it pays for all of them: on 30 small matrices of 30 shapes one such collection landed in dykaf's timed
    steps run after run and read it 1.8–1.9 × soap's mean step, against 1.4 with the heap frozen. Frozen, a
    collection scans only what the timed rounds made, so an optimizer's own garbage still costs its steps. Where
    the caller froze the heap before (``gc.get_freeze_count() > 0``), nothing is frozen or thawed here: a thaw
    would undo the caller's freeze, and objects frozen for good would never be collected."""
    ours = gc.get_freeze_count() == 0
    frozen = False

    def freeze() -> None:
        nonlocal frozen
        if ours and not frozen:
            gc.collect()  # garbage frozen with the rest would never be collected
            gc.freeze()
            frozen = True

    try:
        yield freeze
    finally:
        if frozen:
            gc.unfreeze()


def _bench_once(
    names: Sequence[str], params: ParamSet, *, steps: int, warmup: int, device: str,
    seed: int, makers: Mapping[str, Callable[[], tuple[Any, Any]]] | None = None,
    memory_steps: int = 0, stage_steps: int = 0, repeat_index: int = 0,
) -> list[dict[str, Any]]:
    """One interleaved run of :func:`bench` (fresh optimizers; ``repeat_index``: its index among ``--repeat``'s, which
    with ``seed`` draws its rounds' orders, :func:`_round_order`); a name in ``makers`` is built by its
    maker (a stand-in with a ``step()``, as :class:`_Replay`) instead of :func:`_make`. A peer that
    raises is dropped (:func:`_drop`) and its row has ``failed`` and no figures. ``memory_steps``
    untimed rounds after the timed ones count each step's memory (:class:`TransientMemory`), and ``stage_steps``
    more split each kronopt optimizer's step by stage slot (:func:`_split_by_stage`)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    base = params.draw(gen)
    grads = [[g.to(device) for g in params.draw(gen)] for _ in range(4)]
    runs = []
    for name in names:
        tensors = [torch.nn.Parameter(b.clone().to(device)) for b in base]
        made = bool(makers) and name in makers
        run = {"name": name, "params": tensors, "opt": None, "state_bytes": None, "times": [], "grads": _own(grads[0]),
               "peer": not made and _is_peer(name), "failed": None, "step_bytes": None, "faults": 0, "stages": None}
        try:
            run["opt"], run["state_bytes"] = makers[name]() if made else _make(name, tensors, params)
        except (Exception, SystemExit) as exc:
            if not run["peer"]:
                raise
            _drop(run, 0, exc)
        runs.append(run)
    sync = torch.cuda.synchronize if device.startswith("cuda") else _no_sync
    with peers.eager(), _long_lived_frozen() as freeze:
        for k in range(warmup + steps):
            if k == warmup:
                freeze()  # a full collection of the process's objects lands in no timed step
            # interleaved, so machine noise hits every optimizer alike; each round in an order of its own
            for run in _round_order(runs, k, seed, repeat_index):
                if run["failed"]:
                    continue
                _give_grads(run, grads[k % len(grads)])
                sync()
                faults = _minor_faults()
                t0 = time.perf_counter()
                try:  # costs nothing in the timed region unless something raises (CPython ≥ 3.11)
                    run["opt"].step()
                    sync()
                except (Exception, SystemExit) as exc:
                    if not run["peer"]:
                        raise
                    _drop(run, k + 1, exc)
                    continue
                if k >= warmup:
                    run["times"].append(time.perf_counter() - t0)
                    if faults is not None:
                        run["faults"] += _minor_faults() - faults  # type: ignore[operator]
        for k in range(warmup + steps, warmup + steps + memory_steps):
            for run in runs:
                if run["failed"] or run["step_bytes"] is False:
                    continue
                _give_grads(run, grads[k % len(grads)])
                # scratch a kronopt optimizer kept from earlier steps is the step's working memory, held throughout
                # (counted once: read before the step, while a set the step makes is the counter's)
                kept = run["opt"].scratch_bytes() if isinstance(run["opt"], kronopt.KronOptimizer) else 0
                try:
                    with TransientMemory() as counter:
                        run["opt"].step()
                except (Exception, SystemExit):
                    if not run["peer"]:
                        raise
                    run["step_bytes"] = False  # its times stand; its memory is not reported
                    continue
                run["step_bytes"] = max(run["step_bytes"] or 0, counter.peak + kept)
        if stage_steps:
            _split_by_stage(runs, grads, range(warmup + steps + memory_steps, warmup + steps + memory_steps + stage_steps), sync)
    first = None if runs[0]["failed"] else statistics.fmean(runs[0]["times"]) * 1e3
    rows = []
    for run in runs:
        if run["failed"]:
            rows.append({"optimizer": run["name"], "mean_ms": None, "median_ms": None, "state_bytes": None,
                         "step_bytes": None, "fault_bytes": None, "vs_first": None, "failed": run["failed"]})
            continue
        mean = statistics.fmean(run["times"]) * 1e3
        rows.append(
            {
                "optimizer": run["name"],
                "mean_ms": mean,
                "median_ms": statistics.median(run["times"]) * 1e3,
                "state_bytes": _state_of(run),
                "step_bytes": run["step_bytes"] if run["step_bytes"] is not False else None,
                "stages": run["stages"],
                "fault_bytes": _fault_bytes(run["faults"], len(run["times"])),
                "vs_first": _vs_first(mean, first),
                "failed": None,
            }
        )
    return rows


def _split_by_stage(runs: list[dict[str, Any]], grads: list[list[Tensor]], rounds: range, sync: Callable[[], None]) -> None:
    """Step each kronopt optimizer of ``runs`` once per round of ``rounds`` (in turn, the same gradients as the timed
    rounds') with its stages' methods on a :class:`~kronopt.app.stage_times.StageClock`, and put in its run's
    ``stages`` the split of its mean step (:func:`~kronopt.app.stage_times.split_ms`). Peers and stand-ins are
    not split. ``sync`` waits for the device (also at each stage's edges). The rounds step the optimizers in the
    order named (the timed rounds' orders are drawn, :func:`_round_order`): the clocked step is its own mean."""
    split = [run for run in runs if not run["failed"] and isinstance(run["opt"], kronopt.KronOptimizer)]
    if not split:
        return
    clocks = {id(run): stage_times.StageClock(sync) for run in split}
    spent = dict.fromkeys(clocks, 0.0)
    stages = [pair for run in split for pair in stage_times.stages_of(run["opt"])]
    with stage_times.StageClock.installed(stages):
        for k in rounds:
            for run in split:
                _give_grads(run, grads[k % len(grads)])
                sync()
                with clocks[id(run)].running():
                    t0 = time.perf_counter()
                    run["opt"].step()
                    sync()
                    spent[id(run)] += time.perf_counter() - t0
    for run in split:
        run["stages"] = stage_times.split_ms(clocks[id(run)], spent[id(run)], len(rounds))


def _no_sync() -> None:
    """A CPU's wait for the device: nothing."""


def _state_of(run: dict[str, Any]) -> int | None:
    """A run's state bytes; ``None`` for a peer whose state cannot be read (a ``module:Class`` optimizer without a
    ``state`` mapping, or one whose ``state`` raises): its times stand, its state is not reported."""
    try:
        return run["state_bytes"]()
    except (Exception, SystemExit):
        if not run["peer"]:
            raise
        return None


def _vs_first(mean: float, first: float | None) -> float | None:
    """A run's ``vs_first``: its mean over the first optimizer's (``None`` where that one failed, NaN over a zero)."""
    return None if first is None else mean / first if first > 0 else float("nan")


def _fault_bytes(faults: int, steps: int) -> float | None:
    """The memory a step took fresh from the system on the mean, from ``faults`` minor page faults over ``steps``
    timed steps (:func:`_minor_faults`); ``None`` where the platform counts none."""
    return None if _minor_faults() is None else faults / steps * resource.getpagesize()


def _mib_cell(value: float | None, width: int) -> str:
    """Bytes as a MiB cell of ``width``, ``-`` where there is no figure (a peer whose state cannot be read, a platform
    that counts no faults, a step not measured)."""
    return f"{_mib(value):>{width}.2f}" if value is not None else f"{'-':>{width}}"


def _faults_cell(row: Mapping[str, Any]) -> str:
    """A row's ``faults MiB`` cell, ``-`` where it has no figure."""
    return " " + _mib_cell(row.get("fault_bytes"), 10)


def _minor_faults() -> int | None:
    """The minor page faults of this process so far, every thread's (``getrusage``): each a page the
    process touched for the first time since the system handed it over, zeroed. ``None`` without
    ``resource`` (Windows)."""
    return None if resource is None else resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _median_or_none(values: Sequence[float | None]) -> float | None:
    """The median of ``values``, ``None`` where any is (a platform that counts nothing)."""
    return None if any(v is None for v in values) else statistics.median(values)  # type: ignore[type-var]


def _drop(run: dict[str, Any], step: int, exc: BaseException) -> None:
    """Takes a peer that raised at ``step`` (1-based, warm-up included; 0: when built) out of the rest of its
    run (an exception, or a ``sys.exit()``: a peer's ``SystemExit`` is its failure, not the bench's end; a
    ``KeyboardInterrupt`` still ends the bench): records its failure (``step``, and ``error``: the exception's type and
    message, and its notes, each in brackets: a peer built in several param groups says so) and lets go of its
    times and its optimizer (its state is freed before the others' next step)."""
    error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    notes = [str(n) for n in getattr(exc, "__notes__", ())]
    run["failed"] = {"step": step, "error": error + "".join(f" ({n})" for n in notes)}
    run["opt"] = run["state_bytes"] = None
    run["times"] = []


def _own(like: Sequence[Tensor]) -> list[Tensor]:
    """One optimizer's gradient buffers, shaped as ``like``: its gradients are its own (:func:`_give_grads`)."""
    return [torch.empty_like(g) for g in like]


def _give_grads(run: dict[str, Any], grads: Sequence[Tensor]) -> None:
    """Step ``k``'s gradients copied into ``run``'s own buffers and set as its parameters' ``grad``, before the
    timer starts: an optimizer that changes its gradients in place (pytorch_optimizer's Muon does) changes no
    other optimizer's, nor the ones it is handed again four steps later."""
    for p, buf, g in zip(run["params"], run["grads"], grads):
        p.grad = buf.copy_(g)


def scaling(
    names: Sequence[str], widths: Sequence[int], *, steps: int, warmup: int, device: str, seed: int = 0,
    repeat: int = 1, dtype: torch.dtype | None = None, grouping: str = "one",
) -> list[dict[str, Any]]:
    """:func:`bench` on a one-layer transformer-shaped set (:func:`transformer_shapes`) of ``dtype`` parameters
    (float32 by default; in the param groups ``grouping`` makes, :func:`param_groups`) at each width ``d``, with each
    kronopt optimizer's matrix work alone (:class:`_Replay`) stepped in the same rounds.

    The replay of step k runs beside step k itself, interleaved with the optimizers, so the
    machine's load hits both alike, and both figures are the mean over the same timed steps
    (refreshes included): the step's mean over the replay's says how far the step is from
    being bound by its matrix work. An optimizer whose steps record no matrix work has 0.
    With ``repeat > 1`` each width's run is made ``repeat`` times, as :func:`bench` makes
    them: the figures are medians over the runs, and each ratio (to the first optimizer,
    step over replay) is each run's own, with its lowest and highest (:func:`matrix_work_ratios`).
    A peer that fails at a width is reported failed there, as :func:`bench` has it.

    Returns:
        One dict per width: ``d``, ``rows`` (:func:`bench`'s rows at that width), ``alone``
        (kronopt optimizer name → the mean ms per step of its matrix work replayed, the median
        over the runs) and ``matrix_work`` (the same names → :func:`matrix_work_ratios`' entry).
    """
    table = []
    for d in widths:
        shapes = attrs.evolve(transformer_set(d, 1, dtype), grouping=grouping)
        recorded, makers = replay_makers(names, shapes, steps=warmup + steps, device=device, seed=seed)
        timing = dict(steps=steps, warmup=warmup, device=device, seed=seed)
        rows = bench([*names, *makers], shapes, **timing, repeat=repeat, makers=makers)
        found = matrix_work_ratios(rows, list(recorded))
        alone = {n: 0.0 if found[n] is None else found[n]["alone_ms"] for n in recorded}
        table.append({"d": d, "rows": rows[: len(names)], "alone": alone, "matrix_work": found})
    return table


def alone_name(name: str) -> str:
    """The row name of ``name``'s matrix work replayed alone (:func:`replay_makers`)."""
    return f"{name} alone"


def replay_makers(
    names: Sequence[str], shapes: "Sequence[tuple[int, ...]] | ParamSet", *, steps: int, device: str, seed: int = 0
) -> tuple[dict[str, list], dict[str, Callable[[], tuple[Any, Any]]]]:
    """The matrix work of each kronopt optimizer among ``names`` (peers have none we can record), recorded
    over ``steps`` steps on ``shapes`` (:func:`record_matrix_work`), and a maker of its :class:`_Replay` per
    optimizer that records any (name :func:`alone_name`), for :func:`bench`'s ``makers``: so the replays take
    their turn in the same interleaved rounds as the steps.

    Returns:
        ``(recorded, makers)``: every kronopt optimizer's calls per step, and the makers.
    """
    recorded = {
        n: record_matrix_work(n, shapes, steps=steps, device=device, seed=seed) for n in names if not _is_peer(n)
    }
    makers = {alone_name(n): partial(_Replay.maker, calls, seed) for n, calls in recorded.items() if any(calls)}
    return recorded, makers


#: the operations :func:`record_matrix_work` records and :class:`_Replay` replays: matrix products and the matrix decompositions (with their
#: in-place forms, ``baddbmm_``: a per-block weight scales the accumulator first, then the product adds into it), and
#: oneDNN's linear layer, through which a Zen 5 multiplies the steps' large float32 blocks (``linalg._by_onednn``)
HEAVY_OPS: frozenset[str] = frozenset(
    {"mm", "bmm", "addmm", "baddbmm", "addbmm", "_linalg_eigh", "linalg_qr", "geqrf", "linalg_householder_product",
     "_linalg_svd", "_linear_pointwise"}
)


class _HeavyOps(TorchDispatchMode):
    """Records each :data:`HEAVY_OPS` call as ``(op, args, kwargs)``, tensors replaced by their
    ``(shape, dtype, device)`` and their kind: ``"sym"`` for an input that must be symmetric
    (``eigh``), ``"out0"``, ``"out1"``, ... for each tensor the op writes, as its schema says (an in-place
    op's first argument, ``baddbmm_``'s accumulator; an ``out=`` result, ``bmm(..., out=P)``), else ``""``.
    So a replay never writes into one of a call's operands, nor two results into one tensor."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[Any, tuple, dict]] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        if name.removesuffix("_") in HEAVY_OPS:
            kind = "sym" if "eigh" in name else ""
            schema = func._schema.arguments
            written = [a.name for a in schema if a.alias_info is not None and a.alias_info.is_write]

            def spec(x: Any, arg: str) -> Any:
                if not isinstance(x, torch.Tensor):
                    return x
                mine = f"out{written.index(arg)}" if arg in written else kind
                if name == "linalg_householder_product" and arg in ("input", "tau"):
                    # the reflectors and their scalings, replayed as one QR's pair (_householder_pair)
                    mine = ("reflectors", tuple(args[0].shape))
                return ("tensor", tuple(x.shape), x.dtype, x.device, mine)

            recorded = tuple(spec(a, schema[i].name) for i, a in enumerate(args))
            self.calls.append((func, recorded, {k: spec(v, k) for k, v in kwargs.items()}))
        return func(*args, **kwargs)


def _replay_inputs(
    calls: list[tuple[Any, tuple, dict]], gen: torch.Generator, made: dict[tuple, torch.Tensor] | None = None
) -> list[tuple[Any, tuple, dict]]:
    """The recorded calls with random inputs; one input tensor per distinct (shape, dtype, device, kind),
    shared by every call that asks for it (and, through ``made``, by the calls of every step), so
    memory stays that of one step, not of every recorded call.
    A written tensor (an in-place op's accumulator, an ``out=`` result) has a kind of its own, so it
    never feeds an operand: the replays write bounded products into it (``x += α a b``, ``P = a b`` with
    fixed ``a``, ``b``), never ``x += α x x`` nor ``P = P b``."""
    made = {} if made is None else made

    def make(x: Any) -> Any:
        if not (isinstance(x, tuple) and len(x) == 5 and x[0] == "tensor"):
            return x
        if x not in made:
            _, _, dtype, dev, kind = x
            if isinstance(kind, tuple) and kind[0] == "reflectors":  # householder_product's two inputs, from one QR
                reflectors, tau = _householder_pair(kind[1], dtype, dev)
                made[("tensor", kind[1], dtype, dev, kind)] = reflectors
                made[("tensor", tuple(tau.shape), dtype, dev, kind)] = tau
            else:
                made[x] = _random_input(x, gen)
        return made[x]

    return [(op, tuple(make(a) for a in args), {k: make(v) for k, v in kw.items()}) for op, args, kw in calls]


def _random_input(x: tuple, gen: torch.Generator) -> torch.Tensor:
    """A random tensor for a recorded ``("tensor", shape, dtype, device, kind)`` argument."""
    _, shape, dtype, dev, kind = x
    t = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype=dtype, device=dev)
    if kind == "sym" and len(shape) >= 2:  # a symmetric positive definite matrix, like a factor
        t = t @ t.mT / shape[-1] + torch.eye(shape[-1], dtype=dtype, device=dev)
    return t


def _householder_pair(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The reflectors and scalings ``geqrf`` leaves for a random matrix of ``shape``: what
    ``householder_product`` reads in a refresh (a seed of its own). Random scalings instead would
    multiply reflections that are not orthogonal, and the product would overflow on a large side."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    A = torch.randn(shape, generator=gen, dtype=torch.float64)
    reflectors, tau = torch.geqrf(A)
    return reflectors.to(dtype=dtype, device=device), tau.to(dtype=dtype, device=device)


def record_matrix_work(
    name: str, shapes: "Sequence[tuple[int, ...]] | ParamSet", *, steps: int, device: str,
    dtype: torch.dtype | None = None, seed: int = 0,
) -> list[list[tuple[Any, tuple, dict]]]:
    """The matrix work of each of the first ``steps`` steps of a fresh kronopt optimizer ``name``: every
    call of :data:`HEAVY_OPS` (refreshes included), with its shapes and settings, one list per step.
    Step k's list is what step k of any fresh optimizer of that name on these shapes calls: which
    steps refresh follows the step count, not the values."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    param_set = ParamSet.of(shapes, dtype)
    params = [torch.nn.Parameter(t.to(device)) for t in param_set.draw(gen)]
    grads = [[g.to(device) for g in param_set.draw(gen)] for _ in range(4)]
    opt, _ = _make(name, params, param_set)
    per_step = []
    for k in range(steps):
        for p, g in zip(params, grads[k % len(grads)]):
            p.grad = g
        with _HeavyOps() as recorder:
            opt.step()
        per_step.append(recorder.calls)
    return per_step


class _Replay:
    """A stand-in optimizer whose k-th ``step()`` replays the calls recorded from step k
    (:func:`record_matrix_work`) on random inputs of the same shapes (symmetric positive definite
    ones for ``eigh``), with nothing around them: no elementwise work, no allocation of state, no
    Python of kronopt's. The inputs are made once, before the first step."""

    def __init__(self, per_step: list[list[tuple[Any, tuple, dict]]], seed: int = 0) -> None:
        gen = torch.Generator(device="cpu").manual_seed(seed)
        made: dict[tuple, torch.Tensor] = {}
        self._steps = [_replay_inputs(calls, gen, made) for calls in per_step]
        self._k = 0

    @classmethod
    def maker(cls, per_step: list[list[tuple[Any, tuple, dict]]], seed: int = 0) -> tuple["_Replay", Any]:
        """The replay and its state bytes (none), as :func:`bench`'s ``makers`` want them."""
        return cls(per_step, seed), lambda: 0

    def step(self) -> None:
        for op, args, kw in self._steps[self._k % len(self._steps)]:
            op(*args, **kw)
        self._k += 1


def matmul_alone(
    name: str, shapes: "Sequence[tuple[int, ...]] | ParamSet", *, steps: int, warmup: int, device: str,
    dtype: torch.dtype | None = None, seed: int = 0,
) -> float:
    """Milliseconds per step of the matrix work alone, replayed on its own: the mean over steps
    ``warmup`` to ``warmup + steps`` of :class:`_Replay` (the earlier steps' replays warm up).
    :func:`scaling` replays the same work interleaved with the steps instead, which compares
    better on a busy machine. 0.0 where the steps record no matrix work.
    """
    per_step = record_matrix_work(name, shapes, steps=warmup + steps, device=device, dtype=dtype, seed=seed)
    if not any(per_step):
        return 0.0
    replay = _Replay(per_step, seed)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    times = []
    for k in range(warmup + steps):
        sync()
        t0 = time.perf_counter()
        replay.step()
        sync()
        if k >= warmup:
            times.append(time.perf_counter() - t0)
    return statistics.fmean(times) * 1e3


def _rank_rows(job: dict[str, Any], agree: Callable[[bool], bool]) -> list[dict[str, Any]]:
    """One rank's part of :func:`bench_world`: per name its step times, state bytes and bytes gathered per step.

    ``agree(failed)`` starts every step on every rank together (the slowest rank's time is the step's) and tells
    whether the optimizer failed on any rank: a peer that raised on one rank (when built or at a step) is
    stepped by none from then on, so that the ranks' meetings still pair. Its row holds ``failed`` (this rank's
    own failure, else ``None``) and ``dropped``; kronopt's own optimizers raise through, as in :func:`bench`.
    """
    gen = torch.Generator().manual_seed(job["seed"])  # the same parameters and gradients on every rank
    param_set: ParamSet = job["params"]
    base = param_set.draw(gen)
    grads = [param_set.draw(gen) for _ in range(4)]
    runs = []
    for name in job["names"]:
        params = [torch.nn.Parameter(b.clone()) for b in base]
        run = {"params": params, "opt": None, "state_bytes": None, "times": [], "grads": _own(grads[0]),
               "peer": _is_peer(name), "failed": None, "dropped": False, "faults": 0}
        try:
            run["opt"], run["state_bytes"] = _make(name, params, param_set)
        except (Exception, SystemExit) as exc:
            if not run["peer"]:
                raise
            _drop(run, 0, exc)
        runs.append(run)
    with peers.eager(), _long_lived_frozen() as freeze:
        for k in range(job["warmup"] + job["steps"]):
            if k == job["warmup"]:
                freeze()  # as in bench(): every rank at the same step
            # interleaved, in the same orders as in bench()
            for run in _round_order(runs, k, job["seed"], job.get("repeat_index", 0)):
                if run["dropped"]:
                    continue
                if run["failed"] is None:
                    _give_grads(run, grads[k % len(grads)])
                if agree(run["failed"] is not None):  # every rank starts the step together, or drops it together
                    run["dropped"], run["times"] = True, []
                    continue
                faults = _minor_faults()
                t0 = time.perf_counter()
                try:
                    run["opt"].step()
                except (Exception, SystemExit) as exc:
                    if not run["peer"]:
                        raise
                    _drop(run, k + 1, exc)
                    continue
                if k >= job["warmup"]:
                    run["times"].append(time.perf_counter() - t0)
                    if faults is not None:
                        run["faults"] += _minor_faults() - faults  # type: ignore[operator]
    rows = []
    for run in runs:
        if run["dropped"] or run["failed"] is not None:
            rows.append({"times": [], "state_bytes": 0, "gather_bytes": 0, "failed": run["failed"], "dropped": True})
            continue
        summary = run["opt"].bucket_summary() if isinstance(run["opt"], kronopt.KronOptimizer) else []
        faulted = _fault_bytes(run["faults"], len(run["times"]))
        rows.append({"times": run["times"], "state_bytes": _state_of(run), "gather_bytes": sum(b["gather_bytes"] for b in summary),
                     "fault_bytes": faulted, "failed": None, "dropped": False})
    return rows


def _agree_on_gloo(failed: bool) -> bool:
    """:func:`_rank_rows`' meeting on several ranks: one ``all_reduce`` (MAX) of this rank's failure flag."""
    import torch.distributed as dist

    flag = torch.tensor([int(failed)])
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


def _world_rank(rank: int, world: int, out: str, job: dict[str, Any]) -> None:
    """One rank of :func:`bench_world` (``torch.multiprocessing.spawn`` runs it in a fresh process). The
    ranks meet through a store file in ``out``: a TCP port found free beforehand could be taken by
    another process before rank 0 binds it."""
    import torch.distributed as dist

    torch.set_num_threads(job["threads"])
    if job.get("retain_freed_memory"):
        malloc.retain_freed_memory()
    store = Path(out, "store").resolve().as_uri()
    dist.init_process_group("gloo", init_method=store, rank=rank, world_size=world)
    try:
        Path(out, f"rank{rank}.pkl").write_bytes(pickle.dumps(_rank_rows(job, _agree_on_gloo)))
    finally:
        dist.destroy_process_group()


#: how :func:`bench_world` starts its ranks: fresh interpreters (a forked rank would inherit the bench
#: process's OpenMP threads; the tests fork, with one thread per rank, to start faster)
START_METHOD = "spawn"


def _world(world: int, job: dict[str, Any]) -> list[list[dict[str, Any]]]:
    """Every rank's :func:`_rank_rows`; world size 1 runs in this process (nothing to shard, no process group)."""
    if world == 1:
        threads = torch.get_num_threads()
        torch.set_num_threads(job["threads"])
        try:
            return [_rank_rows(job, bool)]
        finally:
            torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory(prefix="kronopt-bench-") as where:
        torch.multiprocessing.start_processes(
            _world_rank, args=(world, where, job), nprocs=world, join=True, start_method=START_METHOD
        )
        return [pickle.loads(Path(where, f"rank{r}.pkl").read_bytes()) for r in range(world)]


def bench_world(
    names: Sequence[str],
    shapes: "Sequence[tuple[int, ...]] | ParamSet",
    *,
    worlds: Sequence[int],
    steps: int,
    warmup: int,
    threads: int = 0,
    seed: int = 0,
    retain_freed_memory: bool = False,
    repeat: int = 1,
) -> list[dict[str, Any]]:
    """Step time, state and communication per rank at each world size, as ``world`` CPU processes on gloo.

    Every rank holds the same parameters and, each step, the same gradients (as DDP
    leaves them after its all-reduce); kronopt's optimizers shard their work
    (docs/distributed.md), other libraries' just repeat it. The optimizers are
    stepped interleaved, as in :func:`bench`, each step after a barrier; a step's
    time is the slowest rank's. World size 1 runs in this process.

    With ``repeat > 1`` each world size's run (fresh ranks and optimizers, warm-up included, each run
    in round orders of its own) is made ``repeat`` times and each time is the median over the runs,
    as :func:`bench` makes them (:func:`aggregate_runs`); the state and gather bytes, which do not
    change from run to run, are the first run's.

    Args:
        threads: torch threads per rank; 0: the machine's cores divided by the world size (at least 1).
        retain_freed_memory: each rank process calls :func:`kronopt.malloc.retain_freed_memory`
            first (world size 1 runs in this process, which the caller sets up).

    Returns:
        One dict per world size and name, in that order: ``world``, ``optimizer``,
        ``mean_ms`` and ``median_ms`` (over the timed steps of the per-step maximum over
        the ranks; with ``repeat``, the median over the runs), ``threads`` (per rank), ``state_bytes_max``
        and ``state_bytes_sum`` (over the ranks), ``comm_bytes``: bytes a rank receives per step at the
        gathers (the sum of ``bucket_summary()``'s ``gather_bytes``, the largest over
        the ranks; 0 in one process and for other libraries), ``fault_bytes`` (the memory a step took fresh from
        the system, as :func:`bench` counts it, on the rank that took most; ``None`` where the platform counts
        none), ``runs`` and ``run_means`` (each run's
        ``mean_ms``, for :func:`ratios`), ``failed``: ``None``, or where a peer raised (on any rank, in any
        run; every rank then stopped stepping it) its ``step``, ``error``, the ``ranks`` it raised on (in the
        first run it failed) and the number of ``runs`` it failed in, the figures then ``None``.

    Raises:
        ValueError: as :func:`bench`, a world size < 1 or ``repeat < 1``.
    """
    params = ParamSet.of(shapes)
    _check_run(names, params.shapes, steps, warmup)
    if not worlds or any(w < 1 for w in worlds):
        raise ValueError(f"need world sizes ≥ 1, got {list(worlds)}")
    if repeat < 1:
        raise ValueError(f"bench_world needs repeat ≥ 1, got {repeat}")
    out = []
    for world in worlds:
        job = {
            "names": list(names), "params": params, "steps": steps, "warmup": warmup, "seed": seed,
            "threads": threads or max(1, (os.cpu_count() or 1) // world), "retain_freed_memory": retain_freed_memory,
        }
        runs = [_world_run(list(names), _world(world, {**job, "repeat_index": i})) for i in range(repeat)]
        for row, first in zip(aggregate_runs(runs), runs[0]):
            extra = ("state_bytes_sum", "comm_bytes")
            figures = {k: None for k in extra} if row["failed"] else {k: first[k] for k in extra}
            out.append(
                {
                    "world": world, "optimizer": row["optimizer"], "mean_ms": row["mean_ms"],
                    "median_ms": row["median_ms"], "threads": job["threads"], "state_bytes_max": row["state_bytes"],
                    **figures, "fault_bytes": row["fault_bytes"], "runs": row["runs"], "run_means": row["run_means"],
                    "failed": row["failed"],
                }
            )
    return out


def _world_run(names: list[str], ranks: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """One run of :func:`bench_world` at one world size from every rank's :func:`_rank_rows`, as :func:`aggregate_runs`
    takes a run's rows (a step's time the slowest rank's; ``state_bytes`` the largest rank's), with the sum of the
    ranks' state bytes and the largest rank's gather bytes beside."""
    rows = []
    for i, name in enumerate(names):
        per_rank = [rank[i] for rank in ranks]
        if any(r.get("dropped") for r in per_rank):  # a peer that raised on some rank: every rank dropped it
            failed = next(r["failed"] for r in per_rank if r.get("failed") is not None)
            ranks_failed = [r for r, row in enumerate(per_rank) if row.get("failed") is not None]
            rows.append({"optimizer": name, "failed": {**failed, "ranks": ranks_failed}})
            continue
        times = [max(step) * 1e3 for step in zip(*(r["times"] for r in per_rank))]
        rows.append(
            {
                "optimizer": name, "mean_ms": statistics.fmean(times), "median_ms": statistics.median(times),
                "state_bytes": None if any(r["state_bytes"] is None for r in per_rank) else max(r["state_bytes"] for r in per_rank),
                "state_bytes_sum": None if any(r["state_bytes"] is None for r in per_rank) else sum(r["state_bytes"] for r in per_rank),
                "comm_bytes": max(r["gather_bytes"] for r in per_rank), "failed": None,
                # the rank that faulted most, on the mean over its steps (None where the platform counts none)
                "fault_bytes": None if any(r.get("fault_bytes") is None for r in per_rank)
                else max(r["fault_bytes"] for r in per_rank),
            }
        )
    first = rows[0].get("mean_ms")  # None where the first failed, as in _bench_once
    for row in rows:
        if not row["failed"]:
            row["vs_first"] = _vs_first(row["mean_ms"], first)
    return rows


#: the parameter dtypes ``--dtype`` names
DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _dtype(text: str) -> torch.dtype:
    """One of :data:`DTYPES` by name."""
    if text.strip() not in DTYPES:
        raise ValueError(f"{text!r} is not one of: {', '.join(DTYPES)}")
    return DTYPES[text.strip()]


#: what ``kronopt bench`` measures when given no optimizer
BENCH_DEFAULT: tuple[str, ...] = ("torch.AdamW", "torch.Muon", "adamw", "muon", "shampoo", "soap")


@attrs.frozen(kw_only=True)
class BenchPlan:
    """What ``kronopt bench`` will run, after every argument was checked.

    Attributes:
        names: the optimizers to time, in the order named.
        params: the parameter set of the main table (``--model``'s, ``--shapes``' or the transformer-shaped one).
        counts: ``steps``, ``warmup``, ``threads``, ``seed``.
        missing: ``(name, reason)`` for each named peer that cannot be built here (not installed, …).
        widths: the ``--scaling`` widths (empty: no scaling table).
        worlds: the ``--world`` sizes (empty: one process, the interleaved table).
        device: where the one-process run steps (``--device``; ``cpu`` with ``--world``).
        ratios: the ``--ratio`` pairs ``(a, b)``, names as given (either may be a missing peer).
        alone: ``--alone``: each kronopt optimizer's matrix work replayed alone in the same runs.
        memory_steps: ``--memory``: untimed rounds after the timed ones, each step's memory counted.
        stage_steps: ``--stages``: rounds after those that split each kronopt optimizer's step by stage slot.
        dtype: ``--dtype``: every parameter's dtype (already applied to :attr:`params`; the ``--scaling`` table's
            too), ``None`` where not given.
        json: ``--json``: the file the run's record goes to (:func:`record`), ``None`` for none.
    """

    names: list[str]
    params: ParamSet
    counts: dict[str, int]
    missing: list[tuple[str, str]]
    widths: list[int]
    worlds: list[int] = attrs.field(factory=list)
    device: str = "cpu"
    ratios: list[tuple[str, str]] = attrs.field(factory=list)
    retain_freed_memory: bool = False
    alone: bool = False
    memory_steps: int = 0
    stage_steps: int = 0
    dtype: torch.dtype | None = None
    json: Path | None = None

    @property
    def shapes(self) -> tuple[tuple[int, ...], ...]:
        return self.params.shapes


def _known_peers(package: str) -> str:
    return ", ".join(n for n, p in peers.PEERS.items() if p.package == package)


def check_bench(args: argparse.Namespace) -> BenchPlan:
    """``kronopt bench``'s plan, every bad argument in one :class:`UsageError`.

    A peer whose package is not installed is not an error: it goes to
    :attr:`BenchPlan.missing` and is reported. A ``package.Class`` name of a peer
    package that is not a known peer is an error naming it and the known ones.
    """
    p = Problems()
    model = getattr(args, "model", None)
    params = ParamSet.of([])
    if model is not None:
        params = p.value("--model", model, model_params, params)
        if args.shapes is not None:
            p.add("--model", "names the parameter set, as --shapes does: give one of them")
    elif args.shapes is not None:
        params = ParamSet.of(p.value("--shapes", args.shapes, _args.shapes, []))
    else:
        d = p.integer("--d", "256" if args.d is None else args.d, minimum=1)
        layers = p.integer("--layers", "4" if args.layers is None else args.layers, minimum=1)
        params = transformer_set(d, layers)
    dtype_text = getattr(args, "dtype", None)
    dtype = None if dtype_text is None else p.value("--dtype", dtype_text, _dtype, torch.float32)
    params = ParamSet.of(params, dtype)
    grouping = getattr(args, "groups", None)
    if grouping is not None:
        if grouping.strip() in GROUPINGS:
            params = attrs.evolve(params, grouping=grouping.strip())
        else:
            p.add("--groups", f"{grouping!r} is not one of: {', '.join(GROUPINGS)}")
    for flag, given in (("--d", args.d), ("--layers", args.layers)):
        if given is not None and (model is not None or args.shapes is not None):
            p.add(flag, f"sizes the transformer-shaped set; cannot be combined with {'--model' if model is not None else '--shapes'}")
    shapes = params.shapes
    counts = {
        "steps": p.integer("--steps", _given(args, "steps"), minimum=1),
        "warmup": p.integer("--warmup", _given(args, "warmup"), minimum=0),
        "threads": p.integer("--threads", _given(args, "threads"), minimum=0, maximum=_args.MAX_THREADS),  # the rule every command shares
        "seed": p.integer("--seed", _given(args, "seed"), minimum=0, maximum=2**63 - 1),
        "repeat": p.integer("--repeat", _given(args, "repeat"), minimum=1),
    }
    widths = [] if args.scaling is None else list(dict.fromkeys(p.value("--scaling", args.scaling, lambda s: _args.integers(s, minimum=1), [])))
    world_text = getattr(args, "world", None)
    default_device = "cpu" if world_text is not None or not torch.cuda.is_available() else "cuda"
    device = p.value("--device", default_device if args.device is None else args.device, _args.device, "cpu")
    worlds: list[int] = []
    if world_text is not None:
        worlds = list(dict.fromkeys(p.value("--world", world_text, lambda s: _args.integers(s, minimum=1), [])))
        if too_many := [w for w in worlds if w > _MAX_WORLD]:
            p.add(
                "--world",
                f"at most {_MAX_WORLD} ranks here (4 × this machine's {os.cpu_count() or 1} CPUs: each rank is a "
                f"process of its own with torch loaded), got {_listed([str(w) for w in too_many])}",
            )
            worlds = [w for w in worlds if w <= _MAX_WORLD]
        if widths:
            p.add("--world", "cannot be combined with --scaling")
        if device != "cpu":
            p.add("--world", f"runs CPU processes on gloo; got --device {device} (use --device cpu)")
    set_flag = "--model" if model is not None else "--shapes" if args.shapes is not None else "--d"
    if (problem := _memory_problem(params, device)) is not None:
        p.add(set_flag, problem)
    elif (problem := _memory_problem(params, device, max(worlds, default=1))) is not None:
        p.add("--world", problem)  # the set fits one process; its ranks together do not
    if widths and (problem := _memory_problem(ParamSet.of(transformer_shapes(max(widths), 1), dtype), device)) is not None:
        p.add("--scaling", f"at d = {max(widths)}: {problem}")
    names, missing = [], []
    for name in list(args.optimizers) or list(BENCH_DEFAULT):
        if name in peers.PEERS:
            if shapes and not (peer := peers.PEERS[name]).takes(shapes):
                p.add(name, f"needs at least one {peer.matrices} shape (its main class takes no other)")
            elif (reason := peers.unavailable(name)) is not None:
                if (name, reason) not in missing:
                    missing.append((name, reason))
            elif name not in names:
                names.append(name)
        elif peers.is_import_name(name):
            if (reason := peers.unavailable_imported(name)) is not None:
                if (name, reason) not in missing:
                    missing.append((name, reason))
            elif name not in names:
                names.append(name)
        elif peers.is_peer_name(name):
            package = name.partition(".")[0]
            p.add(name, f"not a known {package} optimizer; known: {_known_peers(package)} (or a preset or TOML file)")
        elif name not in kronopt.PRESETS and not name.endswith(".toml") and not Path(name).exists():
            p.add(
                name,
                f"not a preset, a peer or a config file; presets: {', '.join(kronopt.PRESETS)}; peers: "
                f"{', '.join(peers.PEERS)}; or module:Class (an optimizer class on PYTHONPATH) or a .toml path",
            )
        else:
            p.config(name, {}, prefix=name)
            if name not in names:
                names.append(name)
    texts = getattr(args, "ratio", None) or []
    pairs = _ratio_pairs(p, texts, list(args.optimizers) or list(BENCH_DEFAULT))
    alone = bool(getattr(args, "alone", False))
    if alone and world_text is not None:
        p.add("--alone", "applies to the one-process table; cannot be combined with --world")
    memory_steps = p.integer("--memory", _given(args, "memory"), minimum=0)
    if memory_steps and world_text is not None:
        p.add("--memory", "applies to the one-process table; cannot be combined with --world")
    stage_steps = p.integer("--stages", _given(args, "stages"), minimum=0)
    if stage_steps and world_text is not None:
        p.add("--stages", "applies to the one-process table; cannot be combined with --world")
    json_path = None if getattr(args, "json", None) is None else Path(args.json).expanduser()
    if json_path is not None and (problem := _json_path_problem(json_path)) is not None:
        p.add("--json", problem)
    elif json_path is not None and (problem := _json_input_problem(json_path, args.optimizers, model)) is not None:
        p.add("--json", problem)
    p.check()
    return BenchPlan(
        names=names, params=params, counts=counts, missing=missing, widths=widths, worlds=worlds, device=device,
        ratios=pairs, retain_freed_memory=bool(getattr(args, "retain_freed_memory", False)), alone=alone,
        memory_steps=memory_steps or 0, stage_steps=stage_steps or 0, dtype=dtype, json=json_path,
    )


#: the most ranks ``--world`` runs: each is a process of its own with torch loaded (:data:`_RANK_BYTES` of memory before
#: any parameter) and threads of its own, so ranks past a few per CPU time the scheduler, not the optimizers
_MAX_WORLD = 4 * (os.cpu_count() or 1)
#: about the memory a ``--world`` rank holds before the parameter set: a Python process with torch imported and gloo
#: started (300–400 MiB here, on Linux)
_RANK_BYTES = 300 * 2**20
#: about how many copies of the parameter set the bench holds in the CPU's memory besides the optimizers' state: the
#: starting values, the four gradients' draws, and each optimizer's parameters and gradient buffers
_COPIES_HELD = 7


def _memory_problem(params: "ParamSet", device: str, ranks: int = 1) -> str | None:
    """Why the parameter set cannot be benched on this machine (its copies in the CPU's memory, :data:`_COPIES_HELD`
    on a CPU device, 2 where the work runs on another (the starting values and a draw), in each of ``ranks`` processes,
    beyond the memory the system reports), else ``None``: a set of a trillion numbers is refused here, not by the
    allocator's error midway. Where the system reports no memory size (Windows), nothing is checked."""
    try:
        memory = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None
    itemsize = max((d.itemsize for d in params.dtypes), default=4)
    copies = (_COPIES_HELD if device == "cpu" else 2) * ranks
    processes = _RANK_BYTES * ranks if ranks > 1 else 0  # the rank processes themselves (world 1 runs in this one)
    need = params.numel * itemsize * copies + processes
    if need <= memory:
        return None
    return (
        f"the parameter set holds {params.numel:,} numbers ({params.numel * itemsize / 2**30:,.1f} GiB); the bench keeps "
        f"about {copies} copies of it ({params.numel * itemsize * copies / 2**30:,.1f} GiB) besides the optimizers' state"
        + (f" in {ranks} rank processes of about {_RANK_BYTES / 2**20:.0f} MiB each before any parameter "
           f"({need / 2**30:,.1f} GiB in all)" if ranks > 1 else "")
        + f", more than this machine's {memory / 2**30:,.1f} GiB of memory"
    )


#: the defaults of the counts whose flags default to ``None`` (so that ``--compare`` can tell a flag given at its
#: default from one not given)
_COUNT_DEFAULTS = {"steps": "30", "warmup": "12", "threads": "0", "seed": "0", "repeat": "1", "memory": "0", "stages": "0"}


def _given(args: argparse.Namespace, flag: str) -> str:
    """The text of the count ``flag`` as given, else its default (``_COUNT_DEFAULTS``)."""
    value = getattr(args, flag, None)
    return _COUNT_DEFAULTS[flag] if value is None else value


def _ratio_pairs(p: Problems, texts: Sequence[str], given: Sequence[str]) -> list[tuple[str, str]]:
    """The ``--ratio A/B`` pairs: each text split at the ``/`` that leaves a named optimizer on both sides
    (a TOML file's path may hold ``/`` too); a text that no split fits is a problem naming it."""
    pairs = []
    for text in texts:
        fits = [(text[:i], text[i + 1 :]) for i, c in enumerate(text) if c == "/"]
        fits = [(a, b) for a, b in fits if a in given and b in given]
        if len(fits) != 1:
            p.add("--ratio", f"{text!r} is not A/B with A and B among the optimizers named (e.g. dykaf/soap)")
        elif fits[0] not in pairs:
            pairs.append(fits[0])
    return pairs


def _mib(n: int) -> float:
    return n / 2**20


def _where(failed: Mapping[str, Any]) -> str:
    """Where a peer failed, for the reports: ``at step 3`` (1-based, warm-up included) or ``when built``."""
    return "when built" if failed["step"] == 0 else f"at step {failed['step']}"


def _failure(failed: Mapping[str, Any], runs: int) -> str:
    """A failed peer's line in a table: where, the exception (its first line), and in how many runs."""
    text = f"failed {_where(failed)}: {(failed['error'].splitlines() or [''])[0]}"
    return text + (f" (in {failed['runs']} of {runs} runs)" if runs > 1 else "")


def _print_table(rows: list[dict[str, Any]]) -> None:
    width = max(14, *(len(r["optimizer"]) for r in rows))
    first = f"× {rows[0]['optimizer']}"
    spread = rows[0].get("runs", 1) > 1  # several runs: the ratio's range over them, last
    memory = any(r.get("step_bytes") is not None for r in rows)  # --memory: the most one step held at once
    faults = any(r.get("fault_bytes") is not None for r in rows)  # pages a step took fresh from the system
    header = f"{'optimizer':<{width}} {'mean ms':>9} {'median ms':>10} {first:>{max(12, len(first))}} {'state MiB':>10}"
    header += f" {'step MiB':>9}" if memory else ""
    header += f" {'faults MiB':>10}" if faults else ""
    header += f" {'× range':>11}" if spread else ""
    print(header)
    print("-" * len(header))
    for r in rows:
        if r.get("failed"):
            print(f"{r['optimizer']:<{width}} {_failure(r['failed'], r.get('runs', 1))}")
            continue
        vs = "-" if r["vs_first"] is None else f"{r['vs_first']:.2f}"  # none when the first optimizer failed
        line = (
            f"{r['optimizer']:<{width}} {r['mean_ms']:>9.3f} {r['median_ms']:>10.3f} "
            f"{vs:>{max(12, len(first))}} {_mib_cell(r['state_bytes'], 10)}"
        )
        if memory:
            line += " " + _mib_cell(r.get("step_bytes"), 9)
        if faults:
            line += _faults_cell(r)
        if spread:
            spread_text = "-" if r["vs_first_range"] is None else "{:.2f}–{:.2f}".format(*r["vs_first_range"])
            line += f" {spread_text:>11}"
        print(line)


def _print_stages(rows: list[dict[str, Any]], rounds: int, device: str) -> None:
    """The ``--stages`` table: each kronopt optimizer's clocked step split by stage slot, ms and share."""
    split = [r for r in rows if r.get("stages") is not None]
    print()
    waits = "" if device == "cpu" else "; the device waited for at each stage's edges"
    print(
        f"where the step goes (--stages: {rounds} more round{'s' if rounds != 1 else ''}, each step split by stage "
        f"slot{waits}): mean ms per step "
        f"and share of the clocked step; {stage_times.OWN}: the gradients' stacking and checks, the state writes, "
        "bookkeeping and Python around the stages"
    )
    if not split:
        print("no kronopt optimizer to split (peers are not split)")
        return
    columns = stage_times.SHARES
    width = max(14, *(len(r["optimizer"]) for r in split))
    header = f"{'optimizer':<{width}} {'step ms':>9} " + " ".join(f"{c:>16}" for c in columns)
    print(header)
    print("-" * len(header))
    for r in split:
        s = r["stages"]
        total = s["step_ms"]
        cells = [f"{s[c]:>8.3f} ({100 * s[c] / total if total > 0 else 0:3.0f} %)" for c in columns]
        print(f"{r['optimizer']:<{width}} {total:>9.3f} " + " ".join(f"{c:>16}" for c in cells))


def _timed_pairs(plan: BenchPlan) -> list[tuple[str, str]]:
    """The ``--ratio`` pairs whose two optimizers were timed (a peer not installed was not)."""
    return [pair for pair in plan.ratios if all(n in plan.names for n in pair)]


def _print_ratios(rows: list[dict[str, Any]], plan: BenchPlan, where: str = "") -> None:
    timed = _timed_pairs(plan)
    runs = rows[0].get("runs", 1) if rows else 1  # no rows: nothing was timed, every pair is not measured
    print()
    spread = f": median of {runs} runs (lowest–highest)" if runs > 1 else ""
    print(f"ratios of the mean step time{where}, each run's own{spread}")
    labels = [f"{a} / {b}" for a, b in plan.ratios]
    width = max(len(label) for label in labels)
    found = {r["pair"]: r for r in ratios(rows, timed)}
    by_name = {r["optimizer"]: r for r in rows}
    for (a, b), label in zip(plan.ratios, labels):
        r = found.get((a, b))
        if r is None:
            absent = ", ".join(n for n in (a, b) if n not in plan.names)
            print(f"{label:<{width}}  not measured ({absent} not timed here)")
            continue
        if r["failed"]:
            why = ", ".join(f"{n} failed {_where(by_name[n]['failed'])}" for n in r["failed"])
            print(f"{label:<{width}}  no figure ({why})")
            continue
        lo, hi = r["range"]
        print(f"{label:<{width}}  {r['ratio']:.3f}" + (f" ({lo:.3f}–{hi:.3f})" if runs > 1 else ""))


def matrix_work_ratios(rows: Sequence[dict[str, Any]], names: Sequence[str]) -> dict[str, dict[str, Any] | None]:
    """Per kronopt optimizer of ``names``: its step's mean over its matrix work's replayed alone in the same
    runs (:func:`bench`'s rows holding both, :func:`replay_makers`), run by run as :func:`ratios` takes it,
    with ``alone_ms`` (the replay's mean, the median over the runs); ``None`` for one whose steps recorded
    no matrix work."""
    by_name = {r["optimizer"]: r for r in rows}
    out: dict[str, dict[str, Any] | None] = {}
    for n in names:
        if alone_name(n) not in by_name:
            out[n] = None
            continue
        (ratio,) = ratios(rows, [(n, alone_name(n))])
        out[n] = {**ratio, "alone_ms": by_name[alone_name(n)]["mean_ms"]}
    return out


def _print_matrix_work(rows: list[dict[str, Any]], recorded: Mapping[str, list]) -> None:
    found = matrix_work_ratios(rows, list(recorded))
    print()
    if not found:
        print("matrix work alone: no kronopt optimizer named, nothing replayed (other libraries' work is not recorded)")
        return
    runs = rows[0].get("runs", 1)
    print(
        "matrix work alone: the same products, eigh and QR replayed without kronopt's other work, in the same "
        "rounds as the steps; the step's mean over the replay's, each run's own"
        + (f": median of {runs} runs (lowest–highest)" if runs > 1 else "")
    )
    width = max(14, *(len(n) for n in found))
    header = f"{'optimizer':<{width}} {'alone mean ms':>14}  step / alone"
    print(header)
    print("-" * len(header))
    for n, r in found.items():
        if r is None:
            print(f"{n:<{width}} {'-':>14}  no matrix work recorded")
            continue
        lo, hi = r["range"]
        print(f"{n:<{width}} {r['alone_ms']:>14.3f}  {r['ratio']:.3f}" + (f" ({lo:.3f}–{hi:.3f})" if runs > 1 else ""))


def _print_alone(table: list[dict[str, Any]], runs: int) -> None:
    names = list(table[0].get("alone", {}))
    if not names:
        return
    print()
    print("matmul alone: ms per step of the same batched products, eigh and QR replayed without kronopt's other work, "
          "interleaved with the steps, and the step's mean over it"
          + (f", each run's own: median of {runs} runs (lowest–highest)" if runs > 1 else ""))

    def cell(r: dict[str, Any] | None) -> str:
        if r is None or not r["alone_ms"] > 0:
            return "-"
        lo, hi = r["range"]
        return f"{r['alone_ms']:.4g} (step {r['ratio']:.2f}×" + (f", {lo:.2f}–{hi:.2f})" if runs > 1 else ")")

    cols = [max(len(n) + 8, 20 if runs == 1 else 34) for n in names]
    header = f"{'d':>6} " + " ".join(f"{n + ' alone':>{w}}" for n, w in zip(names, cols))
    print(header)
    print("-" * len(header))
    for entry in table:
        cells = [cell(entry["matrix_work"][n]) for n in names]
        print(f"{entry['d']:>6} " + " ".join(f"{c:>{w}}" for c, w in zip(cells, cols)))


def _print_scaling(table: list[dict[str, Any]], dtype: torch.dtype | None = None) -> None:
    names = [r["optimizer"] for r in table[0]["rows"]]
    runs = table[0]["rows"][0].get("runs", 1)
    kind = str(dtype or torch.float32).removeprefix("torch.")
    print(f"scaling: one-layer transformer-shaped set ({kind}), mean ms per step (refreshes included) and × {names[0]}"
          + (f"; medians of {runs} runs, each ratio taken run by run (lowest–highest)" if runs > 1 else ""))

    def cell(r: dict[str, Any]) -> str:
        if r.get("failed"):
            return f"failed {_where(r['failed'])}"
        if r["vs_first"] is None:  # the first optimizer failed at this width
            return f"{r['mean_ms']:.4g} (-)"
        if runs == 1:
            return f"{r['mean_ms']:.4g} ({r['vs_first']:.2f}×)"
        lo, hi = r["vs_first_range"]
        return f"{r['mean_ms']:.4g} ({r['vs_first']:.2f}×, {lo:.2f}–{hi:.2f})"

    cols = [max(len(n), 16 if runs == 1 else 28) for n in names]
    header = f"{'d':>6} " + " ".join(f"{n:>{w}}" for n, w in zip(names, cols))
    print(header)
    print("-" * len(header))
    for entry in table:
        print(f"{entry['d']:>6} " + " ".join(f"{cell(r):>{w}}" for r, w in zip(entry["rows"], cols)))
    failures = [(entry["d"], r) for entry in table for r in entry["rows"] if r.get("failed")]
    if failures:
        print()
        for d, r in failures:
            print(f"{r['optimizer']} at d = {d}: {_failure(r['failed'], runs)}")
    _print_alone(table, runs)


def _print_world(rows: list[dict[str, Any]]) -> None:
    width = max(14, *(len(r["optimizer"]) for r in rows))
    faults = any(r.get("fault_bytes") is not None for r in rows)  # pages a step took fresh from the system
    header = (
        f"{'world':>5} {'optimizer':<{width}} {'median ms':>10} {'mean ms':>9} "
        f"{'state MiB/rank max':>18} {'sum':>9} {'comm KiB/step/rank':>18}" + (f" {'faults MiB':>10}" if faults else "")
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        if r.get("failed"):
            where = "" if r["world"] == 1 else f" (on rank {', '.join(map(str, r['failed']['ranks']))})"
            print(f"{r['world']:>5} {r['optimizer']:<{width}} {_failure(r['failed'], r.get('runs', 1))}{where}")
            continue
        line = (
            f"{r['world']:>5} {r['optimizer']:<{width}} {r['median_ms']:>10.3f} {r['mean_ms']:>9.3f} "
            f"{_mib_cell(r['state_bytes_max'], 18)} {_mib_cell(r['state_bytes_sum'], 9)} {r['comm_bytes'] / 2**10:>18.1f}"
        )
        if faults:
            line += _faults_cell(r)
        print(line)


def _cmd_world(plan: BenchPlan, retained: bool, load: float | None) -> int:
    counts = plan.counts
    rows = bench_world(
        plan.names, plan.params, worlds=plan.worlds, steps=counts["steps"], warmup=counts["warmup"],
        threads=counts["threads"], seed=counts["seed"], retain_freed_memory=plan.retain_freed_memory,
        repeat=counts["repeat"],
    )
    threads = ", ".join(f"{r['threads']} at world {r['world']}" for r in rows[:: len(plan.names)])
    loads = (load, _load_average())
    print(
        f"{_describe(plan.params)}, CPU processes on gloo, "
        f"{counts['steps']} timed steps after {counts['warmup']} warm-up (interleaved; a step: the slowest rank), "
        f"threads per rank: {threads}, torch {torch.__version__}"
        + (f"; medians of {counts['repeat']} runs" if counts["repeat"] > 1 else "")
        + _load_note(*loads) + _memory_note(plan, retained)
    )
    _print_world(rows)
    if plan.ratios:
        for world in plan.worlds:
            _print_ratios([r for r in rows if r["world"] == world], plan, where=f" at world {world}")
    if plan.params.source:
        _print_routing(plan)
    if plan.json is not None:
        found = {str(w): ratios([r for r in rows if r["world"] == w], _timed_pairs(plan)) for w in plan.worlds}
        results = {"world": rows, "ratios": found}
        _write_record(plan, record(plan, results, threads=counts["threads"], load=loads, retained=retained))
    return 0


def routing(name: str, params: ParamSet) -> dict[str, tuple[int, int]]:
    """Where the kronopt optimizer ``name`` (a preset or config file) sends the parameters of ``params``, as its
    route decides by their names and dimensions (:meth:`kronopt.config.KronConfig.to_fallback`): ``"pipeline"``
    and, where any go there, ``"fallback"``, each ``(parameters, numbers)``."""
    cfg = kronopt.resolve(name)
    out: dict[str, tuple[int, int]] = {}
    for shape, pname in zip(params.shapes, params.names):
        where = "fallback" if cfg.to_fallback(len(shape), pname) else "pipeline"
        count, numel = out.get(where, (0, 0))
        out[where] = (count + 1, numel + int(torch.Size(shape).numel()))
    return {where: out[where] for where in ("pipeline", "fallback") if where in out}


def _print_routing(plan: BenchPlan) -> None:
    """Where each kronopt optimizer sends the model's parameters (``--model``: their names decide)."""
    ours = [n for n in plan.names if not _is_peer(n)]
    if not ours:
        return
    print("\nrouting: the parameters each kronopt optimizer preconditions (pipeline) and hands to its [fallback]")
    width = max(len(n) for n in ours)
    for name in ours:
        parts = [f"{where} {count} ({numel / 1e6:.2f} M numbers)" for where, (count, numel) in routing(name, plan.params).items()]
        print(f"{name:<{width}}  {', '.join(parts)}")


def _describe(params: ParamSet) -> str:
    """The report's words for the parameter set: its size, where it came from, its param groups (``--groups``, where
    not one) and its dtypes where not float32."""
    text = f"{len(params.shapes)} parameters, {params.numel / 1e6:.2f} M numbers"
    if params.source:
        text += f" ({params.source})"
    if params.grouping != "one":
        count = len(param_groups(params))
        text += f", {count} param group{'s' if count != 1 else ''} (--groups {params.grouping})"
    dtypes = sorted({str(d).removeprefix("torch.") for d in params.dtypes})
    return text if dtypes == ["float32"] else f"{text}, {'/'.join(dtypes)}"


def _load_average() -> float | None:
    """The machine's load average over the last minute (``None`` where the OS gives none, e.g. Windows)."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def _load_note(before: float | None, after: float | None) -> str:
    """The header's load averages at the start and the end of the timing: other work on the machine slows
    the steps (memory-bound ones first), so figures from runs under different load do not compare."""
    if before is None or after is None:
        return ""
    return f"; load average {before:.1f} at the start, {after:.1f} at the end"


def _memory_note(plan: BenchPlan, retained: bool) -> str:
    """The header's account of ``--retain-freed-memory`` (empty without it); ``retained``: what
    :func:`kronopt.malloc.retain_freed_memory` returned in this process."""
    if not plan.retain_freed_memory:
        return ""
    if retained:
        return "; freed memory retained (glibc, kronopt.malloc)"
    if malloc._glibc() is None:
        return "; --retain-freed-memory: not glibc, nothing changed"
    return "; --retain-freed-memory: glibc refused the setting"


def cmd_bench(args: argparse.Namespace) -> int:
    if getattr(args, "compare", None) is not None:
        return _cmd_compare(args)
    plan = check_bench(args)
    for name, reason in plan.missing:
        print(f"{name}: {reason}")
    if not plan.names:  # nothing to time: the record says so (its rows empty, the peers missing named)
        if plan.ratios:
            for world in plan.worlds or [None]:
                _print_ratios([], plan, where="" if world is None else f" at world {world}")
        if plan.json is not None:
            if plan.worlds:  # a --world record all the same, which pairs with other --world records
                empty = {"world": [], "ratios": {str(w): [] for w in plan.worlds}}
            else:
                empty = {"rows": [], "ratios": [], "matrix_work": None, "scaling": []}
            threads = plan.counts["threads"] if plan.worlds else plan.counts["threads"] or torch.get_num_threads()
            _write_record(plan, record(plan, empty, threads=threads, load=(_load_average(),) * 2, retained=False))
        return 0
    # this process: the one-process table and world size 1 (each other rank makes it itself)
    retained = plan.retain_freed_memory and malloc.retain_freed_memory()
    load = _load_average()
    if plan.worlds:
        return _cmd_world(plan, retained, load)
    counts = plan.counts
    threads = torch.get_num_threads()
    if counts["threads"]:
        torch.set_num_threads(counts["threads"])
    timing = dict(steps=counts["steps"], warmup=counts["warmup"], device=plan.device, seed=counts["seed"])
    try:
        recorded, makers = {}, {}
        if plan.alone:
            recorded, makers = replay_makers(
                plan.names, plan.params, steps=counts["warmup"] + counts["steps"], device=plan.device, seed=counts["seed"]
            )
        every = bench(
            [*plan.names, *makers], plan.params, **timing, repeat=counts["repeat"], makers=makers,
            memory_steps=plan.memory_steps, stage_steps=plan.stage_steps,
        )
        rows = every[: len(plan.names)]
        table = scaling(
            plan.names, plan.widths, **timing, repeat=counts["repeat"], dtype=plan.dtype, grouping=plan.params.grouping
        ) if plan.widths else []
    finally:
        torch.set_num_threads(threads)
    loads = (load, _load_average())
    print(
        f"{_describe(plan.params)}, device {plan.device}, "
        f"{counts['steps']} timed steps after {counts['warmup']} warm-up (interleaved), "
        f"{counts['threads'] or threads} threads, torch {torch.__version__}"
        + (f"; medians of {counts['repeat']} runs" if counts["repeat"] > 1 else "")
        + _load_note(*loads) + _memory_note(plan, retained)
    )
    _print_table(rows)
    if plan.params.source:
        _print_routing(plan)
    if plan.ratios:
        _print_ratios(rows, plan)
    if plan.alone:
        _print_matrix_work(every, recorded)
    if plan.stage_steps:
        _print_stages(rows, plan.stage_steps, plan.device)
    if table:
        print()
        _print_scaling(table, plan.dtype)
    if plan.json is not None:
        results = {
            "rows": rows, "ratios": ratios(rows, _timed_pairs(plan)),
            "matrix_work": matrix_work_ratios(every, list(recorded)) if plan.alone else None, "scaling": table,
        }
        _write_record(plan, record(plan, results, threads=counts["threads"] or threads, load=loads, retained=retained))
    return 0


def record(
    plan: BenchPlan, results: Mapping[str, Any], *, threads: int, load: tuple[float | None, float | None],
    retained: bool,
) -> dict[str, Any]:
    """The record ``--json`` writes: what was run (``settings``: the optimizers, the parameter set, ``--dtype``, the
    counts, ``groups`` (``--groups``), the threads (under ``--world`` the ``--threads`` given, 0 for the default: each
    world size's are in its rows), the device, the ``--ratio`` pairs asked for, the peers missing, and for a model's parameters where each
    kronopt optimizer routes them, :func:`routing`), on what (``versions``,
    ``machine``), when it was written (``time``, UTC: the end of the run), the load average at the start and the end
    (as the header gives them), and the ``results`` as the tables
    print them (:func:`bench`'s or :func:`bench_world`'s rows, :func:`ratios`, :func:`matrix_work_ratios`,
    :func:`scaling`), in plain JSON: tuples as lists, a figure that is not finite as ``null``."""
    params = plan.params
    settings = {
        "optimizers": list(plan.names), "missing": {name: reason for name, reason in plan.missing},
        "params": {
            "count": len(params.shapes), "numbers": params.numel, "source": params.source or None,
            "shapes": [list(s) for s in params.shapes],
            "dtypes": [str(d).removeprefix("torch.") for d in params.dtypes],
        },
        "dtype": None if plan.dtype is None else str(plan.dtype).removeprefix("torch."),
        "groups": params.grouping,
        **{k: plan.counts[k] for k in ("steps", "warmup", "seed", "repeat")},
        "threads": threads, "device": plan.device, "worlds": list(plan.worlds), "widths": list(plan.widths),
        "ratios": [list(pair) for pair in plan.ratios], "alone": plan.alone, "memory_steps": plan.memory_steps,
        "stage_steps": plan.stage_steps,
        "retain_freed_memory": {"asked": plan.retain_freed_memory, "retained": bool(retained)},
        "routing": {
            n: {where: {"parameters": count, "numbers": numel} for where, (count, numel) in routing(n, params).items()}
            for n in plan.names if not _is_peer(n)
        } if params.source else None,
        # each kronopt optimizer's resolved config, by a digest: two runs of one file name that held other configs differ
        "configs": {n: _config_digest(n) for n in plan.names if not _is_peer(n)},
    }
    processor = linalg._processor()
    return _plain_json({
        "format": "kronopt-bench/1",
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "versions": {
            "kronopt": kronopt.__version__, "kronopt_source": _source_digest(), "torch": torch.__version__,
            "python": sys.version.split()[0],
        },
        "machine": {"processor": processor.name or None, "vendor": processor.vendor or None, "cpus": os.cpu_count()},
        "settings": settings,
        "load_average": {"start": load[0], "end": load[1]},
        "results": dict(results),
    })


def _config_digest(name: str) -> str:
    """The first 12 hex digits of the SHA-256 of a preset's or config file's resolved config as TOML."""
    return hashlib.sha256(kronopt.dumps(kronopt.resolve(name)).encode()).hexdigest()[:12]


def _source_digest() -> str:
    """The first 12 hex digits of the SHA-256 of kronopt's own Python files (their paths and bytes): records of two
    commits of one version tell apart."""
    root = Path(kronopt.__file__).parent
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:12]


def _plain_json(value: Any) -> Any:
    """``value`` with its tuples as lists, its mappings' keys as strings and its floats that are not finite
    (a ratio over a zero time) as ``None``: what ``json`` writes without its non-standard ``NaN``."""
    if isinstance(value, Mapping):
        return {str(k): _plain_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain_json(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _write_record(plan: BenchPlan, data: dict[str, Any]) -> None:
    """``--json``: the record (:func:`record`) into its file (through a link, into the link's target), written
    whole or not at all: into a temporary file of its own beside it, moved into place once complete, and
    removed if anything fails on the way."""
    assert plan.json is not None
    text = json.dumps(data, indent=1, allow_nan=False) + "\n"
    target = plan.json.resolve()
    fd, scratch = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".partial")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        # the mode of the file it replaces, else the one a new file takes under the user's umask (mkstemp's is 0600)
        os.chmod(scratch, target.stat().st_mode & 0o7777 if target.exists() else 0o666 & ~_umask())
        os.replace(scratch, target)
    except BaseException:
        Path(scratch).unlink(missing_ok=True)
        raise
    print(f"\nrecord written to {plan.json}")


def _umask() -> int:
    """The process's file mode creation mask (read by setting it, then set back)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _json_path_problem(path: Path) -> str | None:
    """Why ``--json`` could not write ``path`` after the run (checked before it: a folder, or a special file such
    as ``/dev/null``, which the record's move into place would replace, or a folder that is missing or takes no
    new file), or ``None``."""
    target = path.resolve()
    if target.is_dir():
        return f"{str(path)!r} is a folder; give the file to write"
    if target.exists() and not target.is_file():
        return f"{str(path)!r} is not a regular file"
    if not target.parent.is_dir():
        return f"{str(target.parent)!r} is not a folder: the file could not be written after the run"
    try:
        with tempfile.NamedTemporaryFile(dir=target.parent, prefix=f".{target.name}.", suffix=".partial"):
            pass
    except OSError as exc:
        why = exc.strerror or exc
        return f"cannot write in {str(target.parent)!r} ({why}): the file could not be written after the run"
    return None


def _model_inputs(spec: str) -> tuple[list[Path], list[Path]]:
    """The files and folders ``--model spec`` reads (:func:`model_params`), as far as its text tells: a checkpoint
    file, with the shards an index names and a ``torch.distributed.checkpoint``'s folder; a folder, a cached Hub
    model's snapshot; a ``path/to/nets.py:factory``'s file. Returns ``(files, folders)``, neither resolved."""
    local = Path(os.path.expanduser(spec))
    files: list[Path] = []
    folders: list[Path] = []
    if _is_folder(str(local)):
        folders.append(local)
    elif _exists(str(local)):
        files.append(local)
        name = local.name.lower()
        if _is_dcp_metadata(name):
            folders.append(local.parent)
        elif name.endswith(".index.json"):
            try:
                shards = json.loads(local.read_bytes()).get("weight_map") or {}
                files += [local.parent / shard for shard in dict.fromkeys(shards.values()) if isinstance(shard, str)]
            except (OSError, ValueError, AttributeError):  # model_params says what is wrong with it
                pass
    elif (in_file := _IN_FILE.match(spec)) is not None:
        files.append(Path(os.path.expanduser(in_file["path"])))
    else:
        try:
            snapshot = _hub_snapshot(spec)
        except ValueError:
            snapshot = None
        if snapshot is not None:
            folders.append(snapshot)
    return files, folders


def _json_input_problem(path: Path, optimizers: Sequence[str], model: str | None) -> str | None:
    """Why ``--json path`` would overwrite one of the run's own inputs (a config file named as an optimizer, a
    file ``--model`` reads or one inside the folder it reads), else ``None``: the record is written after the run,
    in place of the file, and the run could not be made again. Paths are compared as the file system resolves
    them (a link, ``..``, a second name of one file)."""
    if not path.exists():  # a new file overwrites nothing
        return None
    target = path.resolve()

    def same(other: Path) -> bool:
        try:
            return other.is_file() and os.path.samefile(target, other)
        except (OSError, ValueError):
            return False

    for name in optimizers:
        if not (name in kronopt.PRESETS or _is_peer(name)) and same(Path(name).expanduser()):
            return f"{str(path)!r} is the config file {name!r} this run benches: the record would overwrite it"
    if model is not None:
        files, folders = _model_inputs(model)
        for file in files:
            if same(file):
                return f"{str(path)!r} is a file --model {model} reads: the record would overwrite it"
        # the path as named (its folder resolved, not the link it may be: a Hugging Face cache's snapshot file is a
        # link into the cache's blobs) and as the file system resolves it
        named = path.expanduser().absolute().parent.resolve() / path.name
        for folder in folders:
            try:
                inside = any(t.is_relative_to(folder.resolve()) for t in (target, named))
            except (OSError, ValueError):
                inside = False
            if inside:
                return f"{str(path)!r} is inside the folder --model {model} reads: the record would overwrite its file"
    return None


#: the flags that set a run: ``--compare`` reads two records and runs nothing, so none may be given, even at its
#: default value (each defaults to ``None``, or ``False`` for a switch, so that a given one is told apart)
_RUN_FLAGS = (
    "d", "layers", "shapes", "model", "dtype", "groups", "steps", "warmup", "scaling", "world", "device", "threads", "seed",
    "repeat", "ratio", "alone", "memory", "stages", "json", "retain_freed_memory",
)


def read_record(path: Path) -> dict[str, Any]:
    """A record ``--json`` wrote (:func:`record`), read back; ``ValueError`` naming what is wrong with it."""
    try:
        data = json.loads(Path(path).expanduser().read_text(encoding="utf-8"))
    except OSError as exc:
        raise ValueError(f"cannot read {str(path)!r}: {exc.strerror or exc}") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{str(path)!r} is not JSON ({exc.msg}, line {exc.lineno})") from None
    except UnicodeDecodeError as exc:
        raise ValueError(f"{str(path)!r} is not a text file ({exc.reason} at byte {exc.start})") from None
    if not isinstance(data, dict) or data.get("format") != "kronopt-bench/1":
        raise ValueError(f"{str(path)!r} is not a kronopt bench record (written by kronopt bench --json)")
    if (problem := _record_problem(data)) is not None:
        raise ValueError(f"{str(path)!r} is not a well-formed kronopt bench record: {problem}")
    return data


def _record_problem(data: Mapping[str, Any]) -> str | None:
    """What in a record's figures :func:`compare_records` could not read (an edited or truncated file), else ``None``:
    each row an optimizer's name with numbers (or ``null``) for its figures, each ratio a pair of two names."""
    number = (int, float, type(None))
    for part in ("settings", "versions", "machine", "load_average", "results"):
        if not isinstance(data.get(part) or {}, Mapping):
            return f"its {part!r} is not a mapping"
    try:
        rows = [*_rows_of(data).values(), *(r for r, _ in _scaling_of(data).values())]
        pairs = list(_ratios_of(data).values())
        _work_of(data)
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as exc:
        return f"its results do not have the shape kronopt bench --json writes ({type(exc).__name__}: {exc})"
    if (problem := _settings_problem(data.get("settings") or {})) is not None:
        return problem
    if (problem := _results_problem(_results(data))) is not None:
        return problem
    for r in rows:
        if not isinstance(r, Mapping) or not isinstance(r.get("optimizer"), str):
            return f"a row without an optimizer's name: {_shown(r)}"
        bad = [k for k in ("mean_ms", "median_ms", "state_bytes") if isinstance(r.get(k), bool) or not isinstance(r.get(k), number)]
        if bad:
            return f"the row of {r['optimizer']!r} holds no number for {', '.join(bad)}"
        split = r.get("stages")
        if split is not None and (
            not isinstance(split, Mapping)
            or any(isinstance(split.get(k), bool) or not isinstance(split.get(k), (int, float)) for k in _STAGE_COLUMNS)
        ):
            return f"the --stages split of {r['optimizer']!r} is not a number for each of {', '.join(_STAGE_COLUMNS)}: {_shown(split)}"
    for r in pairs:
        if isinstance(r.get("ratio"), bool) or not isinstance(r.get("ratio"), number) or not _is_pair(r["pair"]):
            return f"a --ratio entry that is not a pair of two names with a number: {_shown(r)}"
    return None


def _is_pair(value: Any) -> bool:
    """Whether ``value`` is a pair of two optimizers' names, as a record writes one (a list of two strings)."""
    return isinstance(value, (list, tuple)) and len(value) == 2 and all(isinstance(n, str) for n in value)


def _is_count(value: Any) -> bool:
    """Whether ``value`` is a whole number ≥ 1 (a width, a world size; a ``bool`` is none)."""
    return type(value) is int and value >= 1


def _settings_problem(settings: Mapping[str, Any]) -> str | None:
    """What in a record's ``settings`` the comparison reads and could not (the optimizers, the ``--ratio`` pairs
    asked, the world sizes, each a list of its own kind), else ``None``."""
    optimizers = settings.get("optimizers") or []
    if not isinstance(optimizers, list) or not all(isinstance(n, str) for n in optimizers):
        return f"its settings.optimizers is not a list of names: {_shown(optimizers)}"
    asked = settings.get("ratios") or []
    if not isinstance(asked, list) or not all(_is_pair(q) for q in asked):
        return f"its settings.ratios is not a list of pairs of two names: {_shown(asked)}"
    worlds = settings.get("worlds") or []
    if not isinstance(worlds, list) or not all(_is_count(w) for w in worlds):
        return f"its settings.worlds is not a list of world sizes: {_shown(worlds)}"
    return None


def _results_problem(results: Mapping[str, Any]) -> str | None:
    """What in a record's ``results`` the comparison could not read beside its rows' figures
    (:func:`_record_problem`), else ``None``: a one-process table's rows with no ``world``, a ``--world`` table's
    each with its world size, each ``--scaling`` width a whole number, each ``--alone`` entry (the top level's
    and each width's) ``null`` or a mapping whose ratio and replay's mean are numbers."""
    main = results.get("rows")
    if isinstance(main, list) and main and results.get("world"):
        return "its results hold both a one-process table (rows) and a --world table (world)"
    if isinstance(main, list):
        placed = [r for r in main if isinstance(r, Mapping) and "world" in r]
        if placed:
            return f"a row of the one-process table with a world size: {_shown(placed[0])}"
    world = results.get("world")
    found = results.get("ratios")
    if world is not None and found and not isinstance(found, Mapping):
        return f"its --world table's ratios are not by world size: {_shown(found)}"
    if world is None and found and isinstance(found, Mapping):
        return f"its one-process table's ratios are by world size: {_shown(found)}"
    if isinstance(world, list):
        unplaced = [r for r in world if isinstance(r, Mapping) and not _is_count(r.get("world"))]
        if unplaced:
            return f"a row of the --world table without a world size (a whole number ≥ 1): {_shown(unplaced[0])}"
    works = [("matrix_work", results.get("matrix_work"))]
    for entry in results.get("scaling") or [] if isinstance(results.get("scaling"), list) else []:
        if not isinstance(entry, Mapping):
            return f"a --scaling entry that is not a mapping: {_shown(entry)}"
        if not _is_count(entry.get("d")):
            return f"a --scaling entry whose width d is not a whole number ≥ 1: {_shown(entry.get('d'))}"
        works.append((f"matrix_work at d = {entry['d']}", entry.get("matrix_work")))
    for where, work in works:
        if work is None:
            continue
        if not isinstance(work, Mapping):
            return f"its {where} is not a mapping of optimizers to figures: {_shown(work)}"
        for name, entry in work.items():
            if entry is None:
                continue
            if not isinstance(entry, Mapping):
                return f"its {where} entry of {name!r} is not a mapping: {_shown(entry)}"
            bad = [
                k for k in ("ratio", "alone_ms") if isinstance(entry.get(k), bool)
                or not isinstance(entry.get(k), (int, float, type(None)))
            ]
            if bad:
                return f"its {where} entry of {name!r} holds no number for {', '.join(bad)}"
    return None


def compare_records(a: Mapping[str, Any], b: Mapping[str, Any]) -> dict[str, Any]:
    """Two records (:func:`record`) side by side: ``rows``, per optimizer (and world size, for ``--world``
    records) in either, its mean and median ms in each (``None`` where it has none), ``b_over_a``, the ratio of
    the means, and ``a_state``/``b_state``: ``"failed"`` where the optimizer failed in that record, ``"absent"``
    where the record did not time it, else ``None``; ``ratios``, per ``--ratio`` pair in either, each record's
    figure and state alike (``"failed"``: a record's pair has no figure because one of its two failed;
    ``"unmeasured"``: the record asked for the pair and did not time one of its two, at each of its world sizes);
    ``scaling``, per width and optimizer of either record's ``--scaling`` table, the same figures as ``rows`` and
    ``a_work``/``b_work``, the step's mean over its matrix work alone (``None`` where the record has none);
    ``scaling`` ordered by width; ``matrix_work``, per optimizer of either record's ``--alone`` table, ``a``/``b``, its
    step over its matrix work, ``a_alone_ms``/``b_alone_ms``, the replay's mean, and ``a_state``/``b_state``:
    ``"absent"`` where the record did not ask for ``--alone``, ``"unrun"`` where it did and did not time the
    optimizer, ``"none"`` where it did and has no figure (no matrix work recorded, or a replay too short to time),
    else ``None``; ``stages``, per optimizer of either record's one-process table (none where neither asked for
    ``--stages``), ``a``/``b``, its split by stage slot (:func:`bench`'s ``stages``), and ``a_state``/``b_state`` as
    ``matrix_work``'s (``"none"``: a peer); ``differences``, the settings (a mapping's entries
    one by one, as ``settings.params.shapes``), versions, machine and load averages that differ, ``(a, b)`` by name.

    Figures from two runs compare only as well as the runs' conditions do: the load averages are among the
    differences, and a ratio taken within each run (``--ratio``, a step over its matrix work) is the steadier
    figure to compare."""
    rows = [
        {"world": k[0], "optimizer": k[1], **_paired_means(ra, rb)} for k, ra, rb in _paired(_rows_of(a), _rows_of(b))
    ]
    pairs = []
    asked_a, asked_b = _ratios_of(a, asked=True), _ratios_of(b, asked=True)
    for k, ra, rb in _paired(asked_a, asked_b):
        pairs.append({"world": k[0], "pair": (k[1], k[2]), "a": (ra or {}).get("ratio"), "b": (rb or {}).get("ratio"),
                      "a_state": _ratio_state(k in asked_a, ra), "b_state": _ratio_state(k in asked_b, rb)})
    scaling = []
    for k, ra, rb in _paired(_scaling_of(a), _scaling_of(b)):
        (ra, wa), (rb, wb) = ra or (None, None), rb or (None, None)
        scaling.append({"d": k[0], "optimizer": k[1], **_paired_means(ra, rb),
                        "a_work": (wa or {}).get("ratio"), "b_work": (wb or {}).get("ratio")})
    scaling.sort(key=lambda r: r["d"])  # a width only B has among A's (stable: the optimizers keep their order)
    work = []
    for name, wa, wb in _paired(_work_of(a), _work_of(b)):
        work.append({"optimizer": name, "a": (wa or {}).get("ratio"), "b": (wb or {}).get("ratio"),
                     "a_alone_ms": (wa or {}).get("alone_ms"), "b_alone_ms": (wb or {}).get("alone_ms"),
                     "a_state": _work_state(a, wa, name), "b_state": _work_state(b, wb, name)})
    stages = []
    for k, ra, rb in _paired(_rows_of(a), _rows_of(b)):
        if k[0] is None:  # --stages applies to the one-process table
            stages.append({"optimizer": k[1], "a": (ra or {}).get("stages"), "b": (rb or {}).get("stages"),
                           "a_state": _stages_state(a, ra), "b_state": _stages_state(b, rb)})
    if all(r["a_state"] == r["b_state"] == "absent" for r in stages):
        stages = []
    differences: dict[str, tuple[Any, Any]] = {}
    for part in ("settings", "versions", "machine", "load_average"):
        left, right = a.get(part) or {}, b.get(part) or {}
        if part == "settings":  # a record written before a setting existed ran without it
            left, right = {**_SETTINGS_BEFORE, **left}, {**_SETTINGS_BEFORE, **right}
        _differences(differences, part, left, right, depth=2)
    return {"rows": rows, "ratios": pairs, "scaling": scaling, "matrix_work": work, "stages": stages, "differences": differences}


#: the settings a record written before they existed ran with: ``--stages`` unasked, every parameter in one group
_SETTINGS_BEFORE: dict[str, Any] = {"stage_steps": 0, "groups": "one"}

#: the figures of a ``--stages`` split, as a row of a record holds them
_STAGE_COLUMNS: tuple[str, ...] = ("step_ms", *stage_times.SHARES)


def _stages_state(data: Mapping[str, Any], row: Mapping[str, Any] | None) -> str | None:
    """``"absent"``: the record did not ask for ``--stages``; ``"unrun"``: it did, and did not time the optimizer;
    ``"none"``: it did and has no split for it (a peer, a failure); else ``None``."""
    if not (data.get("settings") or {}).get("stage_steps"):
        return "absent"
    if row is None:
        return "unrun"
    return "none" if row.get("stages") is None else None


def _results(data: Mapping[str, Any]) -> Mapping[str, Any]:
    """A record's figures (``{}`` where it has none)."""
    return data.get("results") or {}


def _rows_of(data: Mapping[str, Any]) -> dict[tuple[int | None, str], Mapping[str, Any]]:
    """A record's main rows (the one-process table's, or the ``--world`` table's) by world size and optimizer."""
    results = _results(data)
    return {(r.get("world"), r["optimizer"]): r for r in (results.get("rows") or results.get("world") or [])}


def _ratios_of(
    data: Mapping[str, Any], *, asked: bool = False
) -> dict[tuple[int | None, str, str], Mapping[str, Any] | None]:
    """A record's ``--ratio`` figures by world size (``None``: one process) and pair; with ``asked``, each pair the
    record asked for (``settings.ratios``) and has no figure of (one of its two not timed: a peer missing) too, at
    each of its world sizes, as ``None``."""
    found = _results(data).get("ratios") or []
    by_world = found.items() if isinstance(found, Mapping) else [(None, found)]
    out: dict[tuple[int | None, str, str], Mapping[str, Any] | None] = {
        (None if w is None else int(w), *r["pair"]): r for w, rs in by_world for r in rs
    }
    if asked:
        settings = data.get("settings") or {}
        worlds = (settings.get("worlds") or [None]) if _results(data).get("world") is not None else [None]
        for w in worlds:
            for a, b in settings.get("ratios") or []:
                out.setdefault((w, a, b), None)
    return out


def _scaling_of(data: Mapping[str, Any]) -> dict[tuple[int, str], tuple[Mapping[str, Any], Mapping[str, Any] | None]]:
    """A record's ``--scaling`` rows by width and optimizer, each with its step over matrix work (or ``None``)."""
    out = {}
    for entry in _results(data).get("scaling") or []:
        work = entry.get("matrix_work") or {}
        for r in entry.get("rows") or []:
            out[(entry["d"], r["optimizer"])] = (r, work.get(r["optimizer"]))
    return out


def _work_of(data: Mapping[str, Any]) -> dict[str, Mapping[str, Any] | None]:
    """A record's ``--alone`` figures by optimizer (``None`` for one whose steps recorded no matrix work)."""
    return dict(_results(data).get("matrix_work") or {})


def _work_state(data: Mapping[str, Any], entry: Mapping[str, Any] | None, name: str) -> str | None:
    """``"absent"``: the record did not ask for ``--alone``; ``"unrun"``: it did, and did not time the optimizer
    ``name`` (neither among its optimizers nor in its ``--alone`` table); ``"none"``: it did and has no figure
    here; else ``None``."""
    settings = data.get("settings") or {}
    if not settings.get("alone"):
        return "absent"
    if name not in (settings.get("optimizers") or []) and name not in _work_of(data):
        return "unrun"
    return "none" if entry is None or entry.get("ratio") is None else None


def _paired(a: Mapping[Any, Any], b: Mapping[Any, Any]) -> list[tuple[Any, Any, Any]]:
    """Each key of ``a``, then each of ``b`` not in ``a``, with its entry in each (``None`` where it has none)."""
    return [(k, a.get(k), b.get(k)) for k in [*a, *(k for k in b if k not in a)]]


def _ratio_state(asked: bool, entry: Mapping[str, Any] | None) -> str | None:
    """:func:`_state` of a ``--ratio`` figure, ``"unmeasured"`` where the record asked for the pair at that world size
    (``asked``: among :func:`_ratios_of`'s with ``asked``) and timed one of its two not (a peer not installed), which
    its results leave out."""
    if entry is None and asked:
        return "unmeasured"
    return _state(entry)


def _state(entry: Mapping[str, Any] | None) -> str | None:
    return "absent" if entry is None else "failed" if entry.get("failed") else None


def _paired_means(ra: Mapping[str, Any] | None, rb: Mapping[str, Any] | None) -> dict[str, Any]:
    """An optimizer's mean and median ms in each record, B's mean over A's and each record's state (:func:`_state`)."""
    mean_a, mean_b = (ra or {}).get("mean_ms"), (rb or {}).get("mean_ms")
    return {
        "a_mean_ms": mean_a, "b_mean_ms": mean_b,
        "a_median_ms": (ra or {}).get("median_ms"), "b_median_ms": (rb or {}).get("median_ms"),
        "b_over_a": mean_b / mean_a if mean_a and mean_b is not None else None,
        "a_state": _state(ra), "b_state": _state(rb),
    }


def _differences(out: dict[str, tuple[Any, Any]], name: str, left: Any, right: Any, *, depth: int) -> None:
    """Into ``out``, by dotted name, the entries where ``left`` and ``right`` differ, mappings walked ``depth``
    levels down (a function of its own: a nested one that called itself would hold itself in a reference cycle)."""
    if isinstance(left, Mapping) and isinstance(right, Mapping) and depth:
        for key in [*left, *(k for k in right if k not in left)]:
            _differences(out, f"{name}.{key}", left.get(key), right.get(key), depth=depth - 1)
    elif left != right:
        out[name] = (left, right)


def _cmd_compare(args: argparse.Namespace) -> int:
    """``kronopt bench --compare A.json B.json``: two records side by side (:func:`compare_records`); nothing runs.
    Optimizers named keep only their rows; a flag that sets a run is refused, with every other problem."""
    p = Problems()
    for flag in _RUN_FLAGS:
        if getattr(args, flag, None) not in (None, False):
            p.add(f"--{flag.replace('_', '-')}", "sets a run; --compare reads two records and runs nothing")
    records = []
    for path in args.compare:
        try:
            records.append(read_record(path))
        except ValueError as exc:
            p.add("--compare", str(exc))
    if len(records) == 2:
        kinds = [
            "a --world record" if (r.get("results") or {}).get("world") is not None else "a one-process record"
            for r in records
        ]
        if kinds[0] != kinds[1]:
            p.add("--compare", f"A is {kinds[0]}, B {kinds[1]}: their rows do not pair up")
        known = {o for r in records for o in (r.get("settings") or {}).get("optimizers") or []}
        for name in args.optimizers:
            if name not in known:
                p.add(name, "is in neither record")
    p.check()
    found = compare_records(*records)
    keep = set(args.optimizers)
    a, b = args.compare
    for tag, path, data in (("A", a, records[0]), ("B", b, records[1])):
        load = data.get("load_average") or {}
        print(
            f"{tag}: {path} ({data.get('time')}; {(data.get('machine') or {}).get('processor') or 'processor unknown'}, "
            f"torch {(data.get('versions') or {}).get('torch')}; load average {_shown(load.get('start'))} at the start, "
            f"{_shown(load.get('end'))} at the end)"
        )
    # the optimizers differ where the rows below do; every other difference, one a line
    differences = {k: v for k, v in found["differences"].items() if k != "settings.optimizers"}
    if differences:
        print("differ (A → B):")
        for name, (x, y) in differences.items():
            print(f"  {name}: {_shown(x)} → {_shown(y)}")
    rows = [r for r in found["rows"] if not keep or r["optimizer"] in keep]
    if rows:
        print()
        _print_paired(rows, "world" if any(r["world"] is not None for r in rows) else None)
    pairs = [r for r in found["ratios"] if not keep or set(r["pair"]) <= keep]
    if pairs:
        labels = [("" if r["world"] is None else f"world {r['world']}: ") + " / ".join(r["pair"]) for r in pairs]
        width = max(len(label) for label in labels)
        print()
        print("ratios, each record's own (the median over its runs)")
        for label, r in zip(labels, pairs):
            print(f"{label:<{width}}  A {_ratio(r['a'], r['a_state'])}  B {_ratio(r['b'], r['b_state'])}")
    scaling = [r for r in found["scaling"] if not keep or r["optimizer"] in keep]
    if scaling:
        print()
        print("scaling: mean ms per step at each width, and the step's mean over its matrix work alone in each record")
        _print_paired(scaling, "d", work=True)
    split = [r for r in found["stages"] if not keep or r["optimizer"] in keep]
    if split:
        _print_paired_stages(split)
    work = [r for r in found["matrix_work"] if not keep or r["optimizer"] in keep]
    if work:
        width = max(len(r["optimizer"]) for r in work)
        print()
        print("matrix work alone (--alone): the step's mean over its matrix work's, each record's own")
        for r in work:
            print(
                f"{r['optimizer']:<{width}}  A {_work_cell(r['a'], r['a_alone_ms'], r['a_state'])}  "
                f"B {_work_cell(r['b'], r['b_alone_ms'], r['b_state'])}"
            )
    return 0


def _print_paired_stages(rows: list[dict[str, Any]]) -> None:
    """:func:`compare_records`' ``stages``: each optimizer's split by stage slot in A, then in B."""
    width = max(14, *(len(r["optimizer"]) for r in rows))
    columns = _STAGE_COLUMNS
    print()
    print("where the step goes (--stages): mean ms per step of the clocked step and of each stage slot, each record's")
    header = f"{'optimizer':<{width}}    " + " ".join(f"{c.removesuffix('_ms') if c == 'step_ms' else c:>9}" for c in columns)
    print(header)
    print("-" * len(header))
    shown = {"absent": "not asked", "unrun": "not run", "none": "not split (a peer)"}
    for r in rows:
        for tag, split, state in (("A", r["a"], r["a_state"]), ("B", r["b"], r["b_state"])):
            name = r["optimizer"] if tag == "A" else ""
            cells = shown[state] if state else " ".join(f"{split[c]:>9.3f}" for c in columns)
            print(f"{name:<{width}} {tag}  {cells}")


def _work_cell(ratio: float | None, alone_ms: float | None, state: str | None) -> str:
    """A step over its matrix work, with the work's mean ms, as :func:`_cmd_compare` prints it."""
    if state == "absent":
        return "not asked"
    if state == "unrun":
        return "not run"
    if ratio is None:
        return "no figure"
    return f"{ratio:.3f} (the work {'-' if alone_ms is None else f'{alone_ms:.3f}'} ms)"


def _print_paired(rows: list[dict[str, Any]], lead: str | None, *, work: bool = False) -> None:
    """:func:`compare_records`' rows (or scaling rows) as a table: the ``lead`` column (``"world"``, ``"d"``) where
    given, the optimizer, each record's mean, B / A, each record's median; with ``work`` each record's step over
    its matrix work too."""
    width = max(14, *(len(r["optimizer"]) for r in rows))
    header = (f"{lead:>5} " if lead else "") + (
        f"{'optimizer':<{width}} {'A mean ms':>10} {'B mean ms':>10} {'B / A':>7} {'A median':>9} {'B median':>9}"
    ) + (f" {'A × work':>9} {'B × work':>9}" if work else "")
    print(header)
    print("-" * len(header))
    for r in rows:
        cells = [_ms(r["a_mean_ms"], 10, r["a_state"]), _ms(r["b_mean_ms"], 10, r["b_state"]),
                 f"{r['b_over_a']:>7.3f}" if r["b_over_a"] is not None else f"{'-':>7}",
                 _ms(r["a_median_ms"], 9, r["a_state"]), _ms(r["b_median_ms"], 9, r["b_state"])]
        if work:
            cells += [_ms(r["a_work"], 9), _ms(r["b_work"], 9)]
        print((f"{r[lead]:>5} " if lead else "") + f"{r['optimizer']:<{width}} " + " ".join(cells))
    if any(r["a_state"] or r["b_state"] for r in rows):
        print("(failed: the optimizer failed in that record; not run: the record did not time it)")


#: what :func:`compare_records`' states print as
_STATES = {"failed": "failed", "absent": "not run"}


def _ms(value: float | None, width: int, state: str | None = None) -> str:
    return f"{value:>{width}.3f}" if value is not None else f"{_STATES.get(state or '', '-'):>{width}}"


def _ratio(value: float | None, state: str | None = None) -> str:
    if value is not None:
        return f"{value:.3f}"
    return {"failed": "no figure (failed)", "absent": "not asked", "unmeasured": "not measured (not timed there)"}.get(state or "", "-")


def _shown(value: Any) -> str:
    """A record's entry as the comparison names it: a number with two decimals, anything else as compact JSON
    (cut at 100 characters); ``-`` where a record has none."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.2f}"
    text = value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))
    return text if len(text) <= 100 else text[:99] + "…"


def add_subcommand(sub: Any) -> None:
    p = sub.add_parser("bench", help="optimizer step time and state size on a parameter set, against other libraries")
    p.add_argument(
        "optimizers", nargs="*",
        help="presets, TOML files or other libraries' optimizers: " + ", ".join(peers.PEERS) + ", or any optimizer "
        "class on PYTHONPATH as module:Class, built with its defaults (default: " + ", ".join(BENCH_DEFAULT) + ")",
    )
    p.add_argument("--d", default=None, help="model width of the transformer-shaped set (≥ 1; default 256)")
    p.add_argument("--layers", default=None, help="layers of the transformer-shaped set (≥ 1; default 4)")
    p.add_argument("--shapes", help="your own shapes instead, e.g. '768x768,3072x768,768'")
    p.add_argument(
        "--model", metavar="MODEL",
        help="or your own model's trainable parameters, by their names (as kronopt routes them), shapes and dtypes: "
        "FACTORY() makes the torch.nn.Module (a class or a function; its module on PYTHONPATH, or a file "
        "path/to/nets.py), on the meta device where it can; arguments as Python literals, e.g. "
        "'mypkg.nets:Net(width=256)'; or a checkpoint's tensors, values unread: model.safetensors, an index of "
        "shards (model.safetensors.index.json, pytorch_model.bin.index.json), a torch.save'd state dict or training "
        "checkpoint (.pt, .pth, .bin, .ckpt), a folder holding one (a Hugging Face model's), a torch.distributed."
        "checkpoint folder (or its .metadata, or a rank's __N.metadata: every rank's read); or a Hugging Face "
        "config.json, its model made by transformers on the meta device (no weights needed); or a Hugging Face "
        "Hub model's id, org/name[@revision], read from the local Hugging Face cache (nothing is downloaded)",
    )
    p.add_argument(
        "--dtype", default=None,
        help=f"the parameters' dtype, one of {', '.join(DTYPES)} (default: the model's own, else float32)",
    )
    p.add_argument(
        "--groups", default=None,
        help="how every optimizer of the run, kronopt's and the others', puts the parameters in param groups: one (the "
        "default); decay (as training scripts do: weight decay on parameters of two or more dimensions, none on "
        "gains and biases); layers (a group per layer, by the first number in a parameter's name, each layer's "
        f"learning rate {LAYER_DECAY} × the one above it; one per parameter on a --shapes set)",
    )
    p.add_argument("--steps", default=None, help=f"timed steps (≥ 1; default {_COUNT_DEFAULTS['steps']})")
    p.add_argument("--warmup", default=None, help=f"untimed steps first (≥ 0; default {_COUNT_DEFAULTS['warmup']})")
    p.add_argument("--scaling", help="also time a one-layer transformer-shaped set at each width, e.g. '128,256,512'")
    p.add_argument(
        "--world",
        help="instead, run each world size as that many CPU processes on gloo (kronopt's work sharding), e.g. '1,2,4'",
    )
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available; --world: cpu)")
    p.add_argument(
        "--threads", default=None,
        help=f"torch CPU threads ({_COUNT_DEFAULTS['threads']}, the default: torch's default; --world: per rank, the "
        "cores / the world size)",
    )
    p.add_argument(
        "--seed", default=None,
        help="draws the parameters, the gradients and each round's order of the optimizers "
        f"(default {_COUNT_DEFAULTS['seed']})",
    )
    p.add_argument(
        "--repeat", default=None,
        help="make the whole run this many times (fresh optimizers each), the --scaling and --world tables' too, and "
        "print the medians, with each ratio's lowest and highest over the runs (the one-process table's ratio to the "
        f"first optimizer, --ratio's) (≥ 1; default {_COUNT_DEFAULTS['repeat']})",
    )
    p.add_argument(
        "--ratio", action="append",
        help="also print the ratio A/B of two optimizers' mean step times, each run's own (with --repeat: the median "
        "and range over the runs; with --world: at each world size), e.g. --ratio dykaf/soap; repeatable",
    )
    p.add_argument(
        "--alone", action="store_true",
        help="also replay each kronopt optimizer's matrix work (its products, eigh and QR, recorded from its own "
        "steps on the same shapes) alone, in the same interleaved rounds, and print each step's mean over it: how "
        "far the step is from being bound by its matrix work (not with --world)",
    )
    p.add_argument(
        "--memory", default=None,
        help="also step this many more rounds, untimed, counting the tensor memory each step makes, and print the "
        "most one step held at once (step MiB: its temporaries, the scratch kronopt keeps across steps included, and "
        "the new state it writes in; 10 holds a refresh of the presets; "
        f"default {_COUNT_DEFAULTS['memory']}: none; not with --world)",
    )
    p.add_argument(
        "--stages", default=None,
        help="also step this many more rounds, untimed above, each kronopt optimizer's step split by where it goes: "
        "its factor estimator, basis, inner rule, split and post stage, and kronopt's own work around them (the "
        "gradients' stacking and checks, the state writes, bookkeeping); 10 holds a refresh of the presets "
        f"(default {_COUNT_DEFAULTS['stages']}: none; not with --world)",
    )
    p.add_argument(
        "--json", metavar="FILE",
        help="also write the run's record to FILE as JSON: the settings, versions, processor, load average and every "
        "figure the tables print (each run's means too), for your own comparisons and plots",
    )
    p.add_argument(
        "--compare", nargs=2, metavar=("A.json", "B.json"),
        help="instead of a run, two records --json wrote side by side: each optimizer's mean and median ms in each, "
        "B over A, each record's --ratio figures and the settings, versions and machine that differ (optimizers "
        "named keep only their rows; the --scaling and --alone tables compared too, each step over its matrix work)",
    )
    p.add_argument(
        "--retain-freed-memory", action="store_true",
        help="first keep freed CPU memory in the process (glibc; kronopt.malloc.retain_freed_memory), so the "
        "step's large temporaries are not page-faulted in again every step: this process and every --world rank",
    )
    p.set_defaults(func=cmd_bench)
