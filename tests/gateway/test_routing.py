"""Unit tests for gateway/proxy/routing.py and storage/ids.py."""

from __future__ import annotations

import pytest

from gateway.errors import CONNECTION_REJECTED, UNKNOWN_DATABASE, GatewayError
from gateway.proxy.routing import Route, check_id, id_from_sni, route, split_options
from storage.ids import valid_id

DOMAINS = ["db.example.com"]


def refused(code: str, fn, *args) -> GatewayError:
    with pytest.raises(GatewayError) as info:
        fn(*args)
    assert info.value.code == code, f"{info.value} (expected {code})"
    assert info.value.response().code == code
    return info.value


# --- ids -------------------------------------------------------------------------------------

BAD_IDS = [
    "", "..", ".", "../etc", "a/b", "/", "abc/..", "%2e%2e", "%2e", "a%2fb", "a\\b",
    "ABC", "Abc", "é", "ａbc", "abc\u0130", "١٢٣", "xn--bcher-kva", "xn--abc",
    "a" * 64, "-abc", "abc-", "-", "a_b", "a b", " abc", "abc\n", "abc\0", "a.b",
]
GOOD_IDS = ["a", "0", "12345", "abc", "a-b", "a--b", "x" * 63, "9abc-def-0", "xn"]


@pytest.mark.parametrize("db_id", BAD_IDS)
def test_valid_id_refuses(db_id):
    assert valid_id(db_id) is False


@pytest.mark.parametrize("db_id", GOOD_IDS)
def test_valid_id_accepts(db_id):
    assert valid_id(db_id) is True


@pytest.mark.parametrize("db_id", BAD_IDS)
def test_check_id_refuses_with_3d000(db_id):
    err = refused(UNKNOWN_DATABASE, check_id, db_id)
    assert err.hint and "lowercase" in err.hint


def test_check_id_truncates_long_ids_in_message():
    err = refused(UNKNOWN_DATABASE, check_id, "x" * 500)
    assert len(err.message) < 150


@pytest.mark.parametrize("db_id", GOOD_IDS)
def test_check_id_returns_good_ids(db_id):
    assert check_id(db_id) == db_id


# --- SNI --------------------------------------------------------------------------------------


def test_sni_id():
    assert id_from_sni("12345.db.example.com", DOMAINS) == "12345"


@pytest.mark.parametrize("name", ["abc.DB.Example.COM", "abc.db.example.COM", "abc.Db.example.com"])
def test_sni_domain_is_case_insensitive(name):
    assert id_from_sni(name, DOMAINS) == "abc"


@pytest.mark.parametrize("name", ["ABC.db.example.com", "aBc.DB.EXAMPLE.COM", "ABC.DB.EXAMPLE.COM"])
def test_sni_is_case_insensitive_as_dns_names_are(name):
    assert id_from_sni(name, DOMAINS) == "abc"


def test_an_uppercase_sni_agrees_with_a_lowercase_endpoint_and_endpoint_stays_exact():
    assert route("ABC.DB.EXAMPLE.COM", "endpoint=abc", DOMAINS)[0].db_id == "abc"
    refused(UNKNOWN_DATABASE, route, None, "endpoint=ABC", DOMAINS)  # not a DNS name


def test_sni_multiple_domains():
    domains = ["db.example.com", "pg.other.org"]
    assert id_from_sni("one.db.example.com", domains) == "one"
    assert id_from_sni("two.pg.other.org", domains) == "two"
    err = refused(CONNECTION_REJECTED, id_from_sni, "three.elsewhere.net", domains)
    assert "<id>.db.example.com" in err.hint and "<id>.pg.other.org" in err.hint


def test_sni_nested_domains_prefer_the_longest_match():
    # both are served: abc.db.example.com is <id>.db.example.com, not "abc.db" under example.com
    for domains in (["example.com", "db.example.com"], ["db.example.com", "example.com"]):
        assert id_from_sni("abc.db.example.com", domains) == "abc"
        assert id_from_sni("abc.example.com", domains) == "abc"


@pytest.mark.parametrize("name", [
    "abc.example.com", "abc.db.example.org", "abc.xdb.example.com", "abcdb.example.com",
    "localhost", "db.example.com.evil.net", "abc.db.example.com.",
    "db.example.com",  # the bare domain names no database
    "example.com",
])
def test_sni_not_under_a_domain_refused_with_08004(name):
    err = refused(CONNECTION_REJECTED, id_from_sni, name, DOMAINS)
    assert "<id>.db.example.com" in err.hint


def test_sni_two_labels_refused():
    err = refused(UNKNOWN_DATABASE, id_from_sni, "a.b.db.example.com", DOMAINS)
    assert "<id>.db.example.com" in err.hint


