"""Events: schema-defined, immutable, versioned facts (the codec: ``eventbus.events.codec``).

Constructing an event validates it (``EventValidationError`` otherwise), so no invalid event
exists; instances are immutable and carry the envelope; type names are stable and unique; older
schema versions are upcast before validation. Encoding is JSON, never pickle.

Details: ``docs/events.md``.
"""

from __future__ import annotations

import copy
import datetime as dt
import decimal
import inspect
import re
import types
import typing
import uuid
from collections.abc import Callable, Mapping
from typing import Annotated, Any, ClassVar, TypeVar

import marshmallow
from marshmallow import fields

from eventbus.errors import (
    EventDefinitionError,
    EventValidationError,
    UnknownEventType,
)
from eventbus.events import personal
from eventbus.events.fastdump import Dumper, compile_dumper
from eventbus.events.fastload import Loader, compile_loader
from eventbus.events.ids import new_event_id
from eventbus.events.values import refusals

__all__ = ["Event", "Upcaster", "event_class", "registered_types"]

Upcaster = Callable[[dict[str, Any]], dict[str, Any]]
"""Turns the JSON payload of version N into the payload of version N + 1."""

E = TypeVar("E", bound="Event")
U = TypeVar("U", bound=Upcaster)

ENVELOPE_FIELDS = (
    "event_id",
    "occurred_at",
    "correlation_id",
    "causation_id",
    "stream_id",
    "stream_version",
    "position",
)
_RESERVED = frozenset(
    {*ENVELOPE_FIELDS, "type", "schema_version", "routing_key", "payload", "personal_fields"}
)
# Words of letters, digits, '_' and '-', joined by dots: valid as a type name and as an AMQP
# routing key (no '*' or '#', which are binding wildcards).
_NAME = re.compile(r"^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*$")
_CAMEL_WORD = re.compile(r"[A-Z]+(?![a-z])|[A-Z]?[a-z0-9]+")

_registry: dict[str, type[Event]] = {}


def _default_type_name(class_name: str) -> str:
    """``UserLoggedIn`` -> ``user.logged_in``: the first word, then the rest in snake case."""
    words = [w.lower() for w in _CAMEL_WORD.findall(class_name)] or [class_name.lower()]
    return words[0] if len(words) == 1 else f"{words[0]}.{'_'.join(words[1:])}"


