"""The light bertstream client: submit texts, stream files, read results.

Never imports torch or transformers, so a web app can install it alone::

    from contract.settings import Settings
    from producer import Client

    with Client(Settings.from_env()) as client:
        task_id = client.submit("great service")
        result = client.wait([task_id], timeout=10)[task_id]

From asyncio code, :class:`AsyncClient` takes the same settings and awaits the same
calls (``async with AsyncClient(...) as client``), without blocking the event loop.
"""

from __future__ import annotations

from producer.aclient import AsyncClient
from producer.client import ChunkPublisher, Client, ClientClosed, SubmitReport
from producer.items import ItemError
from producer.stream import StreamReport, stream

__all__ = ["AsyncClient", "ChunkPublisher", "Client", "ClientClosed", "ItemError", "StreamReport",
           "SubmitReport", "stream"]
