"""Edge cases of ``kronopt bench --model org/name[@revision]`` (a Hub model's id read from the local Hugging Face
cache), found in review. ``WRONG:`` tests pinned a bug (they failed on the code reviewed, mended since), ``OK:``
tests pin behaviour checked and found right. The cache is laid out by hand, as ``huggingface_hub`` lays it out
(``models--org--name/refs/<revision>`` holding a commit, ``snapshots/<commit>/`` its files); nothing here needs
``huggingface_hub``, ``transformers`` or the network."""

import json
import os
import re
import socket
import sys

import pytest
import torch

from kronopt.app import bench
from .test_bench_hub_cache import _point
from .test_bench_model import _safetensors

MAIN, OTHER = "a" * 40, "b" * 40
CONFIG = json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]})


def _snapshot(cache, repo, files, commit=MAIN, refs=("main",)):
    """A snapshot of ``repo`` at ``commit``: ``files`` by name (a dict of tensors: a safetensors file; text: the
    file's text), and ``refs`` naming that commit."""
    folder = cache / f"models--{repo.replace('/', '--')}"
    snapshot = folder / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for name, content in files.items():
        if isinstance(content, dict):
            _safetensors(snapshot / name, content)
        else:
            (snapshot / name).write_text(content)
    _point(folder, refs, commit)
    return snapshot


@pytest.fixture
def clean_env(tmp_path, monkeypatch):
    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME", "XDG_CACHE_HOME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)
    return monkeypatch


@pytest.fixture
def cache(tmp_path, clean_env):
    clean_env.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    return tmp_path / "hub"


@pytest.fixture
def from_config(monkeypatch):
    """``config_params`` replaced by a stand-in (``transformers`` is not needed): the config paths it was asked for,
    and a parameter set of its own."""
    asked = []

    def made(path):
        asked.append(path)
        return bench.ParamSet([(7, 7)], ["from_config.weight"], [torch.float32], source=f"model of {path.name}")

    monkeypatch.setattr(bench, "config_params", made)
    return asked


# --- the cache folder --------------------------------------------------------------------------------------------


def test_a_cache_under_an_unknown_users_home_is_no_traceback(tmp_path, clean_env):
    """WRONG: ``HF_HUB_CACHE=~nosuchuser/hub`` (or ``HF_HOME``, ``XDG_CACHE_HOME`` so) makes ``_hub_cache`` raise
    ``RuntimeError`` from ``Path.expanduser`` outside any ``try``: ``model_params`` (and ``check_bench``, which
    catches only ``ValueError``) ends in a traceback, for every spec spelled like an id (``mypkg.nets`` too).
    ``huggingface_hub`` uses ``os.path.expanduser``, which leaves ``~nosuchuser`` as it is (a relative folder):
    do the same (``Path(os.path.expanduser(...))``), or at least raise a ``ValueError``."""
    clean_env.setenv("HF_HUB_CACHE", "~kronopt_no_such_user_zz/hub")
    weights = {"model.safetensors": {"w": torch.zeros(3, 2)}}
    _snapshot(tmp_path / "~kronopt_no_such_user_zz" / "hub", "org/tiny", weights)
    try:
        params = bench.model_params("org/tiny")
    except ValueError:
        return
    assert params.shapes == ((3, 2),)  # where huggingface_hub would look: the folder of that name, here


@pytest.mark.parametrize("name", ["HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME", "XDG_CACHE_HOME"])
def test_the_cache_folders_variables_have_environment_variables_expanded_as_huggingface_hub_does(
    tmp_path, clean_env, name
):
    """WRONG: ``huggingface_hub.constants`` passes ``HF_HOME`` (``XDG_CACHE_HOME`` within it) and ``HF_HUB_CACHE``
    (``HUGGINGFACE_HUB_CACHE`` within it) through ``os.path.expandvars``, so ``HF_HOME='$SCRATCH/hf'`` (as a
    ``.env`` file or a quoted shell line leaves it) is ``/scratch/.../hf``; ``_hub_cache`` only expands ``~``, and
    looks in a folder literally named ``$SCRATCH``. Expand variables too, as ``huggingface_hub`` does."""
    clean_env.setenv("KRONOPT_TEST_ROOT", str(tmp_path / "root"))
    value, hub = {
        "HF_HUB_CACHE": ("$KRONOPT_TEST_ROOT/new", "new"),
        "HUGGINGFACE_HUB_CACHE": ("${KRONOPT_TEST_ROOT}/old", "old"),
        "HF_HOME": ("$KRONOPT_TEST_ROOT/home", "home/hub"),
        "XDG_CACHE_HOME": ("$KRONOPT_TEST_ROOT/xdg", "xdg/huggingface/hub"),
    }[name]
    clean_env.setenv(name, value)
    _snapshot(tmp_path / "root" / hub, "gpt2", {"model.safetensors": {"wte.weight": torch.zeros(5, 3)}})
    assert bench._hub_cache() == tmp_path / "root" / hub
    assert bench.model_params("gpt2").shapes == ((5, 3),)


