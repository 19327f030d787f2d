"""A small application for the catalog, AsyncAPI and append tests (types ``catalog.*``).

``OrderPlaced`` is at version 2 with an upcaster from 1. Its personal-data marker, expiry and
priority are set by hand after the class statement, the way eventbus reads them (attributes
``personal_fields``, ``expires_after``, ``priority``), not through the features that define them.
"""

from __future__ import annotations

import datetime as dt
import decimal
import uuid
from dataclasses import dataclass
from typing import Annotated, Any

from eventbus import Context, Event, Projection, Service, fields, validate


@dataclass(frozen=True)
class Personal:
    subject: str
    placeholder: str = "<erased>"


class OrderPlaced(Event, type="catalog.order_placed", version=2):
    """A customer placed an order."""

    order_id: uuid.UUID
    customer_email: Annotated[str, fields.Email()]
    total: Annotated[decimal.Decimal, fields.Decimal(as_string=True, validate=validate.Range(0))]
    placed_at: dt.datetime
    note: str | None = None
    items: list[str] = []  # noqa: RUF012 (an event field with a default, not a class attribute)


@OrderPlaced.upcaster(1)
def _items(payload: dict[str, Any]) -> dict[str, Any]:
    return {**payload, "items": []}


OrderPlaced.personal_fields = {"customer_email": Personal("order_id")}  # type: ignore[attr-defined]
OrderPlaced.expires_after = dt.timedelta(hours=1)  # type: ignore[attr-defined]
OrderPlaced.priority = 5  # type: ignore[attr-defined]


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