def _infer_field(annotation: Any, owner: str, name: str) -> fields.Field[Any]:
    """A marshmallow field for a plain annotation (``str``, ``list[int]``, ``X | None``, ...)."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is Annotated:
        declared = next((a for a in args[1:] if isinstance(a, fields.Field)), None)
        if declared is not None:
            return copy.deepcopy(declared)
        return _infer_field(args[0], owner, name)
    if origin in (typing.Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        if len(rest) == 1:
            inner = _infer_field(rest[0], owner, name)
            inner.allow_none = True
            if inner.load_default is marshmallow.missing:
                inner.load_default = None
            return inner
    if origin is list and len(args) == 1:
        return fields.List(_infer_field(args[0], owner, name))
    if origin is dict and len(args) == 2:
        return fields.Dict(
            keys=_infer_field(args[0], owner, name), values=_infer_field(args[1], owner, name)
        )
    simple: dict[Any, Callable[[], fields.Field[Any]]] = {
        str: fields.String,
        int: lambda: fields.Integer(strict=True),
        float: fields.Float,
        bool: fields.Boolean,
        dt.datetime: fields.AwareDateTime,
        dt.date: fields.Date,
        uuid.UUID: fields.UUID,
        decimal.Decimal: lambda: fields.Decimal(as_string=True),
        dict: fields.Dict,
        list: lambda: fields.List(fields.Raw()),
    }
    if annotation in simple:
        return simple[annotation]()
    raise EventDefinitionError(
        f"{owner}.{name}: cannot infer a marshmallow field for {annotation!r}; "
        f"declare it as Annotated[T, fields.X(...)]"
    )


def _collect_fields(cls: type[Event]) -> dict[str, fields.Field[Any]]:
    declared: dict[str, fields.Field[Any]] = {}
    for base in reversed(cls.__mro__[1:]):
        if issubclass(base, Event) and base is not Event:
            declared.update(copy.deepcopy(base._fields))
    annotations = inspect.get_annotations(cls, eval_str=True)
    for name, annotation in annotations.items():
        if typing.get_origin(annotation) is ClassVar or annotation is ClassVar:  # type: ignore[comparison-overlap]
            continue
        field = _infer_field(annotation, cls.__name__, name)
        if name in cls.__dict__ and not isinstance(cls.__dict__[name], fields.Field):
            default = cls.__dict__[name]
            field.load_default = (
                (lambda d=default: copy.deepcopy(d)) if _mutable(default) else default
            )
        declared[name] = field
    for name, value in list(cls.__dict__.items()):
        if isinstance(value, fields.Field) and name not in annotations:
            declared[name] = copy.deepcopy(value)  # classic marshmallow style: name = fields.X()
            delattr(cls, name)
    for name, field in declared.items():
        if name in _RESERVED or name.startswith("_"):
            raise EventDefinitionError(
                f"{cls.__name__}: field name {name!r} is reserved for the envelope or internals"
            )
        # A field is required unless it has a default, like a dataclass field.
        field.required = field.load_default is marshmallow.missing
    return declared


def _mutable(value: object) -> bool:
    return isinstance(value, list | dict | set)


class Event:
    """Base class of every event type; subclass it and declare fields (see the module doc).

    Class keywords: ``type`` (stable name, default derived from the class name:
    ``UserLoggedIn`` -> ``user.logged_in``), ``version`` (the current ``schema_version``,
    default 1), ``routing_key`` (default: the type name), ``abstract`` (a base for other event
    classes, not registered and not constructible); delivery: ``expires_after`` (a timedelta or
    seconds: how long its messages stay useful) and ``priority`` (0 to 255); docs/delivery.md.
    """

    type: ClassVar[str] = ""
    schema_version: ClassVar[int] = 0
    routing_key: ClassVar[str] = ""
    expires_after: ClassVar[dt.timedelta | None] = None
    priority: ClassVar[int | None] = None
    # (expires_after, priority) as declared: what the store reads (a field may take either name)
    _delivery: ClassVar[tuple[dt.timedelta | None, int | None]] = (None, None)
    _fields: ClassVar[dict[str, fields.Field[Any]]] = {}
    _schema: ClassVar[marshmallow.Schema]
    _fast_load: ClassVar[Loader | None] = None
    _fast_dump: ClassVar[Dumper | None] = None
    _naive_ok: ClassVar[bool] = True  # a field that may load a naive datetime
    _upcasters: ClassVar[dict[int, Upcaster]]
    _abstract: ClassVar[bool] = True
    personal_fields: ClassVar[Mapping[str, personal.Personal]] = types.MappingProxyType({})
    """Field name -> its ``personal(...)`` mark (``eventbus.events.personal``)."""

    event_id: uuid.UUID
    occurred_at: dt.datetime
    correlation_id: str
    causation_id: str | None
    stream_id: str | None
    stream_version: int | None
    position: int | None

    def __init_subclass__(
        cls,
        *,
        type: str | None = None,
        version: int = 1,
        routing_key: str | None = None,
        abstract: bool = False,
        expires_after: dt.timedelta | float | None = None,
        priority: int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init_subclass__(**kwargs)
        cls._fields = _collect_fields(cls)
        cls._schema = marshmallow.Schema.from_dict(cls._fields, name=f"{cls.__name__}Schema")()
        cls._fast_load = compile_loader(cls._fields)
        cls._fast_dump = compile_dumper(cls._schema)
        cls._naive_ok = any(
            f.__class__ in (fields.DateTime, fields.NaiveDateTime, fields.Raw)
            for f in cls._fields.values()
        )
        cls._upcasters = {}
        cls._abstract = abstract
        _delivery_options(cls, expires_after, priority)
        found = personal.collect(cls, inspect.get_annotations(cls, eval_str=True))
        cls.personal_fields = types.MappingProxyType(found)
        if abstract:
            return
        name = type if type is not None else _default_type_name(cls.__name__)
        key = routing_key if routing_key is not None else name
        for label, value in (("type", name), ("routing_key", key)):
            if not _NAME.match(value) or len(value) > 255:
                raise EventDefinitionError(
                    f"{cls.__name__}: {label} {value!r} must be dot-separated words of letters, "
                    "digits, '_' or '-' (at most 255 characters)"
                )
        if not isinstance(version, int) or isinstance(version, bool) or version < 1:
            raise EventDefinitionError(
                f"{cls.__name__}: version must be an int >= 1, not {version!r}"
            )
        taken = _registry.get(name)
        if taken is not None and not _same_definition(taken, cls):
            raise EventDefinitionError(
                f"{cls.__name__}: event type {name!r} is already taken by "
                f"{taken.__module__}.{taken.__qualname__}"
            )
        cls.type, cls.schema_version, cls.routing_key = name, version, key
        _registry[name] = cls

    def __init__(
        self,
        *,
        event_id: uuid.UUID | str | None = None,
        occurred_at: dt.datetime | None = None,
        correlation_id: uuid.UUID | str | None = None,
        causation_id: uuid.UUID | str | None = None,
        **payload: Any,
    ) -> None:
        cls = self.__class__
        if cls._abstract:
            raise TypeError(f"{cls.__name__} is abstract; construct one of its event subclasses")
        errors: dict[str, Any] = {}
        values = _load(cls, payload, errors)
        if not errors:  # what validates must also be what the store and the wire carry
            errors.update(refusals(dump_payload(cls, values)))
        if cls.personal_fields and not errors:
            errors.update(personal.subject_problems(cls, values))
        envelope = _envelope(event_id, occurred_at, correlation_id, causation_id, errors)
        if errors:
            raise EventValidationError(cls._label(), personal.scrub(cls, payload, errors))
        _fill(self, values, envelope)

    # -- value semantics -------------------------------------------------------------------

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"{self.__class__.__name__} is immutable; cannot set {name!r}")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"{self.__class__.__name__} is immutable; cannot delete {name!r}")

    def __eq__(self, other: object) -> bool:
        return other.__class__ is self.__class__ and other.__dict__ == self.__dict__

    def __hash__(self) -> int:
        return hash(self.event_id)

    def __repr__(self) -> str:
        shown = {**self.payload, "event_id": self.event_id}
        shown.update(dict.fromkeys(self.personal_fields, personal.HIDDEN))  # never in a log
        if self.position is not None:
            shown["position"] = self.position
        args = ", ".join(f"{k}={v!r}" for k, v in shown.items())
        return f"{self.__class__.__name__}({args})"

    @property
    def payload(self) -> dict[str, Any]:
        """The event's own fields (not the envelope) as Python values."""
        return {name: self.__dict__[name] for name in self._fields}

    @property
    def envelope(self) -> dict[str, Any]:
        """The metadata every event carries: ids, time, type, version and stored position."""
        env = {name: self.__dict__[name] for name in ENVELOPE_FIELDS}
        env.update(type=self.type, schema_version=self.schema_version)
        return env

    def stored(self: E, stream_id: str, stream_version: int, position: int | None) -> E:
        """A copy of this event with its place in the store filled in."""
        clone = object.__new__(self.__class__)
        clone.__dict__.update(
            self.__dict__, stream_id=stream_id, stream_version=stream_version, position=position
        )
        return clone

    def caused_by(self: E, cause: Event) -> E:
        """A copy of this event recorded as a consequence of ``cause``.

        ``causation_id`` becomes the cause's event id and ``correlation_id`` the cause's
        correlation id (unless this event was given one of its own).
        """
        clone = object.__new__(self.__class__)
        clone.__dict__.update(self.__dict__, causation_id=str(cause.event_id))
        if self.correlation_id == str(self.event_id):  # the default: its own id
            clone.__dict__["correlation_id"] = cause.correlation_id
        return clone

    # -- versions --------------------------------------------------------------------------

    @classmethod
    def upcaster(cls, from_version: int) -> Callable[[U], U]:
        """Register a function that turns a version ``from_version`` payload into the next one.

        The function takes and returns the JSON payload (a dict). Chains run one step at a time
        up to the current ``version``.
        """

        def register(fn: U) -> U:
            if not 1 <= from_version < cls.schema_version:
                raise EventDefinitionError(
                    f"{cls._label()}: an upcaster from version {from_version} makes no sense "
                    f"when the current version is {cls.schema_version}"
                )
            if from_version in cls._upcasters:
                raise EventDefinitionError(
                    f"{cls._label()}: an upcaster from version {from_version} is already registered"
                )
            cls._upcasters[from_version] = fn
            return fn

        return register

    @classmethod
    def _label(cls) -> str:
        return f"{cls.__name__} ({cls.type})" if cls.type else cls.__name__


