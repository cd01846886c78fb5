"""The `transfer` command, driven through `transfer_client._cli.main` against the real server."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import pytest

from tests.client.conftest import FASHION_LABELS, Transfer

TextSmall = tuple[list[tuple[str, str]], list[tuple[str, str]]]
NEWS_LABELS = ("business", "entertainment", "politics", "sports", "tech")


@pytest.fixture(scope="module")
def news_csv(tmp_path_factory: pytest.TempPathFactory, text_small: TextSmall) -> Path:
    """A text,label CSV; the documents hold commas, quotes and newlines."""
    path = tmp_path_factory.mktemp("texts") / "news.csv"
    with path.open("w", newline="", encoding="utf-8") as file:
        writer = csv.writer(file)
        writer.writerow(["label", "text", "source"])
        counts: dict[str, int] = {}
        for text, label in text_small[0]:
            if counts.get(label, 0) < 3:
                counts[label] = counts.get(label, 0) + 1
                writer.writerow([label, text, "bbc"])
    return path


def test_backbones_table_and_json(transfer: Transfer) -> None:
    table = transfer("backbones")
    assert table.code == 0, table.err
    lines = table.out.splitlines()
    assert lines[0].split() == [
        "NAME", "MODALITY", "STATE", "PARAMS", "FEATURES", "INPUT", "DEVICE", "NOTE",
    ]  # fmt: skip
    rows = {line.split()[0]: line for line in lines[1:]}
    assert rows["efficientnet_lite0"].split()[1:3] == ["image", "loaded"]
    assert rows["minilm_l6"].split()[1:3] == ["text", "loaded"]
    assert rows["resnet18"].split()[1:3] == ["image", "unavailable"]
    assert "weights file" in rows["resnet18"]

    # Global options are accepted after the subcommand too.
    as_json = transfer("backbones", "--json")
    assert as_json.code == 0, as_json.err
    backbones = {b["name"]: b for b in json.loads(as_json.out)}
    assert backbones["efficientnet_lite0"]["state"] == "loaded"
    assert backbones["efficientnet_lite0"]["resident_bytes"] > 0
    assert backbones["efficientnet_lite0"]["device"]
    assert backbones["minilm_l6"]["modality"] == "text"
    assert backbones["resnet18"]["state"] == "unavailable"
    assert "weights file" in backbones["resnet18"]["unavailable_reason"]


def test_image_head_lifecycle(
    transfer: Transfer, image_folder: Path, test_images: list[Path]
) -> None:
    trained = transfer(
        "finetune", "efficientnet_lite0", str(image_folder),
        "--epochs", "3", "--head-name", "cli-images", "--seed", "4",
    )  # fmt: skip
    assert trained.code == 0, trained.err
    head_id = trained.out.strip()
    assert re.fullmatch(r"cli-images-[0-9a-f]+", head_id), trained.out
    # Progress goes to stderr, one line per epoch when it is not a terminal.
    job_id = re.search(r"job (job-[0-9a-f]+): training cli-images", trained.err)
    assert job_id is not None, trained.err
    assert "4 classes" in trained.err
    assert "epoch 3/3" in trained.err
    # The last progress line states the result ("trained in" / "done in": the wording is
    # _progress.py's).
    assert re.search(r"(trained|done) in \d+:\d\d", trained.err), trained.err

    predicted = transfer("predict", head_id, *map(str, test_images), "--top-k", "2")
    assert predicted.code == 0, predicted.err
    lines = predicted.out.splitlines()
    assert len(lines) == 2
    for line, path in zip(lines, test_images, strict=True):
        name, ranked = line.split("\t")
        assert name == str(path)
        scores = re.findall(r"(\S+) (\d+\.\d)%", ranked)
        assert len(scores) == 2 and {label for label, _ in scores} <= set(FASHION_LABELS)
        assert float(scores[0][1]) >= float(scores[1][1])

    as_json = transfer("predict", head_id, *map(str, test_images), "--top-k", "2", "--json")
    assert as_json.code == 0, as_json.err
    answers = json.loads(as_json.out)
    assert [a["input"] for a in answers] == [str(p) for p in test_images]
    for answer, line in zip(answers, lines, strict=True):
        prediction = answer["prediction"]
        assert len(prediction["top_k"]) == 2
        assert prediction["label"] == prediction["top_k"][0]["label"]
        assert line.split("\t")[1].startswith(prediction["label"] + " ")

    heads = transfer("heads")
    assert heads.code == 0, heads.err
    assert heads.out.splitlines()[0].split()[:5] == [
        "HEAD", "VERSION", "ALIASES", "BACKBONE", "CLASSES",
    ]  # fmt: skip
    [row] = [line for line in heads.out.splitlines() if line.startswith(head_id + " ")]
    assert row.split()[3:5] == ["efficientnet_lite0", "4"]
    only_text = transfer("heads", "--backbone", "minilm_l6")
    assert only_text.code == 0 and head_id not in only_text.out
    by_name = transfer("heads", "--name", "cli-images")
    assert by_name.code == 0 and head_id in by_name.out
    other_name = transfer("heads", "--name", "no-such-name")
    assert other_name.code == 0 and head_id not in other_name.out

    head = transfer("head", head_id)
    assert head.code == 0, head.err
    fields = dict(line.split(":", 1) for line in head.out.splitlines())
    assert fields["head"].strip() == head_id
    assert fields["name"].strip() == "cli-images"
    assert fields["classes"].strip() == ", ".join(FASHION_LABELS)
    assert fields["epochs"].strip().startswith("3 (best ")
    assert fields["job"].strip() == job_id.group(1)

    jobs = transfer("jobs")
    assert jobs.code == 0, jobs.err
    [job_row] = [line for line in jobs.out.splitlines() if line.startswith(job_id.group(1))]
    assert job_row.split()[1:4] == ["succeeded", "efficientnet_lite0", "cli-images"]
    assert head_id in job_row.split()
    failed_only = transfer("jobs", "--state", "failed")
    assert failed_only.code == 0 and job_id.group(1) not in failed_only.out
    succeeded = transfer("jobs", "--state", "succeeded", "--head-name", "cli-images")
    assert succeeded.code == 0 and job_id.group(1) in succeeded.out

    job = transfer("job", job_id.group(1))
    assert job.code == 0, job.err
    job_fields = {
        k.strip(): v.strip() for k, v in (ln.split(":", 1) for ln in job.out.splitlines())
    }
    assert job_fields["state"] == "succeeded"
    assert job_fields["head"] == head_id
    assert job_fields["progress"] == "epoch 3/3"
    job_json = json.loads(transfer("job", job_id.group(1), "--json").out)
    assert job_json["state"] == "succeeded" and job_json["head_id"] == head_id

    # `watch` on a finished job replays it and prints the head id, like `finetune`.
    watched = transfer("watch", job_id.group(1))
    assert watched.code == 0, watched.err
    assert watched.out.strip() == head_id

    deleted = transfer("delete-head", head_id)
    assert deleted.code == 0, deleted.err
    assert deleted.out.strip() == f"deleted {head_id}"
    gone = transfer("head", head_id)
    assert gone.code == 1
    assert "NOT_FOUND" in gone.err and gone.out == ""


def test_finetune_json_prints_the_completed_event(transfer: Transfer, image_folder: Path) -> None:
    result = transfer(
        "--json", "finetune", "efficientnet_lite0", str(image_folder), "--epochs", "2",
        "--head-name", "cli-json",
    )  # fmt: skip
    assert result.code == 0, result.err
    completed = json.loads(result.out)
    assert completed["head_id"].startswith("cli-json-")
    assert completed["metrics"]["epochs_run"] == 2
    assert completed["job_id"].startswith("job-")


def test_text_head_from_a_csv(transfer: Transfer, news_csv: Path) -> None:
    trained = transfer(
        "finetune", "minilm_l6", str(news_csv), "--epochs", "3", "--head-name", "cli-news"
    )
    assert trained.code == 0, trained.err
    head_id = trained.out.strip()
    assert head_id.startswith("cli-news-")
    assert "5 classes" in trained.err

    text = "The striker scored twice as the club won the cup final."
    predicted = transfer("predict", head_id, "--text", text, "--top-k", "5")
    assert predicted.code == 0, predicted.err
    [line] = predicted.out.splitlines()
    name, ranked = line.split("\t")
    assert name == text
    assert {label for label, _ in re.findall(r"(\S+) (\d+\.\d)%", ranked)} == set(NEWS_LABELS)

    head = json.loads(transfer("head", head_id, "--json").out)
    assert head["modality"] == "text" and tuple(head["class_names"]) == NEWS_LABELS


def test_unknown_head_exits_1_with_the_server_message(
    transfer: Transfer, test_images: list[Path]
) -> None:
    result = transfer("predict", "no-such-head", str(test_images[0]))
    assert result.code == 1
    assert result.out == ""
    assert result.err.startswith("error: ")
    assert "head_id" in result.err and "no-such-head" in result.err
    assert "(NOT_FOUND)" in result.err
    assert "Traceback" not in result.err

    unknown_job = transfer("job", "job-0000")
    assert unknown_job.code == 1 and "(NOT_FOUND)" in unknown_job.err


def test_unavailable_backbone_exits_1(transfer: Transfer, image_folder: Path) -> None:
    result = transfer("finetune", "resnet18", str(image_folder), "--epochs", "1")
    assert result.code == 1
    assert "resnet18" in result.err and "(FAILED_PRECONDITION)" in result.err
    assert result.out == ""


@pytest.mark.parametrize("name", ["missing.csv", "missing-dir"])
def test_missing_data_exits_1_with_a_clear_message(
    transfer: Transfer, tmp_path: Path, name: str
) -> None:
    missing = tmp_path / name
    result = transfer("finetune", "minilm_l6", str(missing))
    assert result.code == 1
    assert result.out == ""
    assert str(missing) in result.err
    assert re.search(r"does not exist|No such file", result.err), result.err
    assert "Traceback" not in result.err


def test_malformed_data_exits_1(transfer: Transfer, tmp_path: Path) -> None:
    no_columns = tmp_path / "bad.csv"
    no_columns.write_text("sentence,category\nhello,a\n")
    result = transfer("finetune", "minilm_l6", str(no_columns))
    assert result.code == 1 and "'text' and a 'label' column" in result.err

    empty = tmp_path / "empty-folder"
    (empty / "cats").mkdir(parents=True)
    result = transfer("finetune", "efficientnet_lite0", str(empty))
    assert result.code == 1 and "no image files" in result.err

    missing_image = tmp_path / "nope.png"
    result = transfer("predict", "any-head", str(missing_image))
    assert result.code == 1 and str(missing_image) in result.err
