"""`transfer predict HEAD DIR` and CSVs of texts (issue 19): more inputs than one Predict call
takes, sent in chunks (--chunk-size); --csv and --jsonl with the input, label, score and
top-k; the progress bar on a terminal only; a bad file named by its path.

The folder is small (45 files, in chunks of 8 or fewer) rather than over the server's 512
per call: on this busy 2-CPU machine an image costs the backbone up to 0.5 s."""

from __future__ import annotations

import csv
import io
import json
import sys
from pathlib import Path

import pytest
from transfer_client._cli import main

from tests.client.conftest import FASHION_LABELS, FashionSmall, Transfer
from tests.conftest import RunningServer

FILES = 45
NEWS_LABELS = ("business", "entertainment", "politics", "sports", "tech")


@pytest.fixture(scope="module")
def big_folder(tmp_path_factory: pytest.TempPathFactory, fashion_small: FashionSmall) -> Path:
    """45 PNGs over nested folders, plus files a walk skips (hidden, not images)."""
    root = tmp_path_factory.mktemp("many")
    images = [image for image, _ in fashion_small[1]]
    for index in range(FILES):
        folder = root / f"part-{index % 3}" / ("deep" if index % 2 else "")
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{index:04d}.png").write_bytes(images[index % len(images)])
    (root / "notes.txt").write_text("skipped")
    (root / ".cache").mkdir()
    (root / ".cache" / "x.png").write_bytes(b"hidden, skipped")
    return root


def _walked(root: Path) -> list[str]:
    return sorted(
        (str(p) for p in root.rglob("*.png") if ".cache" not in p.parts),
        key=lambda name: Path(name).relative_to(root).parts,
    )


def test_a_folder_larger_than_one_call_as_csv(
    transfer: Transfer, image_head: str, big_folder: Path
) -> None:
    result = transfer(
        "predict", image_head, str(big_folder), "--csv", "--top-k", "2", "--chunk-size", "8"
    )
    assert result.code == 0, result.err
    rows = list(csv.DictReader(io.StringIO(result.out)))
    assert list(rows[0]) == [
        "input", "label", "score", "label_2", "score_2", "head_id", "head_version",
    ]  # fmt: skip
    assert [row["input"] for row in rows] == _walked(big_folder)
    for row in rows:
        assert row["label"] in FASHION_LABELS and row["label_2"] in FASHION_LABELS
        assert row["label"] != row["label_2"]
        assert 1 >= float(row["score"]) >= float(row["score_2"]) >= 0
        assert row["head_id"] == image_head
    # The same image gives the same answer wherever it sits in the folder (in any chunk).
    first, again = rows[0]["input"], None
    same_image = int(Path(first).stem) % 40
    for row in rows[1:]:
        if int(Path(row["input"]).stem) % 40 == same_image:
            again = row
            break
    assert again is not None and again["label"] == rows[0]["label"]
    assert float(again["score"]) == pytest.approx(float(rows[0]["score"]), abs=1e-5)


def test_jsonl_with_small_chunks_matches_one_file_at_a_time(
    transfer: Transfer, image_head: str, big_folder: Path
) -> None:
    result = transfer(
        "predict", image_head, str(big_folder / "part-1"), "--jsonl", "--top-k", "3",
        "--chunk-size", "7",
    )  # fmt: skip
    assert result.code == 0, result.err
    answers = [json.loads(line) for line in result.out.splitlines()]
    assert [a["input"] for a in answers] == _walked(big_folder / "part-1")
    assert len(answers) > 7 * 2  # three calls
    for answer in answers:
        assert set(answer) == {"input", "label", "score", "top_k", "head_id", "head_version"}
        assert len(answer["top_k"]) == 3 and answer["top_k"][0]["label"] == answer["label"]
    # Files given one by one (here three, mixed with a folder) answer the same.
    picked = [answers[0]["input"], answers[5]["input"]]
    single = transfer("--json", "predict", image_head, *picked, str(big_folder / "part-0"))
    assert single.code == 0, single.err
    alone = json.loads(single.out)
    assert [a["input"] for a in alone[:2]] == picked
    assert len(alone) == 2 + len(_walked(big_folder / "part-0"))
    for answer, first_pass in zip(alone[:2], (answers[0], answers[5]), strict=True):
        assert answer["prediction"]["label"] == first_pass["label"]


