"""The CRM URL guard (architecture §4): only Dynamics hosts, https, port 443, nothing an SSRF could ride on."""

from __future__ import annotations

import pytest

from shared.crm.urlguard import check_crm_url
from shared.errors import UnsafeCrmUrl

VALID = [
    ("https://contoso.crm.dynamics.com", "https://contoso.crm.dynamics.com"),
    ("https://contoso.crm4.dynamics.com", "https://contoso.crm4.dynamics.com"),
    ("https://contoso.crm4.dynamics.com/", "https://contoso.crm4.dynamics.com"),
    ("https://contoso.crm11.dynamics.com", "https://contoso.crm11.dynamics.com"),
    ("https://CONTOSO.CRM4.Dynamics.COM", "https://contoso.crm4.dynamics.com"),
    ("HTTPS://contoso.crm4.dynamics.com", "https://contoso.crm4.dynamics.com"),
    ("https://contoso.crm4.dynamics.com:443", "https://contoso.crm4.dynamics.com"),
    ("https://contoso.crm4.dynamics.com:443/", "https://contoso.crm4.dynamics.com"),
    ("https://contoso.api.crm4.dynamics.com", "https://contoso.api.crm4.dynamics.com"),
    ("https://contoso-sales-01.crm.dynamics.com", "https://contoso-sales-01.crm.dynamics.com"),
    ("https://9org.crm.dynamics.com", "https://9org.crm.dynamics.com"),
    ("https://gov.crm.microsoftdynamics.us", "https://gov.crm.microsoftdynamics.us"),
    ("https://gov.api.crm.microsoftdynamics.us", "https://gov.api.crm.microsoftdynamics.us"),
    ("https://dod.crm.appsplatform.us", "https://dod.crm.appsplatform.us"),
    ("https://china.crm.dynamics.cn", "https://china.crm.dynamics.cn"),
    ("https://" + "a" * 63 + ".crm.dynamics.com", "https://" + "a" * 63 + ".crm.dynamics.com"),
]

HOSTILE = [
    ("http://contoso.crm4.dynamics.com", "https"),
    ("ftp://contoso.crm4.dynamics.com", "https"),
    ("//contoso.crm4.dynamics.com", "https"),
    ("contoso.crm4.dynamics.com", "https"),
    ("https:/contoso.crm4.dynamics.com", "https://"),
    ("", "empty"),
    ("https://", "no host"),
    ("https://contoso.crm4.dynamics.com:8443", "port 443"),
    ("https://contoso.crm4.dynamics.com:0443x", "invalid port"),
    ("https://contoso.crm4.dynamics.com:", "invalid port"),
    ("https://contoso.crm4.dynamics.com:99999", "invalid port"),
    ("https://user:pw@contoso.crm4.dynamics.com", "userinfo"),
    ("https://contoso.crm4.dynamics.com@evil.com", "userinfo"),
    ("https://evil.com#@contoso.crm4.dynamics.com", "fragment"),
    ("https://contoso.crm4.dynamics.com?x=1", "query"),
    ("https://contoso.crm4.dynamics.com/?x=1", "query"),
    ("https://contoso.crm4.dynamics.com#frag", "fragment"),
    ("https://contoso.crm4.dynamics.com/api/data/v9.2", "path"),
    ("https://contoso.crm4.dynamics.com//", "path"),
    ("https://contoso.crm4.dynamics.com.", "dot"),
    ("https://contoso.crm4.dynamics.com./", "dot"),
    ("https://contoso.crm4.dynamics.com.evil.com", "Dynamics"),
    ("https://evilcrm.dynamics.com", "Dynamics"),
    ("https://crm.dynamics.com", "Dynamics"),
    ("https://crm4.dynamics.com", "Dynamics"),
    ("https://contoso.crmx.dynamics.com", "Dynamics"),
    ("https://contoso.crm4.dynamics.com.cn", "Dynamics"),
    ("https://a.b.crm.dynamics.com", "Dynamics"),
    ("https://-contoso.crm.dynamics.com", "Dynamics"),
    ("https://contoso-.crm.dynamics.com", "Dynamics"),
    ("https://" + "a" * 64 + ".crm.dynamics.com", "Dynamics"),
    ("https://contoso_x.crm.dynamics.com", "characters"),
    ("https://contoso.evil.com", "Dynamics"),
    ("https://contoso.crm.dynamics.us", "Dynamics"),
    ("https://127.0.0.1", "IP address"),
    ("https://127.0.0.1:443", "IP address"),
    ("https://2130706433", "IP address"),
    ("https://0x7f000001", "IP address"),
    ("https://0x7f.0.0.1", "IP address"),
    ("https://017700000001", "IP address"),
    ("https://10.1", "IP address"),
    ("https://[::1]", "IP address"),
    ("https://[::ffff:127.0.0.1]", "IP address"),
    ("https://[fe80::1%25eth0]", "percent"),
    ("https://contoso.crm4.dynamics.com\\@evil.com", "backslash"),
    ("https://evil.com\\.contoso.crm4.dynamics.com", "backslash"),
    ("https://contoso%2ecrm4.dynamics.com", "percent"),
    ("https://%63ontoso.crm4.dynamics.com", "percent"),
    ("https://contoso.crm4.dynamics.com%2f@evil.com", "percent"),
    ("https://contoso.crm4.dynamics.com\t", "whitespace"),
    (" https://contoso.crm4.dynamics.com", "whitespace"),
    ("https://contoso .crm4.dynamics.com", "whitespace"),
    ("https://contoso.crm4.dynamics.com\r\nHost: evil.com", "whitespace"),
    ("https://contoso.crm4.dynamics.com\x00", "control"),
    ("https://cöntoso.crm4.dynamics.com", "non-ASCII"),
    ("https://contoso.crm4.dynamics.com\u3002evil.com", "non-ASCII"),  # ideographic full stop
    ("https://ｃｏｎｔｏｓｏ.crm4.dynamics.com", "non-ASCII"),  # fullwidth letters (NFKC look-alike)  # noqa: RUF001
    ("https://contoso.crm4.dynamics\uff0ecom", "non-ASCII"),  # fullwidth full stop
    ("https://xn--cntoso-gxa.crm4.dynamics.com", "IDNA"),
    ("https://contoso.crm4.dynamics.com:443:443", "more than one"),
    ("https://localhost", "Dynamics"),
    ("https://127.0.0.1:8443", "IP address"),
]


