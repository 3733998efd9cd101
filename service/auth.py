"""Who may do what: users, scoped tokens, and the service's own consumers' tokens.

Every request but /healthz carries a bearer token. A token belongs to a user and
carries scopes; `admin` implies every scope, `submit` and `read-all` imply `read`:

    admin          everything: other people's jobs, priorities above the ceiling
    submit         submit jobs, cancel your own, read
    read           list and read your own jobs, their logs, reports, events and alerts
    read-all       read every job, log, report, event and alert (operators); no changes
    alerts:write   Alertmanager's webhook (POST /v1/alerts)
    targets:read   Prometheus: worker discovery (/v1/targets) and the service's /metrics
    job:progress   one running job's driver: that job's progress, nothing else (minted at launch)

People's tokens live in the store (hashed, `gradwatch user add`). The service's own
consumers each have one token from settings or a 0600 file in the data directory:
`admin` (the operator: what `gradwatch up` prints), `prometheus` and `alertmanager`;
`consumer_token_file` is what a rendered Prometheus or Alertmanager config names.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from gradwatch.status import write_atomic
from service.settings import Settings

if TYPE_CHECKING:
    from service.store.store import Store

SCOPES: dict[str, str] = {
    "admin": "everything, including other people's jobs and priorities above the ceiling",
    "submit": "submit jobs, cancel your own jobs, and read",
    "read": "list and read your own jobs, their logs, reports, events and alerts",
    "read-all": "list and read every user's jobs, logs, reports, events and alerts (operators)",
    "alerts:write": "Alertmanager's webhook (POST /v1/alerts)",
    "targets:read": "Prometheus: worker discovery (/v1/targets) and the service's /metrics",
    "job:progress": "one running job's driver: report that job's progress (minted at launch)",
}
# Scopes a person's token may be given (job:progress is minted for a job, never handed out).
GRANTABLE = tuple(s for s in SCOPES if s != "job:progress")
IMPLIES: dict[str, frozenset[str]] = {
    "admin": frozenset(SCOPES),
    "submit": frozenset({"submit", "read"}),
    "read-all": frozenset({"read-all", "read"}),
}

Consumer = Literal["admin", "prometheus", "alertmanager"]
CONSUMERS: dict[str, tuple[str, frozenset[str]]] = {
    # consumer: (the user it acts as, its scopes)
    "admin": ("admin", frozenset({"admin"})),
    "prometheus": ("prometheus", frozenset({"targets:read"})),
    "alertmanager": ("alertmanager", frozenset({"alerts:write"})),
}
# A launched job's driver finds its own token in the file this variable names.
JOB_TOKEN_FILE_ENV = "GRADWATCH_JOB_TOKEN_FILE"
TOKEN_PREFIX = "gwt"


@dataclass(frozen=True)
class Principal:
    """The authenticated caller: a user, what their token may do, and the one job a job token is for."""

    user: str
    scopes: frozenset[str]
    job_id: str | None = None

    @property
    def admin(self) -> bool:
        return "admin" in self.scopes

    def can(self, scope: str) -> bool:
        return scope in self.scopes

    @property
    def reads_all(self) -> bool:
        """Whether this caller reads every user's jobs (`read-all`, or `admin`, which implies it)."""
        return "read-all" in self.scopes

    def sees(self, owner: str | None) -> bool:
        """Whether a job of `owner` is visible to this caller: their own, or everyone's with read-all."""
        return self.reads_all or (owner is not None and owner == self.user)


def expand(scopes: list[str] | tuple[str, ...] | frozenset[str]) -> frozenset[str]:
    """The scopes a token holds, implied ones included."""
    held: set[str] = set()
    for scope in scopes:
        held |= IMPLIES.get(scope, frozenset({scope}))
    return frozenset(held)


