"""``inferkit canary``: what it does with a URL, a timeout or an answer it cannot use (no server needed)."""

from __future__ import annotations

import http.server
import threading
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

    def do_GET(self) -> None:
        self.send_response(self.status)
        self.send_header("content-length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, *_: object) -> None:
        pass


@pytest.fixture(name="server")
def _server() -> Iterator[tuple[str, type[_Answer]]]:
    handler = type("Handler", (_Answer,), {})
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
