"""``ia config``: the effective settings, where each comes from, secrets masked."""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import click
from pydantic import SecretStr

from ia.cli.common import settings
from ia.core.settings import env_names, unknown_env

MASK = "********"


def _shown(value: Any) -> Any:
    if isinstance(value, SecretStr):
        return MASK
    if isinstance(value, str) and "://" in value:
        return _without_password(value)
    return str(value) if value is not None and not isinstance(value, int | float | bool) \
        else value


def _without_password(url: str) -> str:
    parts = urlsplit(url)
    if not parts.password:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", f":{MASK}@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


def effective() -> list[dict[str, Any]]:
    """One row per setting: its dotted name, value (secrets masked) and variables."""
    s = settings()
    rows = []
    for group, name, field, names in env_names():
        value = getattr(getattr(s, group), name) if group else getattr(s, name)
        rows.append({"setting": f"{group}.{name}" if group else name, "value": _shown(value),
                     "env": list(names), "description": field.description or ""})
    return rows


@click.command("config")
@click.option("--json", "as_json", is_flag=True, help="One JSON document.")
def config(as_json: bool) -> None:
    """Print the effective settings (environment and .env), secrets masked."""
    rows = effective()
    unknown = unknown_env()
    if as_json:
        click.echo(json.dumps({"settings": rows, "unknown_env": unknown}, indent=2))
        return
    width = max(len(r["setting"]) for r in rows)
    for r in rows:
        click.echo(f"{r['setting']:<{width}}  {r['value']!s:<24}  {' or '.join(r['env'])}")
    for name in unknown:
        click.echo(f"warning: {name} names no setting (ignored)", err=True)
