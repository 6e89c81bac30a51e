"""``ia pause`` and ``ia resume``: the kill switch."""

from __future__ import annotations

import asyncio
import getpass
import json

import click

from ia.cli.common import redis_client, settings


def _kill_switch():
    from ia.decisions.guards import KillSwitch

    s = settings()
    client = redis_client(s)
    return client, KillSwitch(client, s.redis.prefix)


@click.command()
@click.option("--reason", default="", help="Why; recorded with the pause.")
@click.option("--by", default=None, help="Who pauses (default: $USER).")
def pause(reason: str, by: str | None) -> None:
    """Kill switch: stop all automation; workers and actuators honour it within 1 s."""

    async def run() -> dict:
        client, ks = _kill_switch()
        try:
            return await ks.pause(by or getpass.getuser(), reason)
        finally:
            await client.aclose()

    info = asyncio.run(run())
    click.echo(json.dumps({"paused": True, **info}))


@click.command()
def resume() -> None:
    """Lift the kill switch set by `ia pause`."""

    async def run() -> bool:
        client, ks = _kill_switch()
        try:
            return await ks.resume()
        finally:
            await client.aclose()

    was = asyncio.run(run())
    click.echo(json.dumps({"paused": False, "was_paused": was}))
