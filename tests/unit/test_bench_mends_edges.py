"""Edge cases of the mends to ``kronopt bench --model`` (fbe871c: Hub ids, the dispatch order of ``model_params``,
``_folder_checkpoint``'s shards; 2e1f0bf: DCP rank files), found in review. ``WRONG:`` tests pinned a bug (they
failed on the code reviewed, mended since), ``OK:`` tests pin behaviour checked and found right. Every file is
laid out by hand; nothing here needs ``huggingface_hub``, ``transformers`` or the network."""

import json
import os

import pytest
import torch

from kronopt.app import bench
from .test_bench_hub_cache_edges import from_config  # noqa: F401 (a fixture: config_params replaced by a stand-in)
from .test_bench_model import _safetensors


@pytest.fixture
def here(tmp_path, monkeypatch):
    """An empty Hub cache and ``tmp_path`` the current folder (no folder here is named like the specs)."""
    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME", "XDG_CACHE_HOME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _names_and_shapes(params):
    return list(zip(params.names, params.shapes))


# --- _folder_checkpoint ---------------------------------------------------------------------------------------------


def test_a_folder_holding_the_one_shard_of_a_one_shard_checkpoint_is_read(here):
    """WRONG (regression of fbe871c): ``model-00001-of-00001.safetensors`` is the whole model (a one-shard save,
    whose index the user did not copy). Before fbe871c the folder was read from it, as its only safetensors file;
    now ``_SHARD`` sets it aside as "a part" and the bench refuses the folder ("download the index") though
    nothing is missing. A part ``-0000N-of-0000N`` with every part 1..N present (here N = 1) is a whole
    checkpoint: read it (for N = 1, as the folder's only safetensors file)."""
    folder = here / "one"
    folder.mkdir()
    _safetensors(folder / "model-00001-of-00001.safetensors", {"embed.weight": torch.zeros(10, 4)})
    params = bench.model_params(str(folder))
    assert _names_and_shapes(params) == [("embed.weight", (10, 4))]


