"""Job ids: `gw-` and 12 random hex digits, the same wherever a job is named."""

from __future__ import annotations

import secrets


def new_job_id() -> str:
    return f"gw-{secrets.token_hex(6)}"
