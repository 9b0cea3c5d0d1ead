"""The CRM session reads the environment once: proxies taken at construction, no netrc, no per-request lookups."""

from __future__ import annotations

import pytest

from shared.http import new_session


def test_the_session_takes_the_environment_proxies_for_the_crm_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.example:3128")
    monkeypatch.setenv("NO_PROXY", "")
    session = new_session("https://contoso.crm4.dynamics.com")
    assert session.trust_env is False
    assert session.proxies.get("https") == "http://proxy.example:3128"


def test_a_crm_excluded_by_no_proxy_gets_no_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.example:3128")
    monkeypatch.setenv("NO_PROXY", ".dynamics.com")
    session = new_session("https://contoso.crm4.dynamics.com")
    assert "https" not in session.proxies
