"""Structured error details (issue 19): the server names the request field at fault as a
google.rpc.BadRequest field violation, and both clients expose it as
`TransferError.field_violations`, so a caller can map "examples[1].image" back to its own
input (the CLI: the file) without parsing the message. Real server on loopback, real clients."""

from __future__ import annotations

import pytest
from transfer_client import (
    AsyncTransferClient,
    FieldViolation,
    InvalidArgumentError,
    NotFoundError,
    TransferClient,
)

from tests.conftest import RunningServer

NOT_AN_IMAGE = b"plain text, not an image"


def _examples(images: list[tuple[bytes, str]]) -> list[tuple[bytes, str]]:
    """Four good images with one undecodable one at position 1."""
    good = images[:4]
    return [good[0], (NOT_AN_IMAGE, good[1][1]), *good[2:]]


def test_a_fine_tune_with_a_bad_image_names_its_field(
    client: TransferClient,
    fashion_small: tuple[list[tuple[bytes, str]], list[tuple[bytes, str]]],
) -> None:
    with pytest.raises(InvalidArgumentError) as refused:
        client.train("efficientnet_lite0", _examples(fashion_small[0]), head_name="bad-field")
    error = refused.value
    # The message is as before: tests and users match on it.
    assert error.message.startswith("examples[1].image: not a decodable image")
    assert len(error.field_violations) == 1
    violation = error.field_violations[0]
    assert violation.field == "examples[1].image"
    assert violation.index == 1
    assert violation.description.startswith("not a decodable image")
    assert not violation.description.startswith("examples[1]")  # the field is not repeated


async def test_the_async_client_reads_the_same_details(
    server: RunningServer,
    fashion_small: tuple[list[tuple[bytes, str]], list[tuple[bytes, str]]],
) -> None:
    async with AsyncTransferClient(server.address, timeout=120) as client:
        with pytest.raises(InvalidArgumentError) as refused:
            await client.train(
                "efficientnet_lite0", _examples(fashion_small[0]), head_name="bad-field"
            )
    assert [v.field for v in refused.value.field_violations] == ["examples[1].image"]


def test_a_predict_with_a_bad_input_names_it(
    client: TransferClient,
    image_head: str,
    fashion_small: tuple[list[tuple[bytes, str]], list[tuple[bytes, str]]],
) -> None:
    images = [image for image, _ in fashion_small[1][:3]]
    with pytest.raises(InvalidArgumentError) as refused:
        client.predict(image_head, [images[0], images[1], NOT_AN_IMAGE])
    assert [v.field for v in refused.value.field_violations] == ["inputs[2]"]
    assert refused.value.field_violations[0].index == 2


def test_an_empty_label_names_the_label_field(
    client: TransferClient,
    fashion_small: tuple[list[tuple[bytes, str]], list[tuple[bytes, str]]],
) -> None:
    examples = list(fashion_small[0][:4])
    examples[3] = (examples[3][0], " ")
    with pytest.raises(InvalidArgumentError) as refused:
        client.train("efficientnet_lite0", examples, head_name="bad-label")
    assert refused.value.field_violations == (
        FieldViolation("examples[3].label", "label is empty"),
    )


def test_errors_without_a_field_have_no_violations(client: TransferClient) -> None:
    with pytest.raises(NotFoundError) as missing:
        client.get_head("no-such-head-anywhere")
    assert missing.value.field_violations == ()


@pytest.mark.parametrize(
    ("field", "index"),
    [
        ("examples[17].image", 17),
        ("inputs[0]", 0),
        ("validation_examples[3].label", 3),
        ("head_name", None),
        ("config.epochs", None),
        ("examples[x]", None),
    ],
)
def test_a_violation_gives_the_position_its_path_starts_with(field: str, index: int | None) -> None:
    assert FieldViolation(field, "bad").index == index
