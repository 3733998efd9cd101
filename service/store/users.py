"""The users-and-tokens aggregate: people who hold tokens, the tokens (only their SHA-256 is stored),
revoking, and authenticating a bearer token (a job's own token lives until its job ends)."""

from __future__ import annotations

import hashlib
import secrets
import time

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from gradwatch.names import TERMINAL_STATES
from service.auth import new_token_text, split_token
from service.store.engine import Database
from service.store.errors import UserExists, UserNotFound
from service.store.tables import Job, Token, User


class Users:
    """Thread-safe access to users and their tokens. Rows it returns are detached snapshots."""

    def __init__(self, db: Database):
        self._db = db

    def add(self, name: str, scopes: list[str], *, now: float | None = None) -> str:
        """A new user and their first token; returns the token's text (shown once, stored hashed)."""
        at = time.time() if now is None else now
        try:
            with self._db.write() as session:
                if session.get(User, name) is not None:
                    raise UserExists(f"user {name!r} exists: `gradwatch user token {name}` gives them another token")
                session.add(User(name=name, created_at=at, revoked_at=None))
        except IntegrityError:
            raise UserExists(f"user {name!r} exists") from None
        return self.issue_token(name, scopes, now=at)

    def issue_token(self, user: str, scopes: list[str], *, job_id: str | None = None, now: float | None = None) -> str:
        """A new token for `user`; `job_id` makes it good for that job only, until the job ends."""
        at = time.time() if now is None else now
        with self._db.write() as session:
            if job_id is None:
                row = session.get(User, user)
                if row is None or row.revoked_at is not None:
                    raise UserNotFound(f"no active user {user!r}: `gradwatch user list` shows them")
            token_id = secrets.token_hex(8)
            text = new_token_text(token_id)
            _, secret = split_token(text) or ("", "")
            session.add(
                Token(
                    id=token_id,
                    user=user,
                    scopes=" ".join(scopes),
                    digest=_digest(secret),
                    job_id=job_id,
                    created_at=at,
                    revoked_at=None,
                )
            )
        return text

    def everyone(self) -> list[tuple[User, list[Token]]]:
        """Every user with their people's tokens (job tokens left out), oldest first."""
        with self._db.read() as session:
            users = list(session.scalars(select(User).order_by(User.created_at, User.name)))
            tokens = list(session.scalars(select(Token).where(Token.job_id.is_(None)).order_by(Token.created_at)))
        return [(u, [t for t in tokens if t.user == u.name]) for u in users]

    def revoke(self, name: str, *, now: float | None = None) -> int:
        """Revoke a user and every token they hold (not their running jobs' own); returns how many."""
        at = time.time() if now is None else now
        with self._db.write() as session:
            user = session.get(User, name)
            if user is None:
                raise UserNotFound(f"no user {name!r}: `gradwatch user list` shows them")
            user.revoked_at = user.revoked_at or at
            tokens = list(
                session.scalars(
                    select(Token).where(Token.user == name, Token.revoked_at.is_(None), Token.job_id.is_(None))
                )
            )
            for token in tokens:
                token.revoked_at = at
        return len(tokens)

    def has_tokens(self) -> bool:
        with self._db.read() as session:
            return session.scalar(select(Token.id).where(Token.revoked_at.is_(None)).limit(1)) is not None

    def authenticate(self, text: str) -> Token | None:
        """The live token `text` is, or None (unknown, wrong secret, revoked, or its job ended)."""
        parts = split_token(text)
        if parts is None:
            return None
        token_id, secret = parts
        with self._db.read() as session:
            token = session.get(Token, token_id)
            if token is None or not secrets.compare_digest(token.digest, _digest(secret)):
                return None
            if token.revoked_at is not None:
                return None
            if token.job_id is not None:
                job = session.get(Job, token.job_id)
                return token if job is not None and job.state not in TERMINAL_STATES else None
            user = session.get(User, token.user)
            return token if user is not None and user.revoked_at is None else None


def _digest(secret: str) -> str:
    # Tokens are 256 random bits: a plain SHA-256 cannot be brute-forced, no slow hash needed.
    return hashlib.sha256(secret.encode()).hexdigest()
