"""Head names through the CLI (issue 18): versions in `heads`/`head`, `alias` to promote and
roll back, `predict NAME@ALIAS` saying which version answered, `unalias`, and
`delete-head --force` for a version an alias points at."""

from __future__ import annotations

import json
from pathlib import Path

from tests.client.conftest import Transfer


def _train(transfer: Transfer, image_folder: Path, name: str, seed: str) -> str:
    trained = transfer(
        "finetune", "efficientnet_lite0", str(image_folder),
        "--head-name", name, "--solver", "adamw", "--epochs", "1", "--seed", seed,
    )  # fmt: skip
    assert trained.code == 0, trained.err
    return trained.out.strip()


def _answered_by(transfer: Transfer, reference: str, image: Path) -> tuple[str, int]:
    result = transfer("--json", "predict", reference, str(image))
    assert result.code == 0, result.err
    [answer] = json.loads(result.out)
    return answer["prediction"]["head_id"], answer["prediction"]["head_version"]


def test_versions_aliases_and_rollback(
    transfer: Transfer, image_folder: Path, test_images: list[Path]
) -> None:
    first = _train(transfer, image_folder, "cli-names", "1")
    second = _train(transfer, image_folder, "cli-names", "2")
    assert first != second

    heads = transfer("heads", "--name", "cli-names")
    assert heads.code == 0, heads.err
    rows = {line.split()[0]: line.split() for line in heads.out.splitlines()[1:]}
    assert rows[first][1:3] == ["1", "-"] and rows[second][1:3] == ["2", "-"]

    promoted = transfer("alias", "cli-names", "production", "1")
    assert promoted.code == 0, promoted.err
    assert promoted.out.strip() == f"cli-names@production -> version 1 ({first})"
    # A bare name means its production alias once one is set, else its latest version.
    assert _answered_by(transfer, "cli-names@production", test_images[0]) == (first, 1)
    assert _answered_by(transfer, "cli-names", test_images[0]) == (first, 1)
    assert _answered_by(transfer, "cli-names@latest", test_images[0]) == (second, 2)
    assert _answered_by(transfer, "cli-names@2", test_images[0]) == (second, 2)

    # The table goes to stdout as before; which head answered goes to stderr.
    table = transfer("predict", "cli-names@production", str(test_images[0]))
    assert table.code == 0, table.err
    assert table.out.startswith(f"{test_images[0]}\t")
    assert f"answered by {first} (version 1)" in table.err

    head = transfer("head", first)
    fields = {k.strip(): v.strip() for k, v in (ln.split(":", 1) for ln in head.out.splitlines())}
    assert fields["version"] == "1" and fields["aliases"] == "production"
    listed = transfer("heads", "--name", "cli-names")
    rows = {line.split()[0]: line.split() for line in listed.out.splitlines()[1:]}
    assert rows[first][2] == "production" and rows[second][2] == "-"

    # Promote version 2, roll back to 1.
    assert transfer("alias", "cli-names", "production", "2").code == 0
    assert _answered_by(transfer, "cli-names@production", test_images[0]) == (second, 2)
    as_json = transfer("--json", "alias", "cli-names", "production", "1")
    assert json.loads(as_json.out)["head_id"] == first
    assert _answered_by(transfer, "cli-names@production", test_images[0]) == (first, 1)

    assert transfer("alias", "cli-names", "staging", "2").code == 0
    removed = transfer("unalias", "cli-names", "staging")
    assert removed.code == 0 and removed.out.strip() == "removed cli-names@staging"
    gone = transfer("predict", "cli-names@staging", str(test_images[0]))
    assert gone.code == 1 and "(NOT_FOUND)" in gone.err

    unknown_version = transfer("alias", "cli-names", "production", "9")
    assert unknown_version.code == 1 and "(NOT_FOUND)" in unknown_version.err

    # A version an alias points at is deleted only with --force, which drops the alias.
    refused = transfer("delete-head", first)
    assert refused.code == 1 and "(FAILED_PRECONDITION)" in refused.err
    assert "production" in refused.err
    forced = transfer("delete-head", first, "--force")
    assert forced.code == 0, forced.err
    assert forced.out.strip() == f"deleted {first}"
    assert transfer("head", first).code == 1
    # Without a production alias, the bare name is the latest version again.
    assert _answered_by(transfer, "cli-names", test_images[0]) == (second, 2)
    assert transfer("delete-head", "cli-names@2").code == 0
