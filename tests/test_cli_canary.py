"""``inferkit canary``: what it does with a URL, a timeout or an answer it cannot use (no server needed)."""

from __future__ import annotations

import http.server
import threading
import time
from collections.abc import Iterator

import pytest

from inferkit.cli import main

TOKEN = "a-token-of-16-chars-or-more"


@pytest.fixture(autouse=True)
def _token(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("INFERKIT_ADMIN_TOKEN", TOKEN)


class _Answer(http.server.BaseHTTPRequestHandler):
    status = 200
    body = b"{}"
    location = ""  # sent with a redirect
    trickle: threading.Event | None = None  # the body a byte at a time; set once all of it went
    paths: list[str]

    def do_GET(self) -> None:
        self.paths.append(f"{self.command} {self.path} {self.headers.get('authorization')}")
        self.send_response(self.status)
        if self.location:
            self.send_header("location", self.location)
        self.send_header("content-length", str(len(self.body)))
        self.end_headers()
        if self.trickle is None:
            self.wfile.write(self.body)
            return
        for byte in self.body:
            self.wfile.write(bytes([byte]))
            self.wfile.flush()
            time.sleep(0.1)
        self.trickle.set()

    do_POST = do_GET  # noqa: N815 (http.server's name)

    def log_message(self, *_: object) -> None:
        pass


@pytest.fixture(name="server")
def _server() -> Iterator[tuple[str, type[_Answer]]]:
    handler = type("Handler", (_Answer,), {"paths": []})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", handler
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


class TestCanaryCli:
    """Each failure is one line and an exit status, never a traceback."""

    @pytest.mark.parametrize(
        ("url", "message"),
        [
            ("http://[::1", "Invalid IPv6 URL"),  # a ValueError traceback: the request was built outside the try
            ("http://h:1/\r\nX: y", "URL can't contain control characters"),  # http.client.InvalidURL escaped
            ("http://127.0.0.1:70000", "Port out of range 0-65535"),  # the socket wrapped it to 4464
            ("http://a..b:1", "encoding with 'idna' codec failed"),
        ],
    )
    def test_a_url_it_cannot_use_exits_2(self, url: str, message: str, capsys: pytest.CaptureFixture[str]) -> None:
        """A URL urllib or http.client refuses is 'cannot reach', exit 2."""
        assert main(["canary", "status", "m", "--url", url, "--timeout-s", "5"]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"inferkit canary: cannot reach {url!r}: "), err
        assert message in err, err

    @pytest.mark.parametrize("timeout", ["1e300", "1000001", "inf", "nan", "0", "-1"])
    def test_the_timeout_is_bounded(self, timeout: str, capsys: pytest.CaptureFixture[str]) -> None:
        """--timeout-s 1e300 was an OverflowError traceback from the socket: now refused by argparse."""
        with pytest.raises(SystemExit) as stopped:
            main(["canary", "status", "m", "--url", "http://127.0.0.1:1", "--timeout-s", timeout])
        assert stopped.value.code == 2
        assert f"--timeout-s: must be a number > 0 and at most 1000000, got {timeout}" in capsys.readouterr().err

    @pytest.mark.parametrize(
        ("status", "body", "code", "line"),
        [
            (200, b'{"state": "running"}', 0, ""),
            (200, b"<html>", 2, "inferkit canary: the answer from {url!r} is not JSON"),
            (403, b'{"error": "wrong token"}', 1, "inferkit canary: 403 wrong token"),
            (403, b"[1, 2]", 1, "inferkit canary: 403"),  # an AttributeError traceback: a list has no .get
            (500, b"oops", 1, "inferkit canary: 500"),
            (200, b'"' + b"x" * (1 << 20) + b'"', 2, "inferkit canary: the answer from {url!r} is over 1048576 bytes"),
            (403, b'{"error": "' + b"x" * (1 << 20) + b'"}', 1, "inferkit canary: 403"),  # read in part: no message
            (200, b"[" * 200_000, 2, "inferkit canary: the answer from {url!r} is not JSON"),  # a RecursionError
            (503, b"[" * 200_000, 1, "inferkit canary: 503"),  # a RecursionError traceback, exit 1
            # a server's text reached the terminal raw: escape sequences, and a line of its own
            (403, b'{"error": "\\u001b[2Jfake\\nline2"}', 1, "inferkit canary: 403 \\x1b[2Jfake\\nline2"),
        ],
    )
    def test_answers(
        self,
        server: tuple[str, type[_Answer]],
        status: int,
        body: bytes,
        code: int,
        line: str,
        capsys: pytest.CaptureFixture[str],
    ) -> None:
        """A status answer is printed; a refusal is exit 1 with its error, whatever its body; no JSON is exit 2."""
        url, handler = server
        handler.status, handler.body = status, body
        assert main(["canary", "status", "m", "--url", url]) == code
        out, err = capsys.readouterr()
        assert err == (line.format(url=url) + "\n" if line else ""), err
        if code == 0:
            assert '"state": "running"' in out

    def test_a_redirect_is_not_followed(
        self, server: tuple[str, type[_Answer]], capsys: pytest.CaptureFixture[str]
    ) -> None:
        """A 302 to a promote was followed as a GET of the page it named, with the token, printed, exit 0."""
        url, handler = server
        handler.status, handler.body, handler.location = 302, b"", f"{url}/elsewhere"
        assert main(["canary", "promote", "m", "--url", url]) == 2
        err = capsys.readouterr().err
        assert f"answered 302, a redirect to '{url}/elsewhere'; redirects are not followed" in err, err
        assert handler.paths == [f"POST /v2/admin/models/m/canary/promote Bearer {TOKEN}"]  # nothing else was asked

    @pytest.mark.parametrize("status", [200, 403])
    def test_the_timeout_bounds_the_whole_answer(
        self, server: tuple[str, type[_Answer]], status: int, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """--timeout-s bounded each read only: a server sending a byte a second held the CLI for a megabyte of
        them (a refusal's body was read after the bound, on the main thread)."""
        url, handler = server
        handler.status, handler.body, handler.trickle = status, b'{"state": "running"}', threading.Event()
        assert main(["canary", "status", "m", "--url", url, "--timeout-s", "0.5"]) == 2
        assert not handler.trickle.is_set()  # it gave up before the answer ended (20 bytes, 0.1 s apart)
        assert capsys.readouterr().err == f"inferkit canary: no whole answer from {url!r} within 0.5 s\n"
