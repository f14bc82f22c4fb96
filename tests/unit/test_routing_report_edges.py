"""Edges of the routing report of ``kronopt bench --model`` (``bench.routing``, ``_print_routing``)."""

from kronopt.app import cli

MODEL = "kronopt.app.task.model:TinyGPT(layers=1, width=16, heads=2, context=8)"


def test_the_world_table_of_a_model_also_reports_its_routing(capsys):
    """What is wrong: ``cmd_bench`` returns from ``_cmd_world`` before ``_print_routing`` runs, so
    ``kronopt bench kl_shampoo --model ... --world 1`` prints no routing table, although --model with --world is
    accepted and README/architecture.md say the bench on a model prints where each preset sends the parameters
    (the routing does not depend on the world size). What is right: the same "routing:" lines after the world
    table (call ``_print_routing(plan)`` in ``_cmd_world`` too when ``plan.params.source``)."""
    args = ["bench", "kl_shampoo", "--model", MODEL, "--world", "1", "--steps", "1", "--warmup", "0",
            "--threads", "1", "--device", "cpu"]
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    assert "routing:" in out
    assert "kl_shampoo  pipeline 4" in out