def test_a_csv_of_texts(
    transfer: Transfer, text_head: str, text_small: tuple[list[tuple[str, str]], ...],
    tmp_path: Path,
) -> None:  # fmt: skip
    path = tmp_path / "texts.csv"
    texts = [text for text, _ in text_small[1][:10]]
    with path.open("w", newline="", encoding="utf-8") as file:
        writer = csv.writer(file)
        writer.writerow(["id", "text"])
        writer.writerows([index, text] for index, text in enumerate(texts))
    result = transfer("predict", text_head, str(path), "--jsonl", "--chunk-size", "4")
    assert result.code == 0, result.err
    answers = [json.loads(line) for line in result.out.splitlines()]
    assert [a["input"] for a in answers] == texts
    assert {a["label"] for a in answers} <= set(NEWS_LABELS)

    table = transfer("predict", text_head, str(path), "--chunk-size", "5")
    assert table.code == 0, table.err
    assert len(table.out.splitlines()) == len(texts)


def test_texts_on_the_command_line_go_in_chunks_too(transfer: Transfer, text_head: str) -> None:
    words = ("football", "election", "market", "film", "software")
    texts = [f"{words[index % 5]} news number {index}" for index in range(12)]
    chunked = transfer("--json", "predict", text_head, "--text", *texts, "--chunk-size", "5")
    assert chunked.code == 0, chunked.err
    answers = json.loads(chunked.out)
    assert [a["input"] for a in answers] == texts
    whole = json.loads(transfer("--json", "predict", text_head, "--text", *texts).out)
    for in_chunks, in_one in zip(answers, whole, strict=True):
        assert in_chunks["prediction"]["label"] == in_one["prediction"]["label"]
        assert in_chunks["prediction"]["score"] == pytest.approx(
            in_one["prediction"]["score"], abs=1e-5
        )
    assert transfer("predict", text_head, "--text", "x", "--chunk-size", "0").code == 1


def test_progress_bar_only_on_a_terminal(
    server: RunningServer,
    image_head: str,
    big_folder: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    args = ["--target", server.address, "predict", image_head, str(big_folder), "--jsonl"]
    assert main([*args, "--chunk-size", "8"]) == 0
    drawn = terminal.getvalue()
    assert f"\rpredicting [{'-' * 24}] 0/{FILES}" in drawn
    assert f"] 8/{FILES}" in drawn and f"] 40/{FILES}" in drawn
    assert drawn.endswith(f"\rpredicting [{'#' * 24}] {FILES}/{FILES}\n")
    assert len(capsys.readouterr().out.splitlines()) == FILES  # stdout: the answers only

    not_a_terminal = io.StringIO()
    monkeypatch.setattr(sys, "stderr", not_a_terminal)
    assert main([*args, "--chunk-size", "8"]) == 0
    assert not_a_terminal.getvalue() == ""  # no bar


def test_a_bad_file_is_named_and_limits_are_checked(
    transfer: Transfer, image_head: str, big_folder: Path, tmp_path: Path
) -> None:
    folder = tmp_path / "mixed"
    folder.mkdir()
    for index in range(5):
        (folder / f"{index}.png").write_bytes((big_folder / "part-0" / "0000.png").read_bytes())
    (folder / "3.png").write_bytes(b"not a png at all")
    result = transfer("predict", image_head, str(folder), "--chunk-size", "2")
    assert result.code == 1
    assert "(INVALID_ARGUMENT)" in result.err and str(folder / "3.png") in result.err
    assert "Traceback" not in result.err

    too_big = transfer("predict", image_head, str(folder), "--chunk-size", "513")
    assert too_big.code == 1 and "512" in too_big.err
