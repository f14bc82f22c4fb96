"""Edges a review of the session's changes found, each pinned: ``nonfinite = "raise"`` names an overflow only an
owner saw on every rank (FSDP2, a work-sharding first call), a checkpoint whose groups hold keys now refused per
group still loads, a refused load changes nothing (the stages' refusals of a layout come before the commit), the
"different config" warning points at the caller, and a group built with a one-entry tensor learning rate steps as
with its number."""

import copy
import json
import tempfile
import warnings
from pathlib import Path

import pytest
import torch

import kronopt

# -- nonfinite = "raise" where an update or new state overflows (b47aee6) -----------------------------------------


def _huge_at(step, k, i):
    """Gradient scale: 1e30 (its square overflows float32) for block 0 at ``step``, else 1."""
    return 1e30 if (k == step and i == 0) else 1.0


def test_fsdp2_raise_names_a_block_whose_update_overflowed():
    """BUG (``kronopt/optimizer.py``, ``KronOptimizer._step_fsdp`` and ``_step_fsdp_elementwise``).

    b47aee6 made ``nonfinite = "raise"`` raise ``FloatingPointError`` at the end of a step where a finite gradient's
    update or new state overflowed ("it was skipped in silence"). The FSDP2 paths queue their report with
    ``grad_ok``, the gradients' flags alone, which "raise" has already checked all True: the owner's verdict on the
    update (the NaN it writes into the direction, the mask every rank writes with) never reaches the report. So under
    FSDP2 such a block is still skipped in silence: ``step()`` returns, only ``nonfinite_counts()`` moves. Shown on a
    one-rank mesh (no question of ranks disagreeing); the same bucket in one process raises.

    Right behaviour: as in one process, ``step()`` raises ``FloatingPointError`` naming ``0.weight`` (the ranks agreeing
    on the verdict, e.g. from the masks they write with, so that every rank raises alike)."""
    import torch.distributed as dist

    if dist.is_initialized():
        pytest.skip("a process group is up already")
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import distribute_tensor

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        mesh = DeviceMesh("cpu", [0])
        model = torch.nn.Sequential(torch.nn.Linear(6, 5, bias=False), torch.nn.Linear(5, 4, bias=False))
        init = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(torch.randn(p.shape, generator=init))
        fully_shard(model, mesh=mesh)
        named = list(model.named_parameters())
        opt = kronopt.build(named, "soap", nonfinite="raise", lr=1e-2)
        assert all(b.fsdp is not None and not b.fsdp.elementwise for b in opt._buckets)  # the owned FSDP2 path
        gen = torch.Generator().manual_seed(1)
        for k in range(3):  # past SOAP's first call, which only observes
            for i, (_, p) in enumerate(named):
                p.grad = distribute_tensor(torch.randn(p.shape, generator=gen), mesh, p.placements)
            opt.step()
        before = named[0][1].full_tensor().clone()
        for i, (_, p) in enumerate(named):
            p.grad = distribute_tensor(torch.randn(p.shape, generator=gen) * _huge_at(3, 3, i), mesh, p.placements)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with pytest.raises(FloatingPointError, match=r"overflowed \(non-finite\) in: 0\.weight"):
                opt.step()
        assert torch.equal(named[0][1].full_tensor(), before)  # skipped, as it is now
    finally:
        dist.destroy_process_group()


def _sharded_rank(rank, world, init, out):
    """One rank of the work-sharding test: SOAP, block 0's first gradient 1e30 (its first call only observes, and its
    new factors overflow); which steps raised ``FloatingPointError``."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        raised, opt = _soap_overflow_run()
        sharded = all(b.plan is not None for b in opt._buckets)
        Path(out, f"rank{rank}.json").write_text(json.dumps({"raised": raised, "sharded": sharded}))
    finally:
        dist.destroy_process_group()


def _soap_overflow_run():
    """SOAP under ``nonfinite = "raise"``, block 0's first gradient 1e30: the steps that raised, and the optimizer."""
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in [(6, 5), (6, 5), (4, 3)]]
    opt = kronopt.build(params, "soap", nonfinite="raise", lr=1e-2)
    ggen = torch.Generator().manual_seed(1)
    raised = []
    for k in range(2):
        for i, p in enumerate(params):
            p.grad = torch.randn(p.shape, generator=ggen) * _huge_at(0, k, i)
        try:
            opt.step()
        except FloatingPointError:
            raised.append(k)
    return raised, opt


def _single_process_raised():
    return _soap_overflow_run()[0]