def test_the_default_cache_is_under_home(tmp_path, clean_env):
    """OK: with no variable set, the cache is ``~/.cache/huggingface/hub`` (``HOME``'s)."""
    clean_env.setenv("HOME", str(tmp_path / "me"))
    weights = {"model.safetensors": {"w": torch.zeros(4, 2)}}
    _snapshot(tmp_path / "me" / ".cache" / "huggingface" / "hub", "gpt2", weights)
    assert bench._hub_cache() == tmp_path / "me" / ".cache" / "huggingface" / "hub"
    assert bench.model_params("gpt2").shapes == ((4, 2),)


# --- what a snapshot holds -----------------------------------------------------------------------------------------

INDEX = json.dumps(
    {"weight_map": {"h.0.w": "model-00001-of-00002.safetensors", "h.1.w": "model-00002-of-00002.safetensors"}}
)


@pytest.mark.parametrize("shards", [(), ("model-00001-of-00002.safetensors",)], ids=["no shard", "one of two"])
def test_a_snapshot_with_an_index_but_not_its_shards_is_read_from_its_config(cache, from_config, shards):
    """WRONG: the README promises a cached model's "weights' headers if downloaded, else its config.json", and the
    error for a missing model suggests downloading its config. But ``hf download org/name --include '*.json'`` (the
    natural way to fetch the config, and the tokenizer's files) also brings ``model.safetensors.index.json``;
    ``_folder_checkpoint`` then picks the index (first in ``_FOLDER_NAMES``) and the bench fails with
    ``FileNotFoundError`` on the first shard not downloaded, though the config is right there. Where the index's
    shards are not all in the snapshot, read the config (or, with no config, say which shards are missing)."""
    files = {"config.json": CONFIG, "model.safetensors.index.json": INDEX}
    files.update({shard: {"h.0.w": torch.zeros(2, 2)} for shard in shards})
    snapshot = _snapshot(cache, "org/big", files)
    params = bench.model_params("org/big")
    assert from_config == [snapshot / "config.json"]
    assert params.names == ("from_config.weight",)


def test_a_lone_shard_without_its_index_is_not_read_as_the_whole_model(cache, from_config):
    """WRONG: a snapshot holding one shard of a sharded model (``model-00001-of-00002.safetensors``: a download
    of one file, or one cut short) and no index is read as if that shard were the model: the bench silently
    times half the parameters. A file named ``*-0000K-of-0000N.*`` is a part: with its index missing, read the
    config (here beside it), or refuse naming the missing index."""
    shard = {"h.0.w": torch.zeros(2, 2)}
    _snapshot(cache, "org/big", {"config.json": CONFIG, "model-00001-of-00002.safetensors": shard})
    try:
        params = bench.model_params("org/big")
    except ValueError:
        return
    assert params.names != ("h.0.w",), "one shard of two taken for the whole model"


def test_a_snapshot_with_a_config_alone_is_made_from_it(cache, from_config):
    """OK: a snapshot holding only ``config.json`` (and a README) is made from its config."""
    snapshot = _snapshot(cache, "org/cfg", {"config.json": CONFIG, "README.md": "# card"})
    params = bench.model_params("org/cfg")
    assert from_config == [snapshot / "config.json"]
    assert params.source == "org/cfg from the Hugging Face cache: model of config.json"


def test_a_snapshot_with_a_readme_alone_is_a_clear_error(cache):
    """OK: a snapshot holding neither weights nor config is a ValueError naming the snapshot's folder."""
    snapshot = _snapshot(cache, "org/card", {"README.md": "# card"})
    with pytest.raises(ValueError) as info:
        bench.model_params("org/card")
    assert str(snapshot) in str(info.value) and "no Hugging Face config.json" in str(info.value)


# --- resolving a revision --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["revision '.'", "empty ref"])
def test_a_revision_or_ref_naming_no_commit_is_not_the_snapshots_folder(cache, how):
    """WRONG: ``_hub_snapshot`` joins the revision (or the ref file's text) onto ``snapshots/`` and takes any
    folder it lands on: ``org/tiny@.`` (the regex allows ``.``) and an empty ``refs/main`` (a ref cut short)
    both give the ``snapshots`` folder itself, which is then read as a snapshot ("holds no checkpoint file").
    ``huggingface_hub`` takes no ``.`` for a revision (``refs/.`` is a folder: it fails). A snapshot's name is one
    path part, a commit: refuse anything else with the "no snapshot of revision" error."""
    snapshot = _snapshot(cache, "org/tiny", {"model.safetensors": {"w": torch.zeros(2, 2)}})
    spec = "org/tiny@."
    if how == "empty ref":
        (snapshot.parent.parent / "refs" / "main").write_text("")
        spec = "org/tiny"
    with pytest.raises(ValueError, match="no snapshot of revision"):
        bench._hub_snapshot(spec)


