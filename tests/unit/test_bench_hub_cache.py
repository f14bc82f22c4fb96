"""``kronopt bench --model org/name``: a Hugging Face Hub model's id read from the local cache, offline. The cache
is laid out here by hand as ``huggingface_hub`` lays it out (``models--org--name/refs/<revision>`` holding a commit,
``snapshots/<commit>/`` holding links into ``blobs/``), so the names, shapes and folders expected are the test's
own; nothing here needs ``huggingface_hub`` or the network."""

import os

import pytest
import torch

from kronopt.app import bench, cli
from .test_bench_model import _safetensors

MAIN, OTHER = "a" * 40, "b" * 40


def _cached(cache, repo, commit, tensors, refs=("main",)):
    """A snapshot of ``repo`` at ``commit`` in the Hub cache ``cache``: its ``model.safetensors`` a link to a blob,
    as the Hub's downloads leave it, and ``refs`` naming that commit."""
    folder = cache / f"models--{repo.replace('/', '--')}"
    (folder / "blobs").mkdir(parents=True, exist_ok=True)
    blob = folder / "blobs" / f"blob-{commit[:6]}"
    _safetensors(blob, tensors)
    snapshot = folder / "snapshots" / commit
    snapshot.mkdir(parents=True)
    os.symlink(os.path.relpath(blob, snapshot), snapshot / "model.safetensors")
    _point(folder, refs, commit)
    return snapshot


def _point(folder, refs, commit):
    """Each of ``refs`` (``main``, a tag, ``refs/pr/3``) in the repository's cache ``folder`` naming ``commit``."""
    for ref in refs:
        (folder / "refs" / ref).parent.mkdir(parents=True, exist_ok=True)
        (folder / "refs" / ref).write_text(commit)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME", "XDG_CACHE_HOME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.chdir(tmp_path)  # no folder here is named like the ids
    return tmp_path / "hub"


def test_a_hub_id_is_read_from_the_cache_at_main_or_at_a_revision(cache):
    _cached(cache, "org/tiny", MAIN, {"embed.weight": torch.zeros(10, 4), "layers.0.weight": torch.zeros(6, 4)})
    _cached(cache, "org/tiny", OTHER, {"embed.weight": torch.zeros(12, 4)}, refs=("v2", "refs/pr/3"))
    params = bench.model_params("org/tiny")
    assert list(zip(params.names, params.shapes)) == [("embed.weight", (10, 4)), ("layers.0.weight", (6, 4))]
    assert params.source == "org/tiny from the Hugging Face cache: checkpoint model.safetensors"
    for spec in ("org/tiny@v2", "org/tiny@refs/pr/3", f"org/tiny@{OTHER}"):  # a tag, a pull request, a commit
        assert bench.model_params(spec).shapes == ((12, 4),), spec
    assert bench.model_params(f"org/tiny@{MAIN}").shapes == ((10, 4), (6, 4))


def test_an_id_without_an_organisation_and_the_cache_found_as_huggingface_hub_finds_it(tmp_path, monkeypatch):
    """``HF_HUB_CACHE`` first (or its old name), else ``HF_HOME/hub``, else ``$XDG_CACHE_HOME/huggingface/hub``."""
    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME", "XDG_CACHE_HOME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)
    for i, (name, value, hub) in enumerate([
        ("XDG_CACHE_HOME", "xdg", "xdg/huggingface/hub"),
        ("HF_HOME", "home", "home/hub"),
        ("HUGGINGFACE_HUB_CACHE", "old", "old"),
        ("HF_HUB_CACHE", "new", "new"),
    ]):
        _cached(tmp_path / hub, "gpt2", MAIN, {"wte.weight": torch.zeros(5 + i, 3)})
        monkeypatch.setenv(name, str(tmp_path / value))  # each outranks those set before it
        assert bench.model_params("gpt2").shapes == ((5 + i, 3),), name


def test_a_model_not_in_the_cache_is_a_clear_error_and_nothing_is_fetched(cache):
    _cached(cache, "org/tiny", MAIN, {"w": torch.zeros(2, 2)})
    with pytest.raises(ValueError) as info:
        bench.model_params("org/absent")
    said = str(info.value)
    assert "'org/absent' is no file or folder here, no module:factory" in said
    assert str(cache / "models--org--absent") in said and "hf download org/absent config.json" in said
    with pytest.raises(ValueError, match="revision 'v9'.*hf download org/tiny config.json --revision v9"):
        bench.model_params("org/tiny@v9")


def test_a_local_folder_named_like_an_id_is_read_first(cache, tmp_path):
    _cached(cache, "org/tiny", MAIN, {"w": torch.zeros(2, 2)})
    (tmp_path / "org" / "tiny").mkdir(parents=True)
    _safetensors(tmp_path / "org" / "tiny" / "model.safetensors", {"v": torch.zeros(7, 3)})
    params = bench.model_params("org/tiny")
    assert params.shapes == ((7, 3),) and params.source == "checkpoint model.safetensors"


@pytest.mark.parametrize("spec", ["org/../tiny", "org/tiny@../../x", "org--x/tiny"])
def test_an_id_that_could_leave_the_cache_or_is_no_hub_id_is_not_looked_up(cache, spec):
    """``..`` could reach outside the cache folder, and the Hub allows no ``--`` in an id: such a spec is not
    taken for an id (and is no factory, nor a file or folder here, either)."""
    with pytest.raises(ValueError, match="is not module:factory|no file or folder"):
        bench.model_params(spec)


def test_the_command_line_benches_a_cached_hub_model(cache, capsys):
    _cached(cache, "org/tiny", MAIN, {"embed.weight": torch.zeros(10, 4), "layers.0.weight": torch.zeros(6, 4)})
    assert cli.main(["bench", "adamw", "--model", "org/tiny", "--steps", "1", "--warmup", "0", "--device", "cpu"]) == 0
    assert "org/tiny from the Hugging Face cache" in capsys.readouterr().out
