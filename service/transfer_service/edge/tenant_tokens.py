"""Bearer tokens and the tenant each stands for, from a JSON file and/or an env setting.

No tokens configured means authentication is off and every caller is DEFAULT_TENANT. Tokens
are kept only as SHA-256 digests and checked against every configured digest with
hmac.compare_digest, so neither a token's content nor its length shows in response times.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
from collections.abc import Mapping
from pathlib import Path

from transfer_service.domain import TENANT_PATTERN
from transfer_service.errors import ConfigurationError

log = logging.getLogger(__name__)

# Short tokens can be guessed; they still work, with a warning at start-up.
_RECOMMENDED_TOKEN_LENGTH = 16


class TenantTokens:
    def __init__(self, tenants_by_token: Mapping[str, str]) -> None:
        self._entries = tuple(
            (_digest(token), tenant) for token, tenant in tenants_by_token.items()
        )
        self.tenants = frozenset(tenants_by_token.values())

    @property
    def enabled(self) -> bool:
        return bool(self._entries)

    def tenant_for(self, token: str) -> str | None:
        """The tenant `token` stands for, or None. Compares against every entry, always."""
        presented = _digest(token)
        found = None
        for digest, tenant in self._entries:
            if hmac.compare_digest(digest, presented):
                found = tenant
        return found


def load_tenant_tokens(tokens_file: Path | None, inline_tokens: str) -> TenantTokens:
    """Tokens from `tokens_file` (JSON object {"token": "tenant"}) plus `inline_tokens`
    ("token1=tenantA,token2=tenantB"). A token given twice must name the same tenant."""
    merged: dict[str, str] = {}
    sources: list[tuple[str, dict[str, str]]] = []
    if tokens_file is not None:
        sources.append(("TRANSFER_AUTH_TOKENS_FILE", _read_tokens_file(tokens_file)))
    if inline_tokens.strip():
        sources.append(("TRANSFER_AUTH_TOKENS", _parse_inline_tokens(inline_tokens)))
    for setting, tokens in sources:
        for token, tenant in tokens.items():
            _check_entry(setting, token, tenant)
            if merged.get(token, tenant) != tenant:
                raise ConfigurationError(f"{setting}: a token is mapped to two different tenants")
            merged[token] = tenant
    short = sum(1 for token in merged if len(token) < _RECOMMENDED_TOKEN_LENGTH)
    if short:
        log.warning(
            "%d bearer token(s) shorter than %d characters; use long random tokens",
            short,
            _RECOMMENDED_TOKEN_LENGTH,
        )
    return TenantTokens(merged)


def _read_tokens_file(path: Path) -> dict[str, str]:
    setting = "TRANSFER_AUTH_TOKENS_FILE"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigurationError(f"{setting}: cannot read {path}: {exc.strerror}") from exc
    except json.JSONDecodeError as exc:
        raise ConfigurationError(f"{setting}: {path} is not valid JSON ({exc.msg})") from exc
    if not isinstance(data, dict) or not all(
        isinstance(token, str) and isinstance(tenant, str) for token, tenant in data.items()
    ):
        raise ConfigurationError(f'{setting}: {path} must be a JSON object {{"token": "tenant"}}')
    return data


def _parse_inline_tokens(text: str) -> dict[str, str]:
    tokens: dict[str, str] = {}
    for position, pair in enumerate(item.strip() for item in text.split(",")):
        token, equals, tenant = pair.rpartition("=")
        if not pair or not equals or not token:
            raise ConfigurationError(
                f"TRANSFER_AUTH_TOKENS: entry {position + 1} is not token=tenant"
            )
        if tokens.get(token, tenant) != tenant:
            raise ConfigurationError("TRANSFER_AUTH_TOKENS: a token is mapped to two tenants")
        tokens[token] = tenant
    return tokens


def _check_entry(setting: str, token: str, tenant: str) -> None:
    # gRPC metadata values are printable ASCII; a token outside it could never be sent.
    if not token or not all("!" <= char <= "~" for char in token):
        raise ConfigurationError(
            f"{setting}: tokens must be non-empty printable ASCII without spaces"
        )
    if not TENANT_PATTERN.fullmatch(tenant):
        raise ConfigurationError(
            f"{setting}: tenant {tenant!r} is not a valid tenant name "
            f"(pattern {TENANT_PATTERN.pattern})"
        )


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8")).digest()
