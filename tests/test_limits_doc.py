"""docs/limits.md states each limit's name and default: both are read from the page and checked against
the code, so the page cannot drift from what the service and the spec enforce."""

from __future__ import annotations

import re
from pathlib import Path

from gradwatch.spec import MAX_ERROR_LINES, MAX_SPEC_BYTES, MAX_SPEC_NODES, JobSpec
from service.settings import Settings

PAGE = Path(__file__).resolve().parents[1] / "docs" / "limits.md"
ROW = re.compile(r"^\| `GRADWATCH_([A-Z_]+)` \| ([^|]+) \|", re.MULTILINE)


def test_every_setting_in_the_page_exists_with_the_default_it_states():
    rows = ROW.findall(PAGE.read_text())
    assert len(rows) >= 10
    defaults = Settings(token="x")
    for env_name, stated in rows:
        field = env_name.lower()
        assert field in Settings.model_fields, f"docs/limits.md names GRADWATCH_{env_name}, which is no setting"
        assert str(getattr(defaults, field)) == stated.strip(), (env_name, getattr(defaults, field), stated)


def test_every_limit_setting_is_in_the_page():
    named = {name.lower() for name, _ in ROW.findall(PAGE.read_text())}
    limits = {name for name in Settings.model_fields if name.startswith("max_") or name.endswith("_timeout")}
    assert limits <= named, f"missing from docs/limits.md: {sorted(limits - named)}"


def test_the_spec_limits_in_the_page_are_the_code_s():
    text = PAGE.read_text()
    assert f"| spec size | {MAX_SPEC_BYTES} bytes |" in text
    assert f"| keys, values and items in a spec | {MAX_SPEC_NODES} |" in text
    assert f"at most {MAX_ERROR_LINES} lines" in text
    assert JobSpec.model_fields["max_queued"].default == 24 * 3600 and "| `max_queued` | 24h" in text
