"""Webhook URL checks: the allow-list, the addresses refused whatever the list says, DNS resolution."""

from __future__ import annotations

import socket
from ipaddress import ip_address

import pytest

from app.webhooks.urls import UrlRefused, check_url

HOOKS = ["hooks.example.com"]


@pytest.mark.parametrize("url, allowed", [
    ("https://hooks.example.com/x", HOOKS),
    ("http://hooks.example.com/x", HOOKS),
    ("https://HOOKS.Example.COM/x?y=1#z", HOOKS),
    ("https://hooks.example.com:8443/x", HOOKS),  # a host-only entry allows any port
    ("http://hooks.example.com:1/", HOOKS),
    ("https://hooks.example.com/x", ["HOOKS.example.com:443"]),  # default port of https
    ("http://hooks.example.com/x", ["hooks.example.com:80"]),  # default port of http
    ("http://hooks.example.com:8080/", ["other.example", "hooks.example.com:8080"]),
    ("http://127.0.0.1:9000/hook", ["127.0.0.1:9000"]),
    ("http://127.0.0.1:9000/hook", ["127.0.0.1"]),
    ("http://10.1.2.3/hook", ["10.1.2.3"]),
    ("http://[::1]:8080/hook", ["[::1]:8080"]),
    ("http://[::1]:8080/hook", ["[::1]"]),
    ("http://[::1]/hook", ["::1"]),
    ("http://[0:0:0:0:0:0:0:1]:8080/hook", ["[::1]:8080"]),  # IP literals compared in canonical form
    ("http://localhost:5000/", [" localhost ", ""]),
])
def test_allowed(url, allowed):
    addresses = check_url(url, allowed)  # without resolving: only a literal address comes back
    from urllib.parse import urlsplit

    host = urlsplit(url).hostname or ""
    literal = host[0].isdigit() or ":" in host
    assert (len(addresses) == 1) == literal, (url, addresses)


@pytest.mark.parametrize("url, allowed, fragments", [
    ("https://evil.example.com/x", HOOKS, ["'evil.example.com'", "port 443", "allow-list",
                                           "RESTORELCC_WEBHOOK_ALLOWED_HOSTS"]),
    ("https://hooks.example.com.evil.net/", HOOKS, ["'hooks.example.com.evil.net'", "allow-list"]),
    ("https://sub.hooks.example.com/", HOOKS, ["'sub.hooks.example.com'", "allow-list"]),
    ("https://hooks.example.com/x", ["hooks.example.com:8443"], ["port 443", "allow-list"]),
    ("http://hooks.example.com:8080/x", ["hooks.example.com:80"], ["port 8080", "allow-list"]),
    ("http://[::1]:9090/", ["[::1]:8080"], ["'::1'", "port 9090"]),
    ("http://127.0.0.1/", ["localhost"], ["'127.0.0.1'", "allow-list"]),
    ("http://169.254.169.254/latest/meta-data", ["169.254.169.254"], ["'169.254.169.254'", "cloud metadata",
                                                                      "even to an allowed host"]),
    ("http://100.100.100.200/", ["100.100.100.200"], ["cloud metadata"]),
    ("http://[fd00:ec2::254]/", ["[fd00:ec2::254]"], ["cloud metadata"]),
    ("http://[::ffff:169.254.169.254]/", ["[::ffff:169.254.169.254]"], ["cloud metadata", "IPv6 form"]),
    ("http://[::ffff:a9fe:a9fe]/", ["[::ffff:a9fe:a9fe]"], ["cloud metadata", "169.254.169.254"]),
    ("http://[64:ff9b::a9fe:a9fe]/", ["[64:ff9b::a9fe:a9fe]"], ["cloud metadata"]),
    ("http://2852039166/", ["2852039166"], ["'2852039166'", "169.254.169.254", "cloud metadata"]),
    ("http://0xa9fea9fe/", ["0xa9fea9fe"], ["169.254.169.254", "cloud metadata"]),
    ("http://0251.0376.0251.0376/", ["0251.0376.0251.0376"], ["169.254.169.254"]),
    ("http://169.254.43518/", ["169.254.43518"], ["169.254.169.254"]),
    ("http://2130706433/", ["2130706433"], ["127.0.0.1", "(a.b.c.d)"]),  # even a harmless one: write a.b.c.d
    ("http://1.2.3.999/", ["1.2.3.999"], ["not a valid one"]),
    ("http://99999999999/", ["99999999999"], ["not a valid one"]),
    ("http://169.254.1.1/", ["169.254.1.1"], ["link-local"]),
    ("http://[fe80::1]/", ["[fe80::1]"], ["'fe80::1'", "link-local"]),
    ("http://[fe80::1%25eth0]/", ["fe80::1%25eth0"], ["link-local"]),
    ("http://[::ffff:169.254.1.1]/", ["[::ffff:169.254.1.1]"], ["link-local"]),
    ("http://0.0.0.0:8000/", ["0.0.0.0"], ["unspecified"]),
    ("http://0.1.2.3/", ["0.1.2.3"], ["unspecified"]),
    ("http://[::]:8000/", ["[::]"], ["unspecified"]),
    ("http://224.0.0.1/", ["224.0.0.1"], ["multicast"]),
    ("http://[ff02::1]/", ["[ff02::1]"], ["multicast"]),
    ("http://255.255.255.255/", ["255.255.255.255"], ["broadcast"]),
    ("ftp://hooks.example.com/x", HOOKS, ["'ftp'", "http or https"]),
    ("file:///etc/passwd", HOOKS, ["'file'"]),
    ("gopher://hooks.example.com/", HOOKS, ["'gopher'"]),
    ("hooks.example.com/x", HOOKS, ["no scheme"]),
    ("https:///x", HOOKS, ["no host"]),
    ("https://user:pw@hooks.example.com/x", HOOKS, ["user name or password"]),
    ("https://user@hooks.example.com/x", HOOKS, ["user name or password"]),
    ("https://@hooks.example.com/x", HOOKS, ["user name or password"]),
    ("https://hooks.example.com:99999/", HOOKS, ["cannot be read"]),
    ("https://[::1/", ["[::1]"], ["cannot be read"]),
    ("https://hooks.example.com\\@evil.net/", HOOKS, ["backslash"]),
    ("https://hooks.exa\tmple.com/", HOOKS, ["control characters"]),
    ("https://hooks.example.com /", HOOKS, ["spaces"]),
    ("https://%68ooks.example.com/", ["%68ooks.example.com"], ["percent-encoding"]),
    ("", HOOKS, ["empty"]),
])
def test_refused(url, allowed, fragments):
    with pytest.raises(UrlRefused) as info:
        check_url(url, allowed)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, message


