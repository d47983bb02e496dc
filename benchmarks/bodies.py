"""Celery protocol-2 task bodies ``(args, kwargs, embed)`` of an exact Kombu-json size, for the benchmarks.

Every system is measured on the same body. It mixes what task arguments
usually hold: strings (ids, names, free text), ints, floats, booleans, None,
nested dicts and lists (an order with line items), and the ``embed`` dict
Celery adds (callbacks, errbacks, chain, chord). Values come from a seeded
generator, so runs are repeatable and the text compresses about as well as
real records do, not as well as repeated filler would.

``typed=True`` adds a UUID and datetimes (Kombu encodes them as
``{"__type__": ..., "__value__": ...}`` markers); stdlib-json peers such as
kombu-fernet-serializers cannot encode those, so typed bodies are measured
against Kombu json only.
"""

from __future__ import annotations

import datetime
import random
import uuid
from typing import Any

from kombu.utils.json import dumps as kombu_dumps

Body = tuple[list[Any], dict[str, Any], dict[str, Any]]

_WORDS = (
    "gift wrap please",
    "leave at the door",
    "fragile",
    "express",
    "backordered",
    "customer called twice",
    "",
    "",
)
_CITIES = ("Lisbon", "Berlin", "Osaka", "Toronto", "Nairobi", "Lima", "Oslo", "Austin")


def celery_body(size: int, typed: bool = False, seed: int = 7) -> Body:
    """A body whose Kombu json encoding is exactly ``size`` bytes (from 147 B; typed bodies from 315 B)."""
    rng = random.Random(seed)
    args: list[Any] = [rng.randrange(10**6, 10**7), f"order-{rng.getrandbits(32):08x}", 19.99, True]
    kwargs: dict[str, Any] = {"customer_id": rng.randrange(10**5), "note": ""}
    if typed:
        args.append(uuid.UUID(int=rng.getrandbits(128)))
        kwargs["placed_at"] = datetime.datetime(2024, 5, 17, 9, 30, 12, 345000, tzinfo=datetime.timezone.utc)
    embed = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}
    body: Body = (args, kwargs, embed)
    if _size(body) < size - 120:
        kwargs["customer"] = {
            "name": "Ada Lovelace",
            "email": "ada@example.com",
            "address": {"city": rng.choice(_CITIES), "zip": f"{rng.randrange(10**5):05d}", "lines": ["1 Main St", "Apt 4"]},
            "tags": ["vip", "eu"],
            "score": 0.875,
        }
        kwargs["items"] = []
    total, n = _size(body), 0
    while "items" in kwargs:
        item: dict[str, Any] = {
            "sku": f"SKU-{rng.randrange(10**6):06d}",
            "qty": rng.randrange(1, 9),
            "price": round(rng.uniform(1, 500), 2),
            "discount": rng.choice((0, 0, 0.1, 0.25)),
            "note": rng.choice(_WORDS),
            "warehouse": {"id": rng.randrange(100), "city": rng.choice(_CITIES), "bins": [rng.randrange(1000) for _ in range(3)]},
            "in_stock": rng.random() < 0.8,
            "gift": None,
        }
        if typed and n % 4 == 0:
            item["shipped_at"] = datetime.datetime(2024, 5, 18, rng.randrange(24), rng.randrange(60))
        grows_by = len(kombu_dumps(item)) + (2 if n else 0)  # ", " between items
        if total + grows_by > size:
            break
        kwargs["items"].append(item)
        total += grows_by
        n += 1
    missing = size - _size(body)
    if missing < 0:
        raise ValueError(f"the smallest body is {_size(body)} bytes; asked for {size}")
    kwargs["note"] = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz ") for _ in range(missing))
    assert _size(body) == size
    return body


def _size(body: Body) -> int:
    return len(kombu_dumps(body).encode())