@pytest.mark.parametrize("label", [
    "..", ".", "%2e%2e", "%2e", "a%2fb", "a/b", "..%2f", "é", "ａbc", "xn--bcher-kva",
    "a" * 64, "-abc", "abc-", "", "a_b", "a\\b",
])
def test_sni_bad_id_labels_refused_with_3d000(label):
    refused(UNKNOWN_DATABASE, id_from_sni, f"{label}.db.example.com", DOMAINS)


def test_sni_63_char_label_accepted():
    assert id_from_sni("a" * 63 + ".db.example.com", DOMAINS) == "a" * 63


# --- options ----------------------------------------------------------------------------------


def test_split_options_endpoint_only():
    assert split_options("endpoint=abc") == ("abc", "")


def test_split_options_passes_other_options_on():
    assert split_options("-c search_path=x endpoint=abc") == ("abc", "-c search_path=x")
    assert split_options("endpoint=abc -c search_path=x") == ("abc", "-c search_path=x")


def test_split_options_without_endpoint():
    assert split_options("-c work_mem=64MB") == (None, "-c work_mem=64MB")
    assert split_options("") == (None, "")


def test_split_options_collapses_whitespace():
    assert split_options("  -c\ta=1 \n endpoint=abc  ") == ("abc", "-c a=1")


def test_split_options_keeps_escaped_spaces():
    endpoint, rest = split_options(r"-c application_name=my\ app endpoint=abc")
    assert endpoint == "abc"
    assert rest == r"-c application_name=my\ app"


def test_split_options_escaped_endpoint_is_not_split_off():
    # `endpoint=a\ b` is one token with an escaped space, not endpoint "a" plus a stray "b"
    endpoint, rest = split_options(r"endpoint=a\ b")
    assert endpoint == r"a\ b"
    assert rest == ""


def test_split_options_same_endpoint_twice_ok():
    assert split_options("endpoint=abc -c x=1 endpoint=abc") == ("abc", "-c x=1")


def test_split_options_two_different_endpoints_refused():
    refused(CONNECTION_REJECTED, split_options, "endpoint=abc endpoint=def")


# --- route ------------------------------------------------------------------------------------


def test_route_by_sni():
    assert route("abc.db.example.com", None, DOMAINS) == (Route("abc", "sni"), "")


def test_route_by_sni_keeps_options():
    assert route("abc.db.example.com", "-c search_path=x", DOMAINS) == \
        (Route("abc", "sni"), "-c search_path=x")


def test_route_by_endpoint_option():
    assert route(None, "endpoint=abc", DOMAINS) == (Route("abc", "options"), "")


def test_route_by_endpoint_option_passes_rest_on():
    assert route(None, "-c search_path=x endpoint=abc", DOMAINS) == \
        (Route("abc", "options"), "-c search_path=x")


def test_route_sni_and_endpoint_agree():
    assert route("abc.db.example.com", "endpoint=abc -c a=b", DOMAINS) == (Route("abc", "sni"), "-c a=b")


def test_route_sni_and_endpoint_disagree_refused():
    err = refused(CONNECTION_REJECTED, route, "abc.db.example.com", "endpoint=def", DOMAINS)
    assert "abc" in err.message and "def" in err.message


@pytest.mark.parametrize("endpoint", ["..", "../x", "a/b", "%2e%2e", "é", "xn--abc", "a" * 64,
                                      "-a", "a-", "", "ABC"])
def test_route_bad_endpoint_refused_with_3d000(endpoint):
    refused(UNKNOWN_DATABASE, route, None, f"endpoint={endpoint}", DOMAINS)


def test_route_two_endpoints_refused():
    refused(CONNECTION_REJECTED, route, None, "endpoint=abc endpoint=def", DOMAINS)


@pytest.mark.parametrize("options", [None, "", "-c search_path=x"])
def test_route_no_sni_no_endpoint_refused(options):
    err = refused(CONNECTION_REJECTED, route, None, options, DOMAINS)
    assert "options=endpoint=" in err.hint
    assert "<id>.db.example.com" in err.hint
    assert err.response().hint == err.hint


def test_route_empty_sni_treated_as_no_sni():
    err = refused(CONNECTION_REJECTED, route, "", None, DOMAINS)
    assert "options=endpoint=" in err.hint


def test_route_sni_not_served_refused():
    refused(CONNECTION_REJECTED, route, "abc.other.net", None, DOMAINS)


def test_unserved_sni_name_with_endpoint_routes_by_options():
    from gateway.proxy.routing import route

    r, rest = route("localhost", "endpoint=abc", ["db.example.com"])
    assert (r.db_id, r.method, rest) == ("abc", "options", "")


def test_unserved_sni_name_without_endpoint_suggests_the_option():
    import pytest

    from gateway.errors import GatewayError
    from gateway.proxy.routing import route

    with pytest.raises(GatewayError) as info:
        route("localhost", None, ["db.example.com"])
    assert info.value.code == "08004" and "endpoint=" in info.value.hint
