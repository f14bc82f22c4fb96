"""Edge cases of ``Peer.build_on`` (ba8ab61: a peer follows its preset's routing by name) and of ``kronopt bench
--model path/to/nets.py:factory`` (6571850) that the code as committed gets wrong.

Each test fails on the code as committed because of a real bug; its docstring says what is wrong and what the
right behaviour is. Tests needing the optional peers skip without them (``PYTHONPATH=/tmp/peers``).
"""

import textwrap

import pytest
import torch

from kronopt.app import bench, cli, peers

#: a model whose only matrices are an embedding and a head (a bag-of-words classifier, a linear probe on an
#: embedding): the muon preset sends both to its AdamW by name and its 1-D gains by dimension, so Muon has nothing
BAG = textwrap.dedent(
    """
    from torch import nn

    class Bag(nn.Module):
        def __init__(self, vocab=50, d=8):
            super().__init__()
            self.embed = nn.Embedding(vocab, d)
            self.norm = nn.LayerNorm(d)
            self.head = nn.Linear(d, vocab, bias=False)

    def build(vocab=50, d=8):
        return Bag(vocab, d)
    """
)

BAG_NAMES = ["embed.weight", "norm.weight", "norm.bias", "head.weight"]
BAG_SHAPES = [(50, 8), (8,), (8,), (50, 8)]

TINY = ["--steps", "1", "--warmup", "0", "--threads", "1", "--device", "cpu"]

#: the Muon peers whose main class refuses an empty parameter list (pytorch_optimizer.Muon takes an empty group)
MUON_PEERS = ["torch.Muon", "heavyball.Muon"]


def _needs(peer: str) -> None:
    package = peers.PEERS[peer].package
    if package != "torch":
        pytest.importorskip(package)


def _stepped(opt) -> list[int]:
    """The ids of the parameters each optimizer (of a StepAll, or the one) holds, all together."""
    opts = opt.opts if isinstance(opt, peers.StepAll) else (opt,)
    return [id(p) for o in opts for g in o.param_groups for p in g["params"]]


@pytest.mark.parametrize("peer", MUON_PEERS)
def test_a_muon_peer_whose_matrices_all_go_aside_by_name_is_built(peer):
    """``Peer.build_on`` sends the embedding and the head to the AdamW beside the peer, then calls the peer's
    ``construct`` on what is left, here only 1-D gains: ``_torch_muon`` / ``_hb_muon`` then build
    ``torch.optim.Muon([])`` / ``heavyball.Muon([])``, which raise "optimizer got an empty parameter list".
    kronopt's own ``muon`` on the same names sends every parameter to its AdamW and runs. Right: when nothing
    the peer's main class takes is left (``not self.takes(shapes of main)``), ``build_on`` builds no main
    optimizer (e.g. every parameter to the fallback's AdamW, as the preset does), each parameter stepped once."""
    _needs(peer)
    params = [torch.nn.Parameter(torch.zeros(s)) for s in BAG_SHAPES]
    opt, size = peers.build(peer, params, BAG_NAMES)
    assert sorted(_stepped(opt)) == sorted(id(p) for p in params)
    for p in params:
        p.grad = torch.ones_like(p)
    with peers.eager():
        opt.step()
    assert size() > 0


@pytest.mark.parametrize("peer", MUON_PEERS)
def test_bench_on_such_a_model_does_not_report_the_peer_as_a_library_failure(peer, tmp_path, capsys):
    """``check_bench`` admits torch.Muon on the model because ``Peer.takes`` reads the shapes alone (two 2-D
    shapes), but after ``build_on``'s routing by name nothing 2-D is left for Muon, so the table says
    ``torch.Muon  failed when built: ValueError: optimizer got an empty parameter list`` (the row the bench keeps
    for another library's bug) beside kronopt's muon, which ran on the same names. Right: the peer is built as
    the preset routes (the row has figures), or ``check_bench`` refuses it with a usage error (exit status 2)
    that names it, judged on the shapes the routing leaves it."""
    _needs(peer)
    (tmp_path / "bag.py").write_text(BAG)
    rc = cli.main(["bench", "muon", peer, "--model", f"{tmp_path / 'bag.py'}:build", *TINY])
    out, err = capsys.readouterr()
    if rc == 2:
        assert peer in err
        return
    assert rc == 0, err
    [row] = [line for line in out.splitlines() if line.split()[:1] == [peer]]
    assert "failed" not in row, row


def test_names_fewer_than_the_parameters_are_not_silently_dropped():
    """``build_on`` zips ``params`` with one flag per *name*: given fewer names than parameters (a caller's
    slip), the parameters past the last name are in neither list, so ``peers.build("torch.Muon", [embedding,
    matrix, bias], ["embed.weight"])`` returns an AdamW over the embedding alone and the matrix and the bias are
    never stepped (without any name matched, the same call steps them all). kronopt's own routing raises on the
    same input. Right: a ``ValueError`` when ``names`` is given and ``len(names) != len(params)``."""
    params = [torch.nn.Parameter(torch.zeros(s)) for s in [(10, 4), (8, 4), (8,)]]
    try:
        opt, _ = peers.build("torch.Muon", params, ["embed.weight"])
    except ValueError:
        return
    assert sorted(_stepped(opt)) == sorted(id(p) for p in params), "parameters left out of every optimizer"


@pytest.mark.parametrize("where", ["nets (1).py", "run (1)/nets.py"])
def test_a_model_file_whose_path_has_a_parenthesis_loads(tmp_path, where):
    """``_factory_call`` splits the spec at its first ``(`` before looking for ``path.py:factory``, so a file in
    ``run (1)/`` or named ``nets (1).py`` (a browser's second download, Windows' ``Program Files (x86)``) is
    refused as "'…' is not module:factory (…)" although it is exactly path/to/nets.py:factory, with or without
    arguments, and no spelling reaches it. Right: the factory's argument list is the ``(`` after the
    ``.py:factory`` part (e.g. split the name at the last ``.py:`` first, or match
    ``^(.+\\.py):([\\w.]+)\\s*(\\(.*)?$``), so the path may hold any character."""
    path = tmp_path / where
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(BAG)
    assert bench.model_params(f"{path}:build").shapes == tuple(BAG_SHAPES)
    assert bench.model_params(f"{path}:build(vocab=20, d=4)").shapes == ((20, 4), (4,), (4,), (20, 4))
