"""The `transfer` command: the SDK from a shell. This module wires the parser and runs a
command; the commands live in the `_cli_*` modules."""

from __future__ import annotations

import argparse
import sys

from transfer_client import _cli_heads, _cli_jobs, _cli_predict, _cli_train
from transfer_client._cli_commands import Command
from transfer_client._cli_options import global_options, open_client
from transfer_client.errors import TransferError


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    command: Command = args.command
    try:
        with open_client(args) as client:
            return command(client, args)
    except TransferError as err:
        print(f"error: {err.message} ({err.code})", file=sys.stderr)
        return 1
    except (OSError, ValueError) as err:  # unreadable files, malformed data sets
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130  # the shell's convention for "interrupted by SIGINT"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="transfer",
        description="Fine-tune and use task heads on the transfer service.",
        parents=[global_options(with_defaults=True)],
    )
    common = [global_options(with_defaults=False)]
    commands = parser.add_subparsers(title="commands", required=True, metavar="COMMAND")

    def add(name: str, command: Command, help_text: str) -> argparse.ArgumentParser:
        subparser = commands.add_parser(name, parents=common, help=help_text)
        subparser.set_defaults(command=command)
        return subparser

    for module in (_cli_heads, _cli_train, _cli_predict, _cli_jobs):
        module.register(add)
    return parser


if __name__ == "__main__":
    sys.exit(main())
