"""What both stores say about head names, their versions and aliases (HeadStore's names
methods): the errors, worded once so LocalStore and PostgresStore answer alike."""

from __future__ import annotations

from transfer_service.errors import FailedPreconditionError, NotFoundError


def no_such_name(name: str) -> NotFoundError:
    return NotFoundError(f"no head named {name!r}")


def no_such_version(name: str, version: int) -> NotFoundError:
    return NotFoundError(f"head {name!r} has no version {version}")


def no_such_alias(name: str, alias: str) -> NotFoundError:
    return NotFoundError(f"head {name!r} has no alias {alias!r}")


def aliased_version(
    head_id: str, name: str, version: int, aliases: list[str] | tuple[str, ...]
) -> FailedPreconditionError:
    """A delete refused because aliases point at the version it would remove."""
    return FailedPreconditionError(
        f"head {head_id} is version {version} of {name}, which aliases "
        f"{', '.join(sorted(aliases))} point at; move or delete them first, or delete with force"
    )


def version_taken(name: str, version: int) -> FailedPreconditionError:
    """A save of a version another head of the name already holds (versions are reserved
    once, so only a bug or a hand-made record gets here): nothing was saved."""
    return FailedPreconditionError(
        f"head {name!r} already has a version {version}; a version is saved once "
        "(reserve a new one)"
    )
