"""`gradwatch user add/token/list/revoke`: people and their tokens, managed on the service's machine.

These commands open the service's store directly (GRADWATCH_DATA_DIR / GRADWATCH_DATABASE_URL), as
the operator who runs `gradwatch up`. A token is printed once; the store keeps only its hash.
"""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime
from typing import Annotated, NoReturn, TypedDict

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from service.auth import GRANTABLE, SCOPES, check_scopes
from service.settings import Settings
from service.store.errors import StoreError
from service.store.store import Store

users = typer.Typer(
    name="user",
    help="Users and their scoped tokens (run where the service's store is).",
    no_args_is_help=True,
)
console = Console(highlight=False)
errors = Console(stderr=True, highlight=False)
_NAME = re.compile(r"^[a-z0-9][a-z0-9._@-]{0,63}$")
_SCOPE_HELP = "Repeat for several: " + "; ".join(f"{name}: {SCOPES[name]}" for name in GRANTABLE)
ScopeOpt = Annotated[list[str], typer.Option("--scope", "-s", help=_SCOPE_HELP)]


class _TokenRow(TypedDict):
    id: str
    scopes: list[str]
    created_at: str | None
    revoked_at: str | None


class _UserRow(TypedDict):
    name: str
    created_at: str | None
    revoked_at: str | None
    tokens: list[_TokenRow]


def register(app: typer.Typer) -> None:
    app.add_typer(users)


def _store() -> Store:
    settings = Settings()
    settings.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    return Store(settings.database_url)


def _fail(message: str) -> NoReturn:
    errors.print(f"[red]error:[/red] {escape(message)}")
    raise typer.Exit(1)


def _scopes(scope: list[str]) -> list[str]:
    try:
        return check_scopes(scope)
    except ValueError as exc:
        _fail(str(exc))
        raise  # unreachable: _fail exits


@users.command("add")
def add(
    name: Annotated[str, typer.Argument(help="Lowercase letters, digits and . _ @ -; at most 64.")],
    scope: ScopeOpt = ["submit"],  # noqa: B006 - typer reads the default, never mutates it
) -> None:
    """Add a user and print their first token (shown this once; only its hash is kept)."""
    if not _NAME.match(name):
        _fail(f"user name {name!r} is not allowed: lowercase letters, digits and . _ @ -, at most 64")
    if name in ("admin", "prometheus", "alertmanager"):
        _fail(f"{name!r} is the service's own consumer: pick another name")
    scopes = _scopes(scope)
    try:
        token = _store().users.add(name, scopes)
    except StoreError as exc:
        _fail(str(exc))
    errors.print(f"added {name} with scopes {', '.join(scopes)}; the token, shown once:")
    print(token)


@users.command("token")
def token(name: str, scope: ScopeOpt = ["submit"]) -> None:  # noqa: B006
    """Give an existing user another token (e.g. a read-only one for a dashboard)."""
    scopes = _scopes(scope)
    try:
        text = _store().users.issue_token(name, scopes)
    except StoreError as exc:
        _fail(str(exc))
    errors.print(f"new token for {name} with scopes {', '.join(scopes)}, shown once:")
    print(text)


@users.command("list")
def list_(json_out: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False) -> None:
    """Users, their tokens' ids and scopes, and what was revoked (never a token itself)."""
    rows: list[_UserRow] = [
        {
            "name": user.name,
            "created_at": _iso(user.created_at),
            "revoked_at": _iso(user.revoked_at),
            "tokens": [
                {
                    "id": t.id,
                    "scopes": t.scopes.split(),
                    "created_at": _iso(t.created_at),
                    "revoked_at": _iso(t.revoked_at),
                }
                for t in tokens
            ],
        }
        for user, tokens in _store().users.everyone()
    ]
    if json_out:
        print(json.dumps(rows, indent=2))
        return
    table = Table(box=None)
    for title in ("USER", "TOKEN", "SCOPES", "CREATED", "REVOKED"):
        table.add_column(title, no_wrap=True)
    for row in rows:
        for t in row["tokens"] or [{"id": "", "scopes": [], "created_at": row["created_at"], "revoked_at": None}]:
            table.add_row(
                row["name"],
                t["id"],
                " ".join(t["scopes"]),
                t["created_at"] or "",
                t["revoked_at"] or row["revoked_at"] or "",
            )
    console.print(table)


@users.command("revoke")
def revoke(name: str) -> None:
    """Revoke a user and every token they hold, at once (their running jobs go on)."""
    try:
        n = _store().users.revoke(name)
    except StoreError as exc:
        _fail(str(exc))
    console.print(f"revoked {name} and {n} token{'s' if n != 1 else ''}")


def _iso(ts: float | None) -> str | None:
    return None if ts is None else datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds")
