"""`transfer backbones`, `heads`, `head`, `report`, `export`, `delete-head` and
`delete-dataset`: what the server holds."""

from __future__ import annotations

import argparse
from pathlib import Path

from transfer_client import _render as render
from transfer_client._cli_commands import AddCommand
from transfer_client._report import add_arguments as add_report_arguments
from transfer_client._report import report as report_command
from transfer_client._sync import TransferClient
from transfer_client.types import Backbone, Head


def register(add: AddCommand) -> None:
    add("backbones", _backbones, "list the backbones and their state")
    heads = add("heads", _heads, "list trained heads")
    heads.add_argument("--backbone", default="", help="only heads on this backbone")
    heads.add_argument("--name", default="", help="only heads of this name")
    add("head", _head, "show a trained head").add_argument("head_id", metavar="HEAD_ID")
    add_report_arguments(
        add("report", report_command, "a head's evaluation report (--plots DIR: PNGs too)")
    )
    export = add("export", _export, "write a head with its backbone as an ONNX model")
    export.add_argument("head_id", metavar="HEAD")
    export.add_argument("path", type=Path, metavar="OUT.onnx")
    delete_head = add("delete-head", _delete_head, "delete one version of a head")
    delete_head.add_argument("head_id", metavar="HEAD", help="a head id, or NAME@VERSION")
    delete_head.add_argument(
        "--force",
        action="store_true",
        help="also when an alias points at it (the aliases are removed with it)",
    )
    add("delete-dataset", _delete_dataset, "delete an uploaded dataset (frees quota)").add_argument(
        "dataset_id", metavar="DATASET_ID"
    )


def _backbones(client: TransferClient, args: argparse.Namespace) -> int:
    backbones = client.list_backbones()
    if args.json:
        print(render.to_json(backbones))
        return 0
    print(
        render.table(
            ("NAME", "MODALITY", "STATE", "PARAMS", "FEATURES", "INPUT", "DEVICE", "NOTE"),
            (_backbone_row(backbone) for backbone in backbones),
        )
    )
    return 0


def _backbone_row(backbone: Backbone) -> tuple[str, ...]:
    return (
        backbone.name,
        backbone.modality,
        backbone.state,
        render.count(backbone.parameter_count),
        str(backbone.feature_dim),
        str(backbone.input_size),
        backbone.device or "-",
        backbone.unavailable_reason,
    )


def _heads(client: TransferClient, args: argparse.Namespace) -> int:
    heads = client.list_heads(backbone=args.backbone, name=args.name)
    if args.json:
        print(render.to_json(heads))
        return 0
    print(
        render.table(
            ("HEAD", "VERSION", "ALIASES", "BACKBONE", "CLASSES", "VAL ACC", "SIZE", "CREATED"),
            (_head_row(head) for head in heads),
        )
    )
    return 0


def _head_row(head: Head) -> tuple[str, ...]:
    return (
        head.head_id,
        _version(head),
        ",".join(head.aliases) or "-",
        head.backbone,
        str(len(head.class_names)),
        render.percent(head.metrics.validation_accuracy),
        render.size(head.size_bytes),
        render.local_time(head.created_time),
    )


def _version(head: Head) -> str:
    return str(head.version) if head.version else "-"  # 0: a server older than versions


def _head(client: TransferClient, args: argparse.Namespace) -> int:
    head = client.get_head(args.head_id)
    if args.json:
        print(render.to_json(head))
        return 0
    metrics = head.metrics
    print(
        render.fields(
            [
                ("head", head.head_id),
                ("name", head.name),
                ("version", _version(head)),
                ("aliases", ", ".join(head.aliases) or "-"),
                ("backbone", f"{head.backbone} ({head.modality}, input {head.input_size})"),
                ("classes", ", ".join(head.class_names)),
                ("trainable blocks", str(head.trainable_blocks)),
                ("train acc", render.percent(metrics.train_accuracy)),
                ("val acc", render.percent(metrics.validation_accuracy)),
                ("epochs", f"{metrics.epochs_run} (best {metrics.best_epoch})"),
                ("trained in", render.duration(metrics.training_seconds)),
                ("size", render.size(head.size_bytes)),
                ("created", render.local_time(head.created_time)),
                ("job", head.job_id or "-"),
            ]
        )
    )
    return 0


def _export(client: TransferClient, args: argparse.Namespace) -> int:
    size = client.export_head(args.head_id, args.path)
    if args.json:
        print(render.to_json({"path": str(args.path), "size_bytes": size}))
    else:
        print(f"wrote {args.path} ({render.size(size)}, ONNX)")
    return 0


def _delete_head(client: TransferClient, args: argparse.Namespace) -> int:
    client.delete_head(args.head_id, force=args.force)
    if not args.json:
        print(f"deleted {args.head_id}")
    return 0


def _delete_dataset(client: TransferClient, args: argparse.Namespace) -> int:
    client.delete_dataset(args.dataset_id)
    if not args.json:
        print(f"deleted {args.dataset_id}")
    return 0