@pytest.mark.parametrize("config", [False, True], ids=["no config", "with config"])
def test_an_index_without_its_shards_gives_way_to_a_complete_checkpoint_beside_it(here, from_config, config):
    """WRONG (left by fbe871c): ``hf download org/name --include '*.json' '*.bin'`` (a repository's torch
    weights, and its JSON files) brings ``model.safetensors.index.json`` without any safetensors shard, beside a
    complete ``pytorch_model.bin``. ``whole()`` gives the incomplete index's place to ``config.json`` (which needs
    ``transformers``) or, with no config, raises "holds the index … without its shards", instead of going on to
    the next name of ``_FOLDER_NAMES``, whose weights are all there. An index missing shards should be skipped
    like an absent name; the config (or the error) only where no complete checkpoint follows."""
    folder = here / "mixed"
    folder.mkdir()
    index = {"weight_map": {"w": "model-00001-of-00002.safetensors", "v": "model-00002-of-00002.safetensors"}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    torch.save({"w": torch.zeros(5, 2), "v": torch.zeros(3, 2)}, folder / "pytorch_model.bin")
    if config:
        (folder / "config.json").write_text("{}")
    params = bench.model_params(str(folder))
    assert _names_and_shapes(params) == [("w", (5, 2)), ("v", (3, 2))]
    assert from_config == []


def test_an_index_named_itself_without_its_shards_says_which_are_missing_and_what_to_do(here):
    """WRONG (left by fbe871c): a folder whose index misses shards now says "holds the index … without its shards
    (…): download them, or the config", but the same index named itself (``--model path/model.safetensors.
    index.json``) still fails with a bare ``FileNotFoundError: [Errno 2] No such file or directory: …`` wrapped
    as "cannot be read as a checkpoint", saying neither that shards are missing nor what to do. Check the shards
    first (``_missing_shards``) and say which are missing and to download them (or to give the config)."""
    folder = here / "direct"
    folder.mkdir()
    index = {"weight_map": {"w": "model-00001-of-00002.safetensors", "v": "model-00002-of-00002.safetensors"}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    _safetensors(folder / "model-00001-of-00002.safetensors", {"w": torch.zeros(2, 2)})
    with pytest.raises(ValueError) as info:
        bench.model_params(str(folder / "model.safetensors.index.json"))
    message = str(info.value)
    assert "model-00002-of-00002.safetensors" in message
    assert "Errno" not in message and "download" in message


def test_a_trainer_folder_whose_model_is_a_dcp_subfolder_names_it(here):
    """WRONG (messages): Accelerate's ``save_state`` and the Trainer under FSDP's sharded state dict leave
    ``pytorch_model_fsdp_0/`` (a ``torch.distributed.checkpoint``: ``.metadata`` and ``__0_0.distcp``) beside
    ``optimizer_0/``, ``scheduler.pt``, ``rng_state_0.pth``. ``--model`` on the checkpoint folder says "holds no
    checkpoint file … and no Hugging Face config.json", which does not say what to do though the model is one
    folder down. Name the subfolders holding a DCP ``.metadata`` (the model's) and say to pass that folder."""
    folder = here / "checkpoint-500"
    for sub in ("pytorch_model_fsdp_0", "optimizer_0"):
        (folder / sub).mkdir(parents=True)
        (folder / sub / ".metadata").write_bytes(b"\x80\x04N.")
        (folder / sub / "__0_0.distcp").write_bytes(b"")
    torch.save({"last_epoch": 3}, folder / "scheduler.pt")
    torch.save({"python": 1}, folder / "rng_state_0.pth")
    with pytest.raises(ValueError) as info:
        bench.model_params(str(folder))
    assert "pytorch_model_fsdp_0" in str(info.value)


def test_an_index_naming_its_shards_in_a_subfolder_and_symlinked_shards(here):
    """OK: an index whose ``weight_map`` names shards in a subfolder is complete when they are there, and a
    snapshot-like folder whose shards are links (as the Hub cache's are) is read through its index; a dangling
    link (a blob not there) counts as a missing shard and the folder's config is read."""
    folder = here / "sub"
    (folder / "shards").mkdir(parents=True)
    _safetensors(folder / "shards" / "model-00001-of-00001.safetensors", {"w": torch.zeros(3, 4)})
    index = {"weight_map": {"w": "shards/model-00001-of-00001.safetensors"}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    assert _names_and_shapes(bench.model_params(str(folder))) == [("w", (3, 4))]

    linked = here / "linked"
    (linked / "blobs").mkdir(parents=True)
    _safetensors(linked / "blobs" / "one", {"a": torch.zeros(2, 3)})
    snap = linked / "snap"
    snap.mkdir()
    os.symlink("../blobs/one", snap / "model-00001-of-00002.safetensors")
    os.symlink("../blobs/two", snap / "model-00002-of-00002.safetensors")
    index = {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}
    (snap / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match=r"model-00002-of-00002\.safetensors"):
        bench.model_params(str(snap))
    _safetensors(linked / "blobs" / "two", {"b": torch.zeros(4, 3)})
    assert _names_and_shapes(bench.model_params(str(snap))) == [("a", (2, 3)), ("b", (4, 3))]


# --- model_params' dispatch -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["weights", "model.gguf", "nets.py"])
@pytest.mark.parametrize("absolute", [False, True], ids=["relative", "absolute"])
def test_an_existing_file_of_another_kind_is_not_said_to_be_missing(here, name, absolute):
    """WRONG (fbe871c made the absolute case worse): a file that exists but is no checkpoint the bench reads
    (no ending it knows: ``weights``, ``model.gguf``; or a Python file named without its factory, ``nets.py``)
    is said not to exist: "no file or folder '/…/weights'" for a path (fbe871c's new path rule; before it said
    "is not module:factory"), "'model.gguf' is no file or folder here, …, e.g. hf download model.gguf
    config.json" for one part (the Hub lookup). Where the spec exists, say it is a file the bench cannot read
    (which kinds it reads) and, for a ``.py`` file, to name its factory (``nets.py:build``)."""
    path = here / name
    path.write_text("import torch\n\ndef build():\n    return torch.nn.Linear(2, 3)\n")
    spec = str(path) if absolute else name
    with pytest.raises(ValueError) as info:
        bench.model_params(spec)
    message = str(info.value)
    assert "no file or folder" not in message, message
    if name.endswith(".py"):
        assert f"{spec}:" in message, message  # e.g. nets.py:build


@pytest.mark.parametrize("where", ["models/tiny", "models/tiny/model.safetensors"])
def test_a_path_starting_with_a_tilde_is_read_from_the_home_folder(here, monkeypatch, where):
    """WRONG (fbe871c's message is false): a path written with ``~`` reaches the bench unexpanded where the shell
    leaves it (``--model=~/models/tiny``: bash expands no tilde after ``--model=``; a quoted path; a config or
    script). fbe871c now answers "no file or folder '~/models/tiny'" though the folder exists in the home folder
    (before it said "is not module:factory"). Expand ``~`` (``os.path.expanduser``, as ``_hub_cache`` already
    does for the cache) before looking for the file or folder."""
    monkeypatch.setenv("HOME", str(here / "home"))
    (here / "home" / "models" / "tiny").mkdir(parents=True)
    _safetensors(here / "home" / "models" / "tiny" / "model.safetensors", {"w": torch.zeros(3, 4)})
    assert _names_and_shapes(bench.model_params(f"~/{where}")) == [("w", (3, 4))]


@pytest.mark.parametrize("spec", [r"C:\models\llama", "C:/models/llama", r"D:\runs\checkpoint-500"])
def test_a_missing_windows_path_with_its_drive_is_said_to_be_missing(here, spec):
    """WRONG (left by fbe871c): its new rule says a spec written as a path (a backslash, ``./``, ``/``) that does
    not exist is missing, but only where the spec holds no ``:``; a Windows path with its drive (``C:\\models\\
    llama``) always holds one, so a missing model folder is still answered "is not module:factory (…)". A drive
    letter and a separator (``^[A-Za-z]:[\\\\/]``) begin a path, not a factory: say "no file or folder"."""
    with pytest.raises(ValueError, match="no file or folder"):
        bench.model_params(spec)


def test_factory_specs_of_every_spelling_still_make_their_model(here, monkeypatch):
    """OK: fbe871c's new steps before the factory (the Hub lookup, the path rule) leave factory specs alone: a
    module on ``PYTHONPATH``, with arguments, a Python file by a relative path of several parts or of one, and
    arguments holding slashes, dots and a checkpoint-like name."""
    pkg = here / "mypkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "nets.py").write_text(
        "import torch\n\n"
        "def build():\n    return torch.nn.Linear(2, 3)\n\n"
        "class Net(torch.nn.Module):\n"
        "    def __init__(self, width=4, path=''):\n"
        "        super().__init__()\n        self.w = torch.nn.Parameter(torch.zeros(width, 2))\n"
    )
    (here / "deep" / "er").mkdir(parents=True)
    (here / "deep" / "er" / "nets.py").write_text((pkg / "nets.py").read_text())
    (here / "nets.py").write_text((pkg / "nets.py").read_text())
    monkeypatch.syspath_prepend(str(here))
    assert bench.model_params("mypkg.nets:build").shapes == ((3, 2), (3,))
    assert bench.model_params("mypkg.nets:Net(width=256)").shapes == ((256, 2),)
    assert bench.model_params("mypkg.nets:Net(width=8, path='a/b/c/model.pt')").shapes == ((8, 2),)
    assert bench.model_params("deep/er/nets.py:build").shapes == ((3, 2), (3,))
    assert bench.model_params("./deep/er/nets.py:Net(width=5)").shapes == ((5, 2),)
    assert bench.model_params("nets.py:build").shapes == ((3, 2), (3,))


@pytest.mark.parametrize("spec", ["ckpts/model.pt", "model.safetensors", "runs/a/b/config.json", "ckpt/__1.metadata"])
def test_a_missing_file_named_as_a_checkpoint_is_said_missing_not_looked_up(here, spec):
    """OK: a checkpoint-named spec that does not exist, and is no cached Hub model, is said to be missing (by its
    path), not sent to the factory."""
    with pytest.raises(ValueError, match=r"no checkpoint file"):
        bench.model_params(spec)