@pytest.mark.parametrize("ref", ["absolute", "relative"])
def test_a_ref_file_does_not_lead_out_of_the_cache(cache, tmp_path, ref):
    """WRONG: the text of ``refs/<revision>`` is joined onto ``snapshots/`` unchecked (``..`` is refused only in
    the spec), so a ref holding ``/some/folder`` or ``../../../elsewhere`` (a damaged or planted cache) makes
    the bench read a folder outside the cache. (``huggingface_hub`` joins it unchecked too; the bench need not.)
    A ref holds a commit: accept only ``[0-9a-f]{40}`` (``huggingface_hub``'s ``REGEX_COMMIT_HASH``), or at
    least a single path part."""
    snapshot = _snapshot(cache, "org/tiny", {"model.safetensors": {"w": torch.zeros(2, 2)}})
    outside = tmp_path / "outside"
    outside.mkdir()
    _safetensors(outside / "model.safetensors", {"elsewhere": torch.zeros(9, 9)})
    text = str(outside) if ref == "absolute" else os.path.relpath(outside, snapshot.parent)
    (snapshot.parent.parent / "refs" / "main").write_text(text)
    try:
        found = bench._hub_snapshot("org/tiny")
    except ValueError:
        return
    assert cache in found.resolve().parents, f"{found} is outside the cache"


def test_a_ref_with_a_newline_a_commit_without_refs_and_a_ref_of_a_missing_snapshot(cache):
    """OK: a ref's trailing newline is ignored; a commit names its snapshot with no ``refs`` folder at all; a ref
    naming a commit whose snapshot is gone, and a ref that is not text, are the "no snapshot" ValueError."""
    snapshot = _snapshot(cache, "org/tiny", {"model.safetensors": {"w": torch.zeros(2, 2)}}, refs=())
    assert bench._hub_snapshot(f"org/tiny@{MAIN}") == snapshot
    refs = snapshot.parent.parent / "refs"
    refs.mkdir()
    (refs / "main").write_text(MAIN + "\n")
    assert bench._hub_snapshot("org/tiny") == snapshot
    (refs / "main").write_text(OTHER)
    with pytest.raises(ValueError, match="no snapshot of revision 'main'"):
        bench.model_params("org/tiny")
    (refs / "main").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(ValueError, match="no snapshot of revision 'main'"):
        bench.model_params("org/tiny")
    with pytest.raises(ValueError, match="no snapshot of revision 'aaaaaaa'"):  # a short commit: not offline
        bench.model_params("org/tiny@aaaaaaa")


# --- the error message ---------------------------------------------------------------------------------------------


def test_the_missing_model_message_names_a_download_command_that_exists(cache):
    """WRONG: the error suggests ``huggingface-cli download org/name config.json``, but ``huggingface_hub`` 1.0
    dropped the ``huggingface-cli`` command for ``hf`` (the current release installs only ``hf``): the command
    suggested does not exist for a user who installs the Hub client today. Suggest ``hf download org/name
    config.json``."""
    with pytest.raises(ValueError) as info:
        bench.model_params("org/absent")
    assert "hf download org/absent config.json" in str(info.value)
    assert "huggingface-cli" not in str(info.value)


def test_the_missing_revision_message_downloads_that_revision(cache):
    """WRONG: for ``org/tiny@v9`` the error suggests downloading ``org/tiny``'s ``config.json`` with no revision,
    which fetches ``main``'s: the same command again still fails. Add ``--revision v9`` where a revision was given."""
    _snapshot(cache, "org/tiny", {"model.safetensors": {"w": torch.zeros(2, 2)}})
    with pytest.raises(ValueError) as info:
        bench.model_params("org/tiny@v9")
    assert re.search(r"--revision[ =]v9\b", str(info.value))


@pytest.mark.parametrize("spec", ["./org/tiny", "../elsewhere/org/tiny"])
def test_a_path_that_does_not_exist_is_said_to_be_missing(cache, spec):
    """WRONG: a spec spelled as a relative path (``./org/tiny``) that does not exist is neither looked up in the
    cache (right: ``huggingface_hub`` takes it for a path too) nor said to be missing: the error is only "is not
    module:factory", while ``org/tiny`` gets "is no file or folder here, …". Say the file or folder is missing."""
    _snapshot(cache, "org/tiny", {"model.safetensors": {"w": torch.zeros(2, 2)}})
    with pytest.raises(ValueError, match="no file or folder"):
        bench.model_params(spec)


