"""`transfer alias` and `transfer unalias`: point a head name's alias (e.g. `production`) at
one of its versions, which is how a version is promoted or rolled back; callers of
`NAME@ALIAS` (and of a bare `NAME`, for `production`) follow it."""

from __future__ import annotations

import argparse

from transfer_client import _render as render
from transfer_client._cli_commands import AddCommand
from transfer_client._sync import TransferClient


def register(add: AddCommand) -> None:
    alias = add(
        "alias",
        _alias,
        "point an alias of a head name at one of its versions (promote, roll back)",
    )
    alias.add_argument("name", metavar="NAME", help="the head name (finetune --head-name)")
    alias.add_argument("alias", metavar="ALIAS", help="e.g. production; `latest` is reserved")
    alias.add_argument("version", type=int, metavar="VERSION", help="an existing version")
    unalias = add("unalias", _unalias, "remove an alias of a head name (its version stays)")
    unalias.add_argument("name", metavar="NAME")
    unalias.add_argument("alias", metavar="ALIAS")


def _alias(client: TransferClient, args: argparse.Namespace) -> int:
    head = client.set_head_alias(args.name, args.alias, args.version)
    if args.json:
        print(render.to_json(head))
    else:
        print(f"{args.name}@{args.alias} -> version {head.version} ({head.head_id})")
    return 0


def _unalias(client: TransferClient, args: argparse.Namespace) -> int:
    client.delete_head_alias(args.name, args.alias)
    if not args.json:
        print(f"removed {args.name}@{args.alias}")
    return 0
