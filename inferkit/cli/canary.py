"""``inferkit canary``: show or steer a served model's canary through the admin endpoints."""

from __future__ import annotations

import argparse
import http.client
import json
import math
import os
import sys
import threading
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from typing import Any

import attrs

_MAX_TIMEOUT_S = 1e6  # a socket takes at most ~9.2e9 s: 1e300 was an OverflowError traceback
MAX_ANSWER_BYTES = 1 << 20
"""The most of an answer (or a refusal's body) read: a canary's status is a few hundred bytes."""


def _timeout_s(text: str) -> float:
    value = float(text)
    if not 0 < value <= _MAX_TIMEOUT_S or not math.isfinite(value):
        msg = f"must be a number > 0 and at most {_MAX_TIMEOUT_S:.0f}, got {text}"
        raise argparse.ArgumentTypeError(msg)
    return value


def _canary_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    canary = commands.add_parser(
        "canary",
        help="show or steer a served model's canary",
        description="Call a server's canary admin endpoints with the token in INFERKIT_ADMIN_TOKEN.",
    )
    canary.add_argument("action", choices=("status", "promote", "rollback", "pause", "resume"))
    canary.add_argument("model", help="the model whose canary to show or steer")
    canary.add_argument("--url", required=True, help="the server's HTTP address, e.g. http://127.0.0.1:8000")
    canary.add_argument(
        "--timeout-s", type=_timeout_s, default=10.0, help="seconds to wait for the answer (default 10, at most 1e6)"
    )


def _canary(args: argparse.Namespace) -> int:
    """One admin call; prints the canary's status as JSON. 0 on success, 1 when refused, 2 when unreachable."""
    token = os.environ.get("INFERKIT_ADMIN_TOKEN")
    if not token:
        print("inferkit canary: set INFERKIT_ADMIN_TOKEN to the server's admin token", file=sys.stderr)
        return 2
    url = f"{args.url.rstrip('/')}/v2/admin/models/{urllib.parse.quote(args.model, safe='')}/canary"
    method = "GET"
    if args.action != "status":
        url, method = f"{url}/{args.action}", "POST"
    if not url.startswith(("http://", "https://")):
        print(f"inferkit canary: --url must start with http:// or https://, got {args.url!r}", file=sys.stderr)
        return 2
    try:  # the request too: a URL urllib cannot parse ("http://[::1") raises as it is built
        urllib.parse.urlsplit(url).port  # noqa: B018 (ValueError past 65535: the socket wrapped 70000 to 4464)
        request = urllib.request.Request(url, method=method, headers={"authorization": f"Bearer {token}"})  # noqa: S310 (checked above)
        answer = _within(args.timeout_s, lambda: _fetch(request, args.timeout_s))
    except Exception as error:  # noqa: BLE001 (each kind is one line and an exit status: _failed)
        line, code = _failed(error, args)
        print(f"inferkit canary: {line}", file=sys.stderr)
        return code
    line, code = _answered(answer, url, args.url)
    print(line, file=sys.stdout if code == 0 else sys.stderr)
    return code


def _answered(answer: _Reply, url: str, given: str) -> tuple[str, int]:
    """What to print for a reply, and the exit status: 0 its status as JSON, 1 refused, 2 unusable."""
    if 300 <= answer.status < 400:
        why = "redirects are not followed (the token would go with them): give --url the server's own address"
        return f"inferkit canary: {url!r} answered {answer.status}, a redirect to {answer.location!r:.300}; {why}", 2
    if answer.status >= 400:
        return f"inferkit canary: {answer.status} {_error_message(answer.body)}".rstrip(), 1
    body, problem = _parsed(answer.body, given)
    if problem:
        return f"inferkit canary: {problem}", 2
    return json.dumps(body, indent=2), 0


def _failed(error: Exception, args: argparse.Namespace) -> tuple[str, int]:
    """The line and exit status (2) for a call that got no answer; else raise."""
    if isinstance(error, TimeoutError):
        return f"no whole answer from {args.url!r} within {args.timeout_s:g} s", 2
    # http.client's own: a URL with a control character (InvalidURL), a connection cut mid-answer
    if isinstance(error, urllib.error.URLError | http.client.HTTPException | OSError | ValueError | OverflowError):
        return f"cannot reach {args.url!r}: {error}", 2
    raise error


@attrs.frozen
class _Reply:
    """What the server answered: its status, a redirect's target, and at most ``MAX_ANSWER_BYTES`` + 1 of its body."""

    status: int
    location: str
    body: bytes


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """Refuses every redirect: a 3xx is an ``HTTPError``.

    urllib would resend the token to wherever a redirect points, and turn a redirected POST
    into a GET of that page, printed as if it had acted.
    """

    def redirect_request(self, *_: Any) -> None:
        return None


def _fetch(request: urllib.request.Request, timeout_s: float) -> _Reply:
    """The server's reply, a refusal's or a redirect's too, body read here (within :func:`_within`'s bound)."""
    opener = urllib.request.build_opener(_NoRedirect)
    try:
        with opener.open(request, timeout=timeout_s) as response:
            return _Reply(response.status, "", response.read(MAX_ANSWER_BYTES + 1))
    except urllib.error.HTTPError as error:  # a refusal, or a redirect _NoRedirect refused
        with error:
            try:
                body = error.read(MAX_ANSWER_BYTES + 1)
            except (OSError, http.client.HTTPException):  # cut short: no message
                body = b""
            return _Reply(error.code, error.headers.get("location", ""), body)


def _within(timeout_s: float, call: Callable[[], _Reply]) -> _Reply:
    """``call()``'s result or error, or ``TimeoutError`` once ``timeout_s`` has passed in all.

    A socket's timeout bounds each read: a server sending a byte a second would hold the CLI for
    a megabyte of them. The call runs on a daemon thread the process leaves behind.
    """
    answers: list[_Reply] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            answers.append(call())
        except BaseException as error:  # noqa: BLE001 (raised again on the caller's thread)
            errors.append(error)

    thread = threading.Thread(target=run, name="inferkit-canary", daemon=True)
    thread.start()
    thread.join(timeout_s)
    if errors:
        raise errors[0]
    if not answers:
        raise TimeoutError
    return answers[0]


def _parsed(answer: bytes, url: str) -> tuple[object, str]:
    """The answer's JSON, or why it cannot be used."""
    if len(answer) > MAX_ANSWER_BYTES:
        return None, f"the answer from {url!r} is over {MAX_ANSWER_BYTES} bytes"
    try:
        return json.loads(answer), ""
    except (ValueError, RecursionError):  # nested past the interpreter's depth: no status is
        return None, f"the answer from {url!r} is not JSON"


def _error_message(body: bytes) -> str:
    """The ``error`` of a refusal's JSON body, its control characters escaped; empty when there is none."""
    try:
        parsed = json.loads(body)  # cut short: not JSON, no message
    except (ValueError, RecursionError):
        return ""
    message = parsed.get("error", "") if isinstance(parsed, dict) else ""
    if not isinstance(message, str):
        return ""
    # A server's text on the operator's terminal: no escape sequences, no lines of its own.
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in message[:2000])