def check_scopes(scopes: list[str]) -> list[str]:
    """Scopes a person's token may carry; ValueError naming the valid ones otherwise."""
    if not scopes:
        raise ValueError(f"give at least one scope: {', '.join(GRANTABLE)}")
    unknown = [s for s in scopes if s not in GRANTABLE]
    if unknown:
        raise ValueError(f"unknown scope {', '.join(unknown)}: use {', '.join(GRANTABLE)}")
    return sorted(set(scopes))


def new_token_text(token_id: str) -> str:
    """`gwt_<id>_<secret>`: the id finds the stored hash, the secret is never stored."""
    return f"{TOKEN_PREFIX}_{token_id}_{secrets.token_urlsafe(32)}"


def split_token(text: str) -> tuple[str, str] | None:
    """(id, secret) of a store token, None for anything else."""
    prefix, _, rest = text.partition("_")
    token_id, _, secret = rest.partition("_")
    if prefix != TOKEN_PREFIX or not token_id or not secret or len(text) > 200:
        return None
    return token_id, secret


# ------------------------------------------------------------- consumers
def consumer_token_file(settings: Settings, consumer: Consumer) -> Path:
    """The file holding `consumer`'s token, written (0600, a new random token) when missing.

    Settings name it (GRADWATCH_<CONSUMER>_TOKEN_FILE) or it is `<data_dir>/token` for admin and
    `<data_dir>/<consumer>.token` otherwise. A token given in the environment is written there too,
    so a rendered Prometheus or Alertmanager config can always name a file.
    """
    path = settings.token_file_of(consumer)
    given = settings.token_of(consumer, read_file=False)
    current = _read_token(path)
    if current is None or (given and current != given):
        _write_private(path, given or secrets.token_urlsafe(32))
    return path


def consumer_token(settings: Settings, consumer: Consumer) -> str:
    """`consumer`'s token (made and saved when there is none yet)."""
    token = _read_token(consumer_token_file(settings, consumer))
    assert token is not None
    return token


def _read_token(path: Path) -> str | None:
    try:
        return path.read_text().strip() or None
    except OSError:
        return None


def _write_private(path: Path, text: str) -> None:
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    write_atomic(path, text + "\n", mode=0o600)


# ------------------------------------------------------------ verification
class Authenticator:
    """Turns a bearer token into a Principal: the consumers' tokens first, then the store's."""

    def __init__(self, settings: Settings, store: Store):
        self.settings, self.store = settings, store
        self._files: dict[str, tuple[float, str | None]] = {}

    def _consumer_tokens(self) -> list[tuple[str, Principal]]:
        tokens = []
        for consumer, (user, scopes) in CONSUMERS.items():
            token = self.settings.token_of(consumer, read_file=False) or self._file_token(consumer)
            if token:
                tokens.append((token, Principal(user, expand(scopes))))
        return tokens

    def _file_token(self, consumer: str) -> str | None:
        # Re-read only when the file changed: a token written after start (or rotated) is honoured.
        path = self.settings.token_file_of(consumer)
        try:
            mtime = path.stat().st_mtime
        except OSError:
            return None
        cached = self._files.get(consumer)
        if cached is None or cached[0] != mtime:
            cached = (mtime, _read_token(path))
            self._files[consumer] = cached
        return cached[1]

    def configured(self) -> bool:
        """Whether any token at all can authenticate."""
        return bool(self._consumer_tokens()) or self.store.users.has_tokens()

    def verify(self, text: str) -> Principal | None:
        given = text.encode()
        for token, principal in self._consumer_tokens():
            if secrets.compare_digest(given, token.encode()):
                return principal
        row = self.store.users.authenticate(text)
        if row is None:
            return None
        return Principal(row.user, expand(row.scopes.split()), row.job_id)


__all__ = [
    "Authenticator",
    "CONSUMERS",
    "GRANTABLE",
    "JOB_TOKEN_FILE_ENV",
    "SCOPES",
    "Principal",
    "check_scopes",
    "consumer_token",
    "consumer_token_file",
    "expand",
]
