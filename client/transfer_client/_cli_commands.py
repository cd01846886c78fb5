"""What each `transfer` command module shares: the command signature and how a command is
added to the parser."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Protocol

from transfer_client._sync import TransferClient

Command = Callable[[TransferClient, argparse.Namespace], int]


class AddCommand(Protocol):
    """Adds subcommand `name` running `command`, with the global options; returns its parser
    for the command's own arguments."""

    def __call__(self, name: str, command: Command, help_text: str) -> argparse.ArgumentParser: ...
