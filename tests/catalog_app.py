"""A small application for the catalog, AsyncAPI and append tests (types ``catalog.*``).

``OrderPlaced`` is at version 2 with an upcaster from 1, expires after an hour, has priority 5
and a personal-data field.
"""

from __future__ import annotations

import datetime as dt
import decimal
import uuid
from typing import Annotated, Any

from eventbus import Context, Event, Projection, Service, fields, personal, validate


class OrderPlaced(
    Event, type="catalog.order_placed", version=2, expires_after=dt.timedelta(hours=1), priority=5
):
    """A customer placed an order."""

    order_id: uuid.UUID
    customer_email: Annotated[str, fields.Email(), personal("order_id", placeholder="<erased>")]
    total: Annotated[decimal.Decimal, fields.Decimal(as_string=True, validate=validate.Range(0))]
    placed_at: dt.datetime
    note: str | None = None
    items: list[str] = []  # noqa: RUF012 (an event field with a default, not a class attribute)


@OrderPlaced.upcaster(1)
def _items(payload: dict[str, Any]) -> dict[str, Any]:
    return {**payload, "items": []}


class OrderShipped(Event, type="catalog.order_shipped", routing_key="catalog.shipping.done"):
    order_id: uuid.UUID
    carrier: Annotated[str, fields.Str(validate=validate.OneOf(["post", "courier"]))]
    parcels: Annotated[int, fields.Int(strict=True, validate=validate.Range(min=1, max=20))] = 1


shop = Service("catalog_shop", max_attempts=3)


@shop.handles(OrderPlaced)
def confirm(event: OrderPlaced) -> None:
    pass


@shop.handles("catalog.shipping.*", name="shipping_audit", partitions=4)
def audit(event: Event) -> None:
    pass


totals = Projection("catalog_totals")


@totals.handles(OrderPlaced)
def add(event: OrderPlaced, ctx: Context) -> None:
    pass