def test_work_sharding_raise_names_a_first_call_whose_new_state_overflowed():
    """BUG (``kronopt/optimizer.py``, ``KronOptimizer._step_sharded``).

    Under work sharding every rank reports ``ok_all``: the gradients' flags and the finiteness of the gathered
    directions, where an owner marks an overflowed block with NaN. On a call that only observes (SOAP's first,
    ``skip_first_call``) nothing is gathered, so the owner's verdict on the new state (``ok_new``: the factors
    ``G Gᵀ`` of a 1e30 gradient overflow float32) reaches no report: the owner keeps the old state for that block, and
    under ``nonfinite = "raise"`` no rank raises (under ``"warn"`` none warns). One process raises at that very step
    (checked here too), as b47aee6 promises; the docstring of ``_step_sharded``'s report says "on every rank, the
    blocks the unsharded run would name".

    Right behaviour: every rank raises ``FloatingPointError`` at step 0, as one process does (the owner's verdict
    shared, e.g. in the gather the later calls make or a small all-reduce of the flags)."""
    assert _single_process_raised() == [0]
    with tempfile.TemporaryDirectory(prefix="kronopt-review-") as out:
        init = Path(out, "store").resolve().as_uri()
        torch.multiprocessing.start_processes(
            _sharded_rank, args=(2, init, out), nprocs=2, join=True, start_method="fork"
        )
        ranks = [json.loads(Path(out, f"rank{r}.json").read_text()) for r in range(2)]
    assert all(r["sharded"] for r in ranks)
    assert [r["raised"] for r in ranks] == [[0], [0]]


# -- load_state_dict (992e3cd, f1d26fc, 6679732) ------------------------------------------------------------------


def test_a_checkpoint_whose_group_overrides_name_a_top_level_only_key_still_loads():
    """BUG (``kronopt/optimizer.py``, ``KronOptimizer._with_overrides`` reached from ``_loaded`` via
    ``_group_config``).

    992e3cd refuses a param group that sets ``nonfinite``, ``nonfinite_scope``, ``max_skipped_steps`` or
    ``distributed.*``. kronopt before it accepted such a group (and ignored the key) and saved it in the group's
    ``overrides`` of every ``state_dict()``. The refusal also runs on the *saved* groups, so such a checkpoint no
    longer loads: ``load_state_dict`` and ``kronopt.from_state_dict`` raise ``ConfigError`` (the docs promise that
    state dicts of earlier versions load; nothing in them is wrong, the key never had an effect).

    Right behaviour: the checkpoint loads (the key dropped, perhaps with a warning) and the optimizer steps on."""
    gen = torch.Generator().manual_seed(0)
    w = torch.nn.Parameter(torch.randn(6, 5, generator=gen))
    opt = kronopt.build([w], "adamw")
    w.grad = torch.randn(6, 5, generator=gen)
    opt.step()
    old = copy.deepcopy(opt.state_dict())
    old["param_groups"][0]["overrides"] = {"nonfinite": "skip"}  # as kronopt wrote it before 992e3cd
    w2 = torch.nn.Parameter(w.detach().clone())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fresh = kronopt.build([w2], "adamw")
        fresh.load_state_dict(old)
        rebuilt = kronopt.from_state_dict([w2], old)
    w2.grad = torch.randn(6, 5, generator=gen)
    fresh.step()
    rebuilt.step()


@pytest.mark.parametrize("trainable", [False, True], ids=["frozen", "trainable"])
def test_a_refused_load_leaves_the_optimizer_as_it_was(trainable):
    """BUG (``kronopt/optimizer.py``, ``KronOptimizer.load_state_dict``: ``_materialize`` after the commit point).

    ``load_state_dict`` promises "Everything is validated before anything changes: a state dict that does not fit
    (another model, ...) raises ValueError and leaves the optimizer as it was", and 6679732 adds "nothing changed
    until all agree". But the saved groups' configs meet the buckets that have no saved state only in
    ``_materialize``, which runs after torch's ``load_state_dict`` has replaced the groups and kronopt its buckets
    and configs. Since f1d26fc a *frozen* parameter's layout is tried there (``_try_layout``), so a dict saved by
    another model (here a group override ``shapes.precondition_1d`` that pro_dykaf cannot keep for this optimizer's
    1-D parameter) raises ``ValueError`` half loaded: the groups now hold the saved overrides, and the next ``step()``
    raises ``RuntimeError: optimizer.state lost entries``. Before f1d26fc the frozen case loaded (and stepped); a
    trainable parameter without saved state (``trainable``) fails the same way, through ``_init_bucket``.

    Right behaviour: the dict is refused with ``ValueError`` before anything changes (try the layouts in
    ``_loaded``), and the optimizer steps on as before; or, for the frozen parameter as before f1d26fc, it loads
    whole and steps."""
    gen = torch.Generator().manual_seed(0)
    w = torch.nn.Parameter(torch.randn(8, 6, generator=gen))
    other = torch.nn.Parameter(torch.randn(5, 7, generator=gen), requires_grad=False)  # no state saved for it
    saved = kronopt.build([{"params": [w, other], "shapes.precondition_1d": True}], "pro_dykaf").state_dict()

    w_b = torch.nn.Parameter(torch.randn(8, 6, generator=gen))
    b = torch.nn.Parameter(torch.randn(8, generator=gen), requires_grad=trainable)
    opt = kronopt.build([w_b, b], "pro_dykaf")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            opt.load_state_dict(saved)
        except ValueError:  # refused: then nothing of the dict may have been taken
            assert opt.param_groups[0]["overrides"] == {}, "the refused dict's group overrides were taken"
    w_b.grad = torch.randn(8, 6, generator=gen)
    if trainable:
        b.grad = torch.randn(8, generator=gen)
    opt.step()


