"""The trivial agent of ``ia bench``: telemetry in, the same bytes out, nothing else.

It uses exactly the worker's plumbing (batching, sending, confirmation before
acknowledgement), so the ratio of the pipeline's throughput to this agent's
is the cost of validation, enrichment, scoring and deciding alone.
"""

from __future__ import annotations

import faust

from ia.core import metrics
from ia.core.settings import Settings
from ia.streams.app import make_app, raw_topic, send_confirmed


def build_passthrough(settings: Settings) -> faust.App:
    app = make_app(settings, settings.worker.app_id)
    source = raw_topic(app, settings.topics.telemetry)
    sink = settings.topics.decisions
    metrics.serve(settings.metrics_port, settings.metrics_host, role="bench")

    @app.agent(source)
    async def passthrough(stream: faust.StreamT) -> None:
        async for events in stream.take_events(settings.worker.batch_size,
                                               within=settings.worker.batch_within_s):
            metrics.EVENTS_IN.labels(settings.topics.telemetry).inc(len(events))
            await send_confirmed(app, sink, [(ev.message.key, ev.message.value) for ev in events])

    return app
