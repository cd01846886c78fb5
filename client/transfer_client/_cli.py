"""The `transfer` command: the SDK from a shell. This module wires the parser and runs a
command; the commands live in the `_cli_*` modules."""

from __future__ import annotations

import argparse
import os
import sys

from transfer_client import (
    _cli_heads,
    _cli_history,
    _cli_jobs,
    _cli_names,
    _cli_predict,
    _cli_train,
)
from transfer_client._cli_commands import Command
from transfer_client._cli_options import global_options, open_client
from transfer_client.errors import TransferError, UnavailableError


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    command: Command = args.command
    try:
        with open_client(args) as client:
            code = command(client, args)
        sys.stdout.flush()  # a closed pipe shows here, inside the handler below
        return code
    except BrokenPipeError:
        return _stdout_closed()
    except TransferError as err:
        print(f"error: {err.message} ({err.code})", file=sys.stderr)
        for note in getattr(err, "__notes__", ()):  # e.g. the file behind examples[17]
            print(f"  {note}", file=sys.stderr)
        if isinstance(err, UnavailableError) and err.request_id is None:
            print(
                f"  no server answered at {args.target}: is it running? Choose the server "
                "with --target HOST:PORT or the TRANSFER_TARGET environment variable.",
                file=sys.stderr,
            )
        return 1
    except (OSError, ValueError) as err:  # unreadable files, malformed data sets
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130  # the shell's convention for "interrupted by SIGINT"


def _stdout_closed() -> int:
    """The reader of stdout went away (`transfer heads | head -1`): stop quietly, as the
    Python docs' note on SIGPIPE advises. stdout is pointed at /dev/null so that the
    interpreter's own flush at exit does not fail a second time."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # stdout is no file descriptor (captured in a test)
        pass
    return 1


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

    for module in (_cli_heads, _cli_names, _cli_train, _cli_predict, _cli_jobs, _cli_history):
        module.register(add)
    return parser


if __name__ == "__main__":
    sys.exit(main())
