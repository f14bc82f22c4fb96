"""The ``kronopt`` command line: the parser, ``main``, and the ``stages`` and ``show`` subcommands.

Every other subcommand lives in a module of its own, listed in :data:`COMMANDS`;
each such module has ``add_subcommand(subparsers)``, which adds its parser and
sets ``func`` to the function that runs it. Every subcommand checks all of its
arguments before it starts working (see :mod:`kronopt.app._args`): a bad one stops
it with exit code 2 and one message naming each problem, never with a traceback.
Ctrl-C stops it with exit code 130 and one line; a subcommand that writes outputs
sets ``args.partial_outputs`` to say where they are before it starts working.
"""

import argparse
import sys
from collections.abc import Sequence
from types import ModuleType

import kronopt
from kronopt.config import ConfigError
from kronopt.registry import SLOTS, PluginError, PluginLoadError

from . import ablate, bench, fisher, spectrum, train
from ._args import Problems
from ._extras import MissingExtraError

#: the modules that add a subcommand with ``add_subcommand(subparsers)``, in ``--help`` order
COMMANDS: list[ModuleType] = [bench, train, ablate, spectrum, fisher]


def cmd_stages(args: argparse.Namespace) -> int:
    if getattr(args, "markdown", False):
        from .docs import stages_markdown

        sys.stdout.write(stages_markdown())
        return 0
    for slot, registry in SLOTS.items():
        print(f"[{slot}]")
        try:
            pending = list(registry.plugins())
        except PluginError as exc:  # discovery itself failed (a collision): no plugin of the slot is usable
            print(f"  ! {exc}")
            pending = []
        for key in pending:  # load each plugin on its own, so one that fails hides none of the others
            try:
                registry.entry(key)
            except (PluginLoadError, PluginError) as exc:
                print(f"  ! {exc}")
        entries = registry.entries(load_plugins=False)
        width = max((len(e.key) for e in entries), default=0)
        for e in entries:
            origin = "" if e.source == "kronopt" else f"  (plugin: {e.source})"
            print(f"  {e.key:<{width}}  {e.description}{origin}")
        print()
    print("presets: " + ", ".join(kronopt.PRESETS))
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    problems = Problems()
    cfg = problems.config(args.config, problems.sets(args.set))
    problems.check()
    sys.stdout.write(kronopt.dumps(cfg))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kronopt", description="Composable matrix-aware optimizers for PyTorch.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("stages", help="list every registered stage, plugins included")
    p.add_argument("--markdown", action="store_true", help="print docs/stages.md (built-in stages, options, maths)")
    p.set_defaults(func=cmd_stages)

    p = sub.add_parser("show", help="print the resolved, validated config (or every error in it)")
    p.add_argument("config", help="a preset name or a TOML file")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a (dotted) key")
    p.set_defaults(func=cmd_show)

    for module in COMMANDS:
        module.add_subcommand(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one ``kronopt`` subcommand; bad arguments, configs or files exit with code 2 and one message.

    argparse itself exits with code 2 and a usage line on an unknown flag or a
    missing value; every other problem with the arguments is collected by the
    subcommand's checks and printed as ``kronopt CMD: invalid arguments (N errors): …``.
    Ctrl-C prints ``kronopt CMD: interrupted`` and where the partial outputs are, and exits with 130.
    """
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        where = getattr(args, "partial_outputs", None)
        print(f"kronopt {args.command}: interrupted" + (f"; {where}" if where else ""), file=sys.stderr)
        return 130
    except ConfigError as exc:
        print(f"kronopt {args.command}: {exc}", file=sys.stderr)
        return 2
    except (PluginLoadError, PluginError, MissingExtraError) as exc:
        print(f"kronopt {args.command}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