@pytest.mark.parametrize("allowed", [[], [""], ["  ", ""]])
def test_empty_allow_list_means_webhooks_are_off(allowed):
    with pytest.raises(UrlRefused) as info:
        check_url("https://hooks.example.com/x", allowed)
    message = str(info.value)
    assert "not enabled" in message and "RESTORELCC_WEBHOOK_ALLOWED_HOSTS" in message


def test_url_refused_is_a_value_error():
    assert issubclass(UrlRefused, ValueError)


@pytest.mark.parametrize("entry", ["[::1", "[::1]x", "[::1]:", "host:", "host:port", "host:0", "host:70000"])
def test_unreadable_allow_list_entries_never_match(entry):
    with pytest.raises(UrlRefused, match="allow-list"):
        check_url("http://host/", [entry])
    assert check_url("http://host/", [entry, "host"]) == []  # and do not spoil the readable ones (no lookup)


def test_resolve_localhost():
    assert ip_address("127.0.0.1") in check_url("http://localhost:8080/hook", ["localhost"], resolve=True)
    assert check_url("http://127.0.0.1:8080/hook", ["127.0.0.1:8080"], resolve=True) == [ip_address("127.0.0.1")]


def test_resolve_name_that_does_not_resolve():
    with pytest.raises(UrlRefused, match="'nothing.invalid' does not resolve"):
        check_url("http://nothing.invalid/", ["nothing.invalid"], resolve=True)
    label = "a" * 64  # longer than DNS allows: refused before any lookup
    with pytest.raises(UrlRefused, match="does not resolve"):
        check_url(f"http://{label}.example/", [f"{label}.example"], resolve=True)


@pytest.mark.parametrize("address, reason", [
    ("169.254.169.254", "cloud metadata"),
    ("fd00:ec2::254", "cloud metadata"),
    ("::ffff:169.254.169.254", "cloud metadata"),
    ("169.254.10.10", "link-local"),
    ("fe80::1%2", "link-local"),
    ("0.0.0.0", "unspecified"),
])
def test_resolve_refuses_names_pointing_at_never_addresses(monkeypatch, address, reason):
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    real = socket.getaddrinfo
    seen = []

    def fake_getaddrinfo(host, port, *args, **kwargs):
        seen.append(host)
        if host != "hooks.example.com":
            return real(host, port, *args, **kwargs)
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("203.0.113.7", port)),
                (family, socket.SOCK_STREAM, 6, "", (address, port))]

    monkeypatch.setattr(socket, "getaddrinfo", fake_getaddrinfo)
    check_url("https://hooks.example.com/x", HOOKS)  # without resolve=True the name is not looked up
    assert seen == []
    with pytest.raises(UrlRefused) as info:
        check_url("https://hooks.example.com/x", HOOKS, resolve=True)
    assert seen == ["hooks.example.com"]
    message = str(info.value)
    assert "'hooks.example.com' resolves to" in message and reason in message, message


def test_resolve_accepts_names_pointing_at_ordinary_addresses(monkeypatch):
    def fake_getaddrinfo(host, port, *args, **kwargs):
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("203.0.113.7", port)),
                (socket.AF_INET6, socket.SOCK_STREAM, 6, "", ("2001:db8::7", port, 0, 0))]

    monkeypatch.setattr(socket, "getaddrinfo", fake_getaddrinfo)
    assert check_url("https://hooks.example.com/x", HOOKS, resolve=True) == [ip_address("203.0.113.7"),
                                                                              ip_address("2001:db8::7")]
