"""Prints the README's settings table from the Settings class (`--check README.md` fails
when the README's copy is stale)."""

from __future__ import annotations

import sys
from pathlib import Path

from transfer_service.settings import Settings

BEGIN = "<!-- settings-table:begin -->"
END = "<!-- settings-table:end -->"


def table() -> str:
    rows = ["| variable | default | meaning |", "|---|---|---|"]
    for name, field in Settings.model_fields.items():
        if name == "weights_dir":
            default = "$TORCH_HOME/hub/checkpoints"
        elif field.default_factory is not None:
            value = field.default_factory()  # type: ignore[call-arg]
            default = ",".join(value) if isinstance(value, list) else str(value)
        else:
            default = str(field.default) or '""'
        rows.append(f"| `TRANSFER_{name.upper()}` | `{default}` | {field.description} |")
    return "\n".join(rows)


def main(argv: list[str]) -> int:
    generated = f"{BEGIN}\n{table()}\n{END}"
    if len(argv) == 2 and argv[0] == "--check":
        text = Path(argv[1]).read_text(encoding="utf-8")
        if generated not in text:
            print(f"{argv[1]}: settings table is stale; run `make settings-table`", file=sys.stderr)
            return 1
        return 0
    if len(argv) == 2 and argv[0] == "--write":
        path = Path(argv[1])
        text = path.read_text(encoding="utf-8")
        start, end = text.index(BEGIN), text.index(END) + len(END)
        path.write_text(text[:start] + generated + text[end:], encoding="utf-8")
        return 0
    print(generated)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
