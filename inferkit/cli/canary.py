"""``inferkit canary``: show or steer a served model's canary through the admin endpoints."""

from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.error
import urllib.parse
import urllib.request

from inferkit.cli.args import _positive


def _canary_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    canary = commands.add_parser(
        "canary",
        help="show or steer a served model's canary",
        description="Call a server's canary admin endpoints with the token in INFERKIT_ADMIN_TOKEN.",
    )
    canary.add_argument("action", choices=("status", "promote", "rollback", "pause", "resume"))
    canary.add_argument("model", help="the model whose canary to show or steer")
    canary.add_argument("--url", required=True, help="the server's HTTP address, e.g. http://127.0.0.1:8000")
    canary.add_argument("--timeout-s", type=_positive, default=10.0, help="seconds to wait for the answer")


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
    request = urllib.request.Request(url, method=method, headers={"authorization": f"Bearer {token}"})  # noqa: S310 (checked above)
    try:
        with urllib.request.urlopen(request, timeout=args.timeout_s) as response:  # noqa: S310 (checked above)
            body = json.loads(response.read())
    except urllib.error.HTTPError as error:
        try:
            message = json.loads(error.read()).get("error", "")
        except ValueError:
            message = ""
        print(f"inferkit canary: {error.code} {message}".rstrip(), file=sys.stderr)
        return 1
    except (urllib.error.URLError, OSError, ValueError) as error:
        print(f"inferkit canary: cannot reach {args.url}: {error}", file=sys.stderr)
        return 2
    print(json.dumps(body, indent=2))
    return 0
