"""Fetch torchvision ImageNet weights into the torch hub cache, at image build time.

Usage (the Dockerfile runs it with TORCH_HOME set):
    TORCH_HOME=/opt/torch python tools/fetch_weights.py ResNet18_Weights.IMAGENET1K_V1 ...

Each argument names a torchvision weights enum member. Its file lands in
$TORCH_HOME/hub/checkpoints under the basename of the member's URL (for example
resnet18-f37072fd.pth), the layout TRANSFER_WEIGHTS_DIR points at. The SHA-256 prefix in that
name is checked and the file is loaded with weights_only=True, so a truncated or altered
download fails the build. `--dry-run` only resolves the names and prints the file names
(no network), which is how this script is tested where nothing can be downloaded.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlparse


def resolve(spec: str) -> Any:
    """Return the torchvision weights member for a spec like 'ResNet18_Weights.IMAGENET1K_V1'."""
    import torchvision.models

    enum_name, _, member = spec.partition(".")
    weights_enum = getattr(torchvision.models, enum_name, None)
    if weights_enum is None or not member:
        raise SystemExit(f"unknown weights {spec!r}: expected e.g. ResNet18_Weights.IMAGENET1K_V1")
    try:
        return weights_enum[member]
    except KeyError:
        raise SystemExit(f"{enum_name} has no member {member!r}") from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("weights", nargs="+", help="e.g. ResNet18_Weights.IMAGENET1K_V1")
    parser.add_argument("--dry-run", action="store_true", help="resolve and print, no download")
    args = parser.parse_args(argv)

    import torch.hub

    if not args.dry_run and "TORCH_HOME" not in os.environ:
        print("TORCH_HOME is not set: refusing to fill the user's own cache", file=sys.stderr)
        return 2
    checkpoints = Path(torch.hub.get_dir()) / "checkpoints"
    for spec in args.weights:
        weights = resolve(spec)
        file_name = Path(urlparse(weights.url).path).name
        if args.dry_run:
            print(f"{spec}: {weights.url} -> {checkpoints / file_name}")
            continue
        # get_state_dict -> torch.hub.load_state_dict_from_url(url, **kwargs)
        weights.get_state_dict(
            progress=False, check_hash=True, weights_only=True, map_location="cpu"
        )
        path = checkpoints / file_name
        if not path.is_file():
            print(f"{spec}: expected {path} after download", file=sys.stderr)
            return 1
        print(f"{spec}: {path} ({path.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