def test_the_different_config_warning_of_load_state_dict_points_at_the_caller():
    """BUG (``kronopt/optimizer.py``, ``KronOptimizer._loaded``).

    6679732 moved ``load_state_dict``'s checks into ``_loaded`` and with them the "loading optimizer state saved
    under a different config" warning, keeping ``stacklevel=2``: the warning now names ``kronopt/optimizer.py`` (its
    caller ``load_state_dict``) instead of the user's line. Besides the misleading location, Python's default filter
    shows a warning once per location, so after the first load anywhere in the process every later mismatch is
    silent.

    Right behaviour: the warning points at the code that called ``load_state_dict`` (``stacklevel=3`` from
    ``_loaded``), as it did before 6679732."""
    w = torch.nn.Parameter(torch.randn(6, 5))
    saved = kronopt.build([w], "adamw", lr=1e-2).state_dict()
    opt = kronopt.build([w], "adamw", lr=1e-3, **{"inner.eps": 1e-6})
    with pytest.warns(UserWarning, match="different config") as record:
        opt.load_state_dict(saved)
    assert [r.filename for r in record if "different config" in str(r.message)] == [__file__]


# -- tensor rates (d949148) ---------------------------------------------------------------------------------------


def test_a_group_built_with_a_tensor_learning_rate_steps_as_with_its_number():
    """BUG (``kronopt/optimizer.py``, ``KronOptimizer._split_user_group`` → config ``lr: to_float``).

    d949148 documents (docs/architecture.md) "A group's ``lr`` and ``weight_decay`` may be numbers or tensors, as
    torch.optim allows: a one-entry CPU tensor is read as a float where the step uses it". That holds for a tensor
    set on ``param_groups`` after the build, but a group (or ``build``) given a tensor ``lr`` is refused with
    ``ConfigError: param_groups[0].lr: must be a number, got tensor(0.0100, ...)``, where
    ``torch.optim.AdamW([{"params": ..., "lr": torch.tensor(0.01)}])`` builds.

    Right behaviour: the one-entry tensor is accepted (read as its number, as the step reads it), and the run equals
    the one with the float ``lr`` (or the documentation says tensors are accepted only once built)."""
    gen = torch.Generator().manual_seed(0)
    a = torch.nn.Parameter(torch.randn(6, 5, generator=gen))
    b = torch.nn.Parameter(a.detach().clone())
    ours = kronopt.build([{"params": [a], "lr": torch.tensor(1e-2, dtype=torch.float64)}], "adamw")
    ref = kronopt.build([{"params": [b], "lr": 1e-2}], "adamw")
    for _ in range(3):
        g = torch.randn(6, 5, generator=gen)
        a.grad, b.grad = g.clone(), g.clone()
        ours.step()
        ref.step()
    assert torch.equal(a.detach(), b.detach())


def test_a_saved_integer_rank_against_a_running_fraction_is_a_different_config():
    """``split.rank = 1`` (one direction) and ``1.0`` (the whole side) are different configs: loading the one's state
    into the other warns of it (the saved and running configs were compared as plain dicts, where ``1 == 1.0``)
    before the layouts' mismatch refuses it."""
    p = [torch.nn.Parameter(torch.randn(8, 6, generator=torch.Generator().manual_seed(3)))]
    one = kronopt.build(p, "pro_soap", **{"split.rank": 1})
    whole = kronopt.build(p, "pro_soap", **{"split.rank": 1.0})
    p[0].grad = torch.ones(8, 6)
    one.step()
    with pytest.warns(UserWarning, match="saved under a different config"), pytest.raises(ValueError, match="does not fit"):
        whole.load_state_dict(one.state_dict())