@pytest.mark.parametrize(("url", "origin"), VALID)
def test_dynamics_urls_are_normalised_to_their_origin(url: str, origin: str) -> None:
    assert check_crm_url(url) == origin


@pytest.mark.parametrize(("url", "problem"), HOSTILE)
def test_hostile_or_foreign_urls_are_refused_naming_the_problem(url: str, problem: str) -> None:
    with pytest.raises(UnsafeCrmUrl) as caught:
        check_crm_url(url)
    assert problem.lower() in str(caught.value).lower()


@pytest.mark.parametrize(
    ("url", "extra", "origin"),
    [
        ("https://127.0.0.1:8443", ["127.0.0.1:*"], "https://127.0.0.1:8443"),
        ("https://127.0.0.1", ["127.0.0.1:*"], "https://127.0.0.1"),
        ("https://127.0.0.1:8443/", ["127.0.0.1:8443"], "https://127.0.0.1:8443"),
        ("https://LOCALHOST:9000", ["localhost:9000"], "https://localhost:9000"),
        ("https://sim.local", ["sim.local"], "https://sim.local"),
        ("https://[::1]:8443", ["[::1]:*"], "https://[::1]:8443"),
        ("https://contoso.crm4.dynamics.com", ["127.0.0.1:*"], "https://contoso.crm4.dynamics.com"),
    ],
)
def test_allowed_extra_hosts_may_name_an_ip_or_another_port(url: str, extra: list[str], origin: str) -> None:
    assert check_crm_url(url, extra) == origin


@pytest.mark.parametrize(
    ("url", "extra", "problem"),
    [
        ("http://127.0.0.1:8443", ["127.0.0.1:*"], "https"),
        ("https://127.0.0.1:8443", ["127.0.0.1:9443"], "IP address"),
        ("https://127.0.0.2:8443", ["127.0.0.1:*"], "IP address"),
        ("https://127.0.0.10:8443", ["127.0.0.1:*"], "IP address"),
        ("https://x@127.0.0.1:8443", ["127.0.0.1:*"], "userinfo"),
        ("https://127.0.0.1:8443/api", ["127.0.0.1:*"], "path"),
        ("https://127.0.0.1:8443?q", ["127.0.0.1:*"], "query"),
        ("https://127.0.0.1.evil.com:8443", ["127.0.0.1:*"], "port 443"),
        ("https://sim.local:444", ["sim.local"], "port 443"),
    ],
)
def test_extra_hosts_match_exactly_and_keep_the_other_rules(url: str, extra: list[str], problem: str) -> None:
    with pytest.raises(UnsafeCrmUrl) as caught:
        check_crm_url(url, extra)
    assert problem.lower() in str(caught.value).lower()


def test_the_table_covers_at_least_forty_urls() -> None:
    assert len(VALID) + len(HOSTILE) >= 40