# --- what is taken for an id ---------------------------------------------------------------------------------------


def test_a_hub_id_that_ends_like_a_checkpoint_file_is_read_from_the_cache(cache):
    """WRONG: ``model_params`` takes any spec ending in ``.pt``, ``.bin``, ``.ckpt``, ``.pth``, ``.safetensors``
    for a checkpoint path (``_is_checkpoint`` reads the name alone) before the cache is looked at, so a Hub
    model whose name ends so (``org/tiny.pt``: a valid id; dots are common in ids, e.g. timm's ``name.tag``) is
    "no checkpoint file 'org/tiny.pt'" though it is cached. Read a path first only where it exists."""
    _snapshot(cache, "org/tiny.pt", {"model.safetensors": {"w": torch.zeros(3, 3)}})
    assert bench.model_params("org/tiny.pt").shapes == ((3, 3),)


@pytest.mark.parametrize(
    "spec",
    [
        "mypkg.nets:build", "mypkg.nets:Net(d=2)", "nets.py:build", "org/tiny:build",  # factories
        "C:\\models\\tiny", "org\\tiny",  # Windows paths
        "org/café", "org/tiny/", "org/tiny@", "org/tiny\n", "/abs/org/tiny", "org/a/b",  # no ids
        "org--x/tiny", "org/../tiny", "org/tiny@../main",  # the Hub refuses "--" and ".."
    ],
)
def test_specs_that_are_no_hub_id_are_not_looked_up(cache, spec):
    """OK: a factory (``:``), a Windows path, non-ASCII, a trailing slash or newline, an empty revision, three
    parts, ``--`` or ``..``: no id, no cache look-up (``huggingface_hub``'s ``validate_repo_id`` refuses them)."""
    _snapshot(cache, "org/tiny", {"model.safetensors": {"w": torch.zeros(2, 2)}})
    assert bench._hub_snapshot(spec) is None


@pytest.mark.parametrize("repo", ["timm/resnet50.a1_in1k", "Qwen/Qwen2.5-0.5B", "org_1/A-b.c_9", "distilgpt2"])
def test_ids_with_dots_dashes_underscores_and_digits_are_read(cache, repo):
    """OK: ids spelled as the Hub spells them (dots, dashes, underscores, digits, upper case; no organisation) are
    read, their folder ``models--org--name`` as ``huggingface_hub``'s ``repo_folder_name`` makes it."""
    snapshot = _snapshot(cache, repo, {"model.safetensors": {"w": torch.zeros(2, 5)}})
    assert bench._hub_snapshot(repo) == snapshot
    assert bench.model_params(f"{repo}@main").shapes == ((2, 5),)


@pytest.mark.parametrize("spec", ["o/" + "a" * 300, "a" * 300 + "@main", "o/t@" + "x/" * 300 + "x"])
def test_very_long_ids_are_a_value_error(cache, spec):
    """OK: a name past the file system's limit (ENAMETOOLONG) is the "no snapshot" ValueError, not an OSError."""
    with pytest.raises(ValueError, match="no Hugging Face model in the cache"):
        bench.model_params(spec)


def test_a_factory_named_without_its_colon_is_told_both_ways(cache):
    """OK: ``mypkg.nets`` (a factory's module, ``:build`` forgotten) is spelled like an id; the error says it is no
    file, no module:factory and no cached model."""
    with pytest.raises(ValueError, match=r"'mypkg\.nets' is no file or folder here, no module:factory"):
        bench.model_params("mypkg.nets")


# --- nothing reaches the network -----------------------------------------------------------------------------------


def test_a_cached_model_is_read_with_no_socket_and_no_hub_client(cache, monkeypatch):
    """OK: reading a cached model's weights opens no socket and imports neither ``huggingface_hub`` nor
    ``transformers`` (both made unimportable here, sockets made to raise)."""
    _snapshot(cache, "org/tiny", {"model.safetensors": {"embed.weight": torch.zeros(10, 4)}})

    def no_socket(*args, **kwargs):
        raise AssertionError("the bench opened a socket")

    monkeypatch.setattr(socket, "socket", no_socket)
    monkeypatch.setattr(socket, "create_connection", no_socket)
    for name in ("huggingface_hub", "transformers"):
        monkeypatch.setitem(sys.modules, name, None)  # import raises ImportError
    params = bench.model_params("org/tiny@main")
    assert params.names == ("embed.weight",)
