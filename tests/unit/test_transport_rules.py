"""The transport's decisions without a network: which failures are retried and in whose words,
and which hosts ``NO_PROXY`` exempts from the proxy."""

from __future__ import annotations

import errno
import http.client
import os
import ssl

import pytest

from gcsstream import retry, transport
from gcsstream.errors import UsageError

# -- network failures: retried in words of ours, or refused, or left alone ---------------------------


def test_an_unreachable_host_mid_answer_is_a_retryable_network_error():
    """EHOSTUNREACH (an ICMP unreachable on an established connection) is an OSError but no
    ConnectionError: it must still be retried."""
    cause = OSError(errno.EHOSTUNREACH, os.strerror(errno.EHOSTUNREACH))
    error = transport._network_error(cause)
    assert isinstance(error, retry.NetworkError)
    assert isinstance(error, retry.RETRYABLE_EXCEPTIONS)
    assert os.strerror(errno.EHOSTUNREACH) in str(error)


@pytest.mark.parametrize(
    "cause",
    [
        ssl.SSLError(1, "[SSL: DECRYPTION_FAILED_OR_BAD_RECORD_MAC] decryption failed or bad record mac"),
        ssl.SSLEOFError(8, "EOF occurred in violation of protocol"),
    ],
    ids=["bad-record", "eof"],
)
def test_a_tls_failure_mid_body_is_a_retryable_network_error(cause):
    error = transport._network_error(cause)
    assert isinstance(error, retry.NetworkError)
    assert isinstance(error, retry.RETRYABLE_EXCEPTIONS)
    assert "TLS" in str(error)


#: Text a hostile server controls, carried by http.client's exceptions.
HOSTILE = "\x1b]0;owned\x07\x1b[2J"


@pytest.mark.parametrize(
    "cause",
    [
        http.client.IncompleteRead(HOSTILE.encode(), 1000),
        http.client.BadStatusLine(HOSTILE),
        http.client.LineTooLong(HOSTILE),
        http.client.HTTPException(HOSTILE),
    ],
    ids=["IncompleteRead", "BadStatusLine", "LineTooLong", "HTTPException"],
)
def test_an_answer_that_cannot_be_read_is_a_network_error_in_words_of_ours(cause):
    error = transport._network_error(cause)
    assert isinstance(error, retry.NetworkError)
    assert isinstance(error, retry.RETRYABLE_EXCEPTIONS)
    message = str(error)
    assert message and message.isprintable(), repr(message)
    assert "\x1b" not in message and "owned" not in message, repr(message)
    assert str(cause) not in message and repr(cause) not in message
    assert "\x1b" not in retry.describe_network_error(error)


def test_a_status_line_of_escape_codes_is_not_repeated():
    error = transport._network_error(http.client.BadStatusLine("\x1b]0;owned\x07"))
    assert isinstance(error, retry.NetworkError)
    assert "\x1b" not in str(error) and "owned" not in str(error)


def test_an_invalid_url_is_a_usage_error_that_keeps_the_url_out():
    """http.client refuses a URL with a space or a control character (a session URI pasted
    wrongly): no retry sends it, and the message does not repeat the URL (a credential)."""
    cause = http.client.InvalidURL(
        "URL can't contain control characters. '/upload?upload_id=ABCsecret tail' (found at least ' ')"
    )
    error = transport._network_error(cause)
    assert isinstance(error, UsageError)
    assert not isinstance(error, retry.RETRYABLE_EXCEPTIONS)
    assert "ABCsecret" not in str(error) and "upload_id" not in str(error)


def test_an_invalid_url_is_not_among_the_retryable_exceptions():
    assert not isinstance(http.client.InvalidURL("bad port"), retry.RETRYABLE_EXCEPTIONS)
    assert not issubclass(http.client.InvalidURL, retry.RETRYABLE_EXCEPTIONS)


@pytest.mark.parametrize(
    "cause",
    [http.client.CannotSendRequest(), http.client.ResponseNotReady("Idle"), ValueError("a bug of ours")],
    ids=["CannotSendRequest", "ResponseNotReady", "ValueError"],
)
def test_a_connection_used_out_of_turn_or_a_bug_is_returned_unchanged(cause):
    assert transport._network_error(cause) is cause


