"""Two promises pinned after a review: a compile that torch refuses under ``torch.compiler.set_stance(
"fail_on_recompile")`` falls back to eager like any refused compile (it escaped ``step()`` half taken), and
``kronopt bench --world`` reports a peer that raises as failed and goes on, as the one-process bench does (the
peer's exception ended the bench, and at world sizes > 1 the ranks' meetings would no longer pair).
"""

import sys
import textwrap
import warnings

import pytest
import torch

import kronopt
from kronopt import compiled

pytestmark = pytest.mark.usefixtures("one_thread")


# -- 1c0a680: compile = true under torch.compiler.set_stance("fail_on_recompile") ---------------------------------


@pytest.fixture
def fresh_dynamo(monkeypatch):
    """No graph of an earlier test cached, and kronopt's twins built afresh (none marked failed by an earlier test)."""
    import torch._dynamo

    torch._dynamo.reset()
    monkeypatch.setattr(compiled, "_TWINS", {})
    yield
    torch._dynamo.reset()


def test_a_compile_refused_by_the_fail_on_recompile_stance_falls_back(fresh_dynamo):
    """Under ``torch.compiler.set_stance("fail_on_recompile")`` dynamo refuses to compile a frame it has no graph for,
    raising a plain ``RuntimeError`` ("Detected recompile when torch.compile stance is 'fail_on_recompile'") at the
    frame's entry, before the compiled function ran: nothing was written. That is a failure to compile, which
    ``kronopt/compiled.py`` promises to take with one warning and an eager run (and did before 1c0a680, whose
    ``except compiler_errors()`` now lets it through: it is neither a ``TorchDynamoException`` nor an inductor error).
    Right: one ``RuntimeWarning`` naming the function, the eager result, ``failed`` set."""
    twin = compiled.Compiled(lambda x: x * 2 + 1, "the test function")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.compiler.set_stance("fail_on_recompile"):
            out = twin(torch.ones(2))  # raises RuntimeError("Detected recompile ...") on the current code
    assert out.tolist() == [3.0, 3.0]
    assert twin.failed
    said = "torch.compile of the test function failed"
    mine = [w for w in caught if issubclass(w.category, RuntimeWarning) and said in str(w.message)]
    assert len(mine) == 1, [str(w.message) for w in caught]


def test_a_step_under_the_fail_on_recompile_stance_is_not_left_half_taken(fresh_dynamo):
    """A muon optimizer with ``compile = true`` stepped under ``set_stance("fail_on_recompile")`` (as a user sets it
    after warming up a compiled model): the fallback bucket (the bias, AdamW) is written, then the Newton–Schulz
    twin's refused compile raises out of ``step()``, so the bias moved and the weight did not, and the step counters
    of the two pipelines now disagree. Right: the refused compile falls back to eager (one warning) and the whole
    step is taken: every parameter moves, as an eager step moves it."""
    gen = torch.Generator().manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(8, 4, generator=gen))
    bias = torch.nn.Parameter(torch.randn(6, generator=gen))
    eager_w = torch.nn.Parameter(weight.detach().clone())
    eager_b = torch.nn.Parameter(bias.detach().clone())
    grads = [torch.randn(8, 4, generator=gen), torch.randn(6, generator=gen)]
    opt = kronopt.build([("blocks.0.weight", weight), ("blocks.0.bias", bias)], "muon", compile=True)
    ref = kronopt.build([("blocks.0.weight", eager_w), ("blocks.0.bias", eager_b)], "muon")
    for p, q, g in zip((weight, bias), (eager_w, eager_b), grads):
        p.grad, q.grad = g.clone(), g.clone()
    ref.step()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        with torch.compiler.set_stance("fail_on_recompile"):
            opt.step()
    torch.testing.assert_close(weight.detach(), eager_w.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(bias.detach(), eager_b.detach(), rtol=1e-5, atol=1e-6)


# -- 051a7fc: kronopt bench --world with a peer that raises ---------------------------------------------------------

FAKE_PEER = textwrap.dedent(
    '''
    import torch


    class Breaks(torch.optim.Optimizer):
        """Raises at its second step (on rank 1 alone where there are ranks), as a peer's bug would."""

        def __init__(self, params):
            super().__init__(params, {})
            self.k = 0

        @torch.no_grad()
        def step(self, closure=None):
            import torch.distributed as dist

            self.k += 1
            if self.k == 2 and (not dist.is_initialized() or dist.get_rank() == 1):
                raise RuntimeError("boom at the second step")
    '''
)
MODULE = "review_s27_fake_peer"


@pytest.fixture
def fake_peer(tmp_path, monkeypatch):
    (tmp_path / f"{MODULE}.py").write_text(FAKE_PEER)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, MODULE, raising=False)
    yield f"{MODULE}:Breaks"
    sys.modules.pop(MODULE, None)


def test_bench_world_reports_a_peer_that_raises_and_goes_on(fake_peer, capsys):
    """README ("A peer that raises, when built or at a step (another library's bug), is stepped no more in that run
    and reported as failed, with the step and the exception; the others go on") and the commit message promise this
    of ``kronopt bench``, and its other flags (``--repeat``, ``--scaling``, ``--alone``, ``--ratio``) keep it; but
    ``--world`` (``bench_world`` → ``_rank_rows``) steps every optimizer with no such guard: the peer's
    ``RuntimeError`` ends the whole bench (a ``ProcessRaisedException`` at world sizes > 1), and kronopt's own rows are
    lost. Right: exit code 0, the peer's row says it failed at step 2 with the exception, adamw's row has figures."""
    from kronopt.app import cli

    argv = ["bench", fake_peer, "adamw", "--shapes", "4x4", "--steps", "3", "--warmup", "0", "--threads", "1",
            "--world", "1"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "failed at step 2" in out and "boom at the second step" in out
    adamw = [line for line in out.splitlines() if line.split()[1:2] == ["adamw"]]
    assert len(adamw) == 1, out


def test_bench_world_drops_a_peer_that_raised_on_one_rank_on_every_rank(fake_peer, capsys, monkeypatch):
    """Two ranks, the peer raising on rank 1 alone: both ranks stop stepping it (they agree before each step),
    so the bench neither hangs nor ends, and the row names the rank it raised on."""
    from kronopt.app import bench, cli

    monkeypatch.setattr(bench, "START_METHOD", "fork")  # one thread per rank: forking is safe, and starts faster
    argv = ["bench", fake_peer, "adamw", "--shapes", "4x4", "--steps", "3", "--warmup", "0", "--threads", "1",
            "--world", "2"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "failed at step 2: RuntimeError: boom at the second step (on rank 1)" in out, out
    adamw = [line.split() for line in out.splitlines() if line.split()[1:2] == ["adamw"]]
    assert len(adamw) == 1 and adamw[0][0] == "2" and float(adamw[0][2]) > 0, out