def _delivery_options(
    cls: type[Event], expires_after: dt.timedelta | float | None, priority: int | None
) -> None:
    """Check and set the class's ``expires_after`` and ``priority`` (inherited unless given).

    A field of either name keeps it on instances; the class's setting is then in ``_delivery``.
    """
    inherited_expiry, inherited_priority = cls._delivery
    if expires_after is not None:
        if isinstance(expires_after, int | float) and not isinstance(expires_after, bool):
            expires_after = dt.timedelta(seconds=expires_after)
        if not isinstance(expires_after, dt.timedelta) or not (
            dt.timedelta(milliseconds=1) <= expires_after <= MAX_EXPIRES_AFTER
        ):
            raise EventDefinitionError(
                f"{cls.__name__}: expires_after must be a timedelta or seconds from 1 ms to "
                f"{MAX_EXPIRATION_MS} ms (about 49.7 days: RabbitMQ's ceiling for a message's "
                f"expiration), not {expires_after!r}"
            )
    if priority is not None:
        check_priority(priority, f"{cls.__name__}: priority")
    expiry = inherited_expiry if expires_after is None else expires_after
    chosen = inherited_priority if priority is None else priority
    cls._delivery = (expiry, chosen)
    if "expires_after" not in cls._fields:
        cls.expires_after = expiry
    if "priority" not in cls._fields:
        cls.priority = chosen