@pytest.mark.parametrize(
    "cause",
    [ConnectionResetError(errno.ECONNRESET, "reset"), TimeoutError("timed out"), retry.AnswerTooSlow("slow")],
    ids=["reset", "timeout", "too-slow"],
)
def test_a_failure_already_retryable_is_returned_unchanged(cause):
    assert transport._network_error(cause) is cause


# -- NO_PROXY ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "port", "no_proxy", "bypassed"),
    [
        # CIDR blocks
        ("127.0.0.1", 8080, "127.0.0.0/8", True),
        ("127.255.1.2", None, "127.0.0.0/8", True),
        ("10.1.2.3", 443, "127.0.0.0/8", False),
        ("10.1.2.3", 443, "192.168.0.0/16, 10.0.0.0/8", True),
        ("localhost", 80, "127.0.0.0/8", False),  # a name is not in an address block
        ("10.0.0.9", 80, "10.0.0.1/8", True),  # host bits set: taken as the block
        # an exact IP address
        ("10.0.0.5", 443, "10.0.0.5", True),
        ("10.0.0.50", 443, "10.0.0.5", False),
        ("10.0.0.5", 443, "10.0.0.50", False),
        # a domain and its subdomains, with or without a leading dot
        ("storage.googleapis.com", 443, "googleapis.com", True),
        ("storage.googleapis.com", 443, ".googleapis.com", True),
        ("googleapis.com", 443, ".googleapis.com", True),
        ("googleapis.com", 443, "googleapis.com", True),
        ("notgoogleapis.com", 443, "googleapis.com", False),
        ("googleapis.com", 443, "storage.googleapis.com", False),
        ("Storage.GoogleAPIs.com", 443, "GOOGLEAPIS.COM", True),
        ("b.example", 443, "a.example b.example", True),  # separated by spaces
        # everything
        ("anything.example", 443, "*", True),
        ("10.1.2.3", None, "*", True),
        ("host.example", 443, "other.example, *", True),
        # host:port entries
        ("example.com", 8080, "example.com:8080", True),
        ("example.com", 443, "example.com:8080", False),
        ("example.com", None, "example.com:8080", False),
        ("a.example.com", 8080, ".example.com:8080", True),
        ("10.0.0.5", 8080, "10.0.0.5:8080", True),
        ("10.0.0.5", 9090, "10.0.0.5:8080", False),
        # IPv6, bracketed or not
        ("::1", 443, "[::1]", True),
        ("[::1]", 443, "[::1]", True),
        ("::1", 443, "::1", True),
        ("::2", 443, "[::1]", False),
        ("::1", 443, "::1/128", True),
        ("2001:db8::7", 443, "2001:db8::/32", True),
        ("2001:db9::7", 443, "2001:db8::/32", False),
        # junk entries: skipped, never a crash, and they do not hide a good entry
        ("example.com", 443, "", False),
        ("example.com", 443, " , ,, ", False),
        ("example.com", 443, "not-a-cidr/99", False),
        ("10.1.2.3", 443, "300.1.2.3/8, 10.0.0.0/99, ::::/x", False),
        ("10.1.2.3", 443, "[garbage, :, /, [], .", False),
        ("example.com", 443, "junk/xx, ,:::, example.com", True),
        ("10.1.2.3", 443, "bad/cidr, 10.0.0.0/8", True),
    ],
)
def test_no_proxy_entries(host, port, no_proxy, bypassed):
    assert transport._bypassed(host, port, no_proxy) is bypassed


def test_a_cidr_block_in_no_proxy_keeps_a_loopback_endpoint_off_the_proxy(monkeypatch):
    for name in list(os.environ):
        if name.lower().endswith("_proxy"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("HTTP_PROXY", "http://proxy.invalid:3128")
    assert transport._proxy_for("http://127.0.0.1:8080/o") is not None
    monkeypatch.setenv("NO_PROXY", "127.0.0.0/8")
    assert transport._proxy_for("http://127.0.0.1:8080/o") is None
    assert transport._proxy_for("http://10.0.0.1:8080/o") is not None
