"""Bearer tokens -> tenants: both configuration sources, validation, and the lookup."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transfer_service.edge.tenant_tokens import TenantTokens, load_tenant_tokens
from transfer_service.errors import ConfigurationError


def test_no_tokens_means_auth_off() -> None:
    tokens = load_tenant_tokens(None, "  ")
    assert not tokens.enabled
    assert tokens.tenant_for("anything") is None


def test_file_and_inline_tokens_merge(tmp_path: Path) -> None:
    tokens_file = tmp_path / "tokens.json"
    tokens_file.write_text(json.dumps({"file-token-0123456789": "alice"}))
    tokens = load_tenant_tokens(
        tokens_file, "inline-token-0123456789=bob, padded+token/9876543210===carol"
    )
    assert tokens.enabled
    assert tokens.tenants == {"alice", "bob", "carol"}
    assert tokens.tenant_for("file-token-0123456789") == "alice"
    assert tokens.tenant_for("inline-token-0123456789") == "bob"
    assert tokens.tenant_for("padded+token/9876543210==") == "carol"  # '=' inside a token
    assert tokens.tenant_for("inline-token-012345678") is None  # a prefix is not the token
    assert tokens.tenant_for("") is None


def test_several_tokens_may_share_a_tenant() -> None:
    tokens = TenantTokens({"one-0123456789abcdef": "team", "two-0123456789abcdef": "team"})
    assert tokens.tenant_for("one-0123456789abcdef") == tokens.tenant_for("two-0123456789abcdef")


@pytest.mark.parametrize(
    ("inline", "message"),
    [
        ("just-a-token", "entry 1 is not token=tenant"),
        ("=tenant", "entry 1 is not token=tenant"),
        ("a-token=alice,,b-token=bob", "entry 2 is not token=tenant"),
        ("a-token=", "not a valid tenant name"),
        ("a-token=bad tenant", "not a valid tenant name"),
        ("a token=alice", "printable ASCII"),
        ("same-token=alice,same-token=bob", "two tenants"),
    ],
)
def test_malformed_inline_tokens_are_refused(inline: str, message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        load_tenant_tokens(None, inline)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("not json", "not valid JSON"),
        ('["token"]', "must be a JSON object"),
        ('{"token": 3}', "must be a JSON object"),
    ],
)
def test_malformed_tokens_files_are_refused(tmp_path: Path, content: str, message: str) -> None:
    tokens_file = tmp_path / "tokens.json"
    tokens_file.write_text(content)
    with pytest.raises(ConfigurationError, match=message):
        load_tenant_tokens(tokens_file, "")


def test_a_missing_tokens_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="TRANSFER_AUTH_TOKENS_FILE: cannot read"):
        load_tenant_tokens(tmp_path / "absent.json", "")


def test_one_token_for_two_tenants_across_sources_is_refused(tmp_path: Path) -> None:
    tokens_file = tmp_path / "tokens.json"
    tokens_file.write_text(json.dumps({"shared-0123456789abc": "alice"}))
    with pytest.raises(ConfigurationError, match="two different tenants"):
        load_tenant_tokens(tokens_file, "shared-0123456789abc=bob")
    assert load_tenant_tokens(tokens_file, "shared-0123456789abc=alice").enabled


def test_short_tokens_work_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    tokens = load_tenant_tokens(None, "short=alice")
    assert tokens.tenant_for("short") == "alice"
    assert "shorter than" in caplog.text
    assert "short=" not in caplog.text