MAX_EXPIRATION_MS = 4_294_967_295  # RabbitMQ refuses a longer per-message expiration (406)
MAX_EXPIRES_AFTER = dt.timedelta(milliseconds=MAX_EXPIRATION_MS)
MAX_PRIORITY = 255  # AMQP's priority is an octet; RabbitMQ queues take x-max-priority 1 to 255


def check_priority(priority: object, what: str) -> int:
    """``priority`` if it is an int from 0 to 255; ``EventDefinitionError`` naming ``what``."""
    if not isinstance(priority, int) or isinstance(priority, bool):
        raise EventDefinitionError(f"{what} must be an integer from 0 to 255, not {priority!r}")
    if not 0 <= priority <= MAX_PRIORITY:
        raise EventDefinitionError(f"{what} must be an integer from 0 to 255, not {priority!r}")
    return priority


def _same_definition(a: type[Event], b: type[Event]) -> bool:
    # Re-executing the same module (importlib.reload, a script run twice) redefines the same class.
    return (a.__module__, a.__qualname__) == (b.__module__, b.__qualname__)


def dump_payload(cls: type[Event], values: Mapping[str, Any]) -> dict[str, Any]:
    """``cls``'s schema's dump of these field values (``fastdump`` when it applies)."""
    if cls._fast_dump is not None:
        return cls._fast_dump(values)
    dumped: dict[str, Any] = cls._schema.dump(values)
    return dumped


def _load(cls: type[Event], data: Mapping[str, Any], errors: dict[str, Any]) -> dict[str, Any]:
    fast = cls._fast_load(data) if cls._fast_load is not None else None
    if fast is not None:  # aware datetimes checked already, unless a field may be naive
        return _aware(fast, errors) if cls._naive_ok else fast
    try:
        values: dict[str, Any] = cls._schema.load(data)
    except marshmallow.ValidationError as exc:
        messages = exc.messages if isinstance(exc.messages, dict) else {"_schema": exc.messages}
        errors.update(messages)
        return {}
    return _aware(values, errors)


def _aware(values: dict[str, Any], errors: dict[str, Any]) -> dict[str, Any]:
    for name, value in values.items():
        if isinstance(value, dt.datetime) and value.tzinfo is None:
            errors[name] = ["Naive datetime; give an aware datetime (UTC)."]
    return values


def _envelope(
    event_id: uuid.UUID | str | None,
    occurred_at: dt.datetime | None,
    correlation_id: uuid.UUID | str | None,
    causation_id: uuid.UUID | str | None,
    errors: dict[str, Any],
) -> dict[str, Any]:
    env: dict[str, Any] = {"stream_id": None, "stream_version": None, "position": None}
    if event_id is None:
        env["event_id"] = new_event_id()
    elif isinstance(event_id, uuid.UUID):
        env["event_id"] = event_id
    else:
        try:
            env["event_id"] = uuid.UUID(str(event_id))
        except ValueError:
            errors["event_id"] = ["Not a valid UUID."]
    if occurred_at is None:
        env["occurred_at"] = dt.datetime.now(dt.UTC)
    elif not isinstance(occurred_at, dt.datetime):
        errors["occurred_at"] = ["Not a datetime."]
    elif occurred_at.tzinfo is None or occurred_at.utcoffset() is None:
        errors["occurred_at"] = ["Naive datetime; give an aware datetime (UTC)."]
    elif occurred_at.tzinfo is dt.UTC:
        env["occurred_at"] = occurred_at
    else:
        env["occurred_at"] = occurred_at.astimezone(dt.UTC)
    for name, value in (("correlation_id", correlation_id), ("causation_id", causation_id)):
        if value is None or isinstance(value, uuid.UUID):
            env[name] = None if value is None else str(value)
        elif isinstance(value, str) and 0 < len(value) <= 255:
            env[name] = value
        else:
            errors[name] = ["Not a string of 1 to 255 characters or a UUID."]
    if env["correlation_id"] is None and "event_id" in env:
        env["correlation_id"] = str(env["event_id"])  # a root event starts its own correlation
    return env


def _fill(event: Event, values: Mapping[str, Any], envelope: Mapping[str, Any]) -> None:
    d = event.__dict__
    d.update(values)
    for name in event._fields:
        d.setdefault(name, None)
    d.update(envelope)


# -- registry -------------------------------------------------------------------------------


def event_class(type_name: str) -> type[Event]:
    """The ``Event`` subclass registered under ``type_name``; ``UnknownEventType`` if none."""
    try:
        return _registry[type_name]
    except KeyError:
        raise UnknownEventType(type_name) from None


def registered_types() -> dict[str, type[Event]]:
    """A copy of the registry: type name -> event class."""
    return dict(_registry)
