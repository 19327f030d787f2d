"""Topic patterns and routing keys, matched the way RabbitMQ's topic exchange matches them.

A routing key is dot-separated words (``image.new``); a binding pattern may use ``*`` for exactly
one word and ``#`` for zero or more (``image.*``, ``user.#``, ``#``).
"""

from __future__ import annotations

import functools
import re

from eventbus.errors import HandlerDefinitionError

_WORD = re.compile(r"^[^.*#\s]+$")


def check_pattern(pattern: str) -> str:
    """A valid AMQP topic pattern: dot-separated words, ``*`` and ``#`` only as whole words."""
    if not isinstance(pattern, str) or not pattern or len(pattern.encode()) > 255:
        raise HandlerDefinitionError(
            f"binding pattern {pattern!r} must be a non-empty string of at most 255 bytes"
        )
    for word in pattern.split("."):
        if word not in ("*", "#") and not _WORD.match(word):
            raise HandlerDefinitionError(
                f"binding pattern {pattern!r}: {word!r} is not a word, '*' or '#' "
                "(words are separated by single dots; wildcards stand alone)"
            )
    return pattern


def virtual_patterns(pattern: str) -> set[str]:
    """Patterns that make kombu's virtual topic matching agree with RabbitMQ's for ``pattern``.

    kombu's ``#`` matches one or more words, RabbitMQ's zero or more: ``a.#`` must also match
    ``a``. Binding every variant with some ``#`` words left out closes the difference.
    """
    words = pattern.split(".")
    hashes = [i for i, w in enumerate(words) if w == "#"]
    variants = {pattern}
    for mask in range(1, 2 ** len(hashes)):
        drop = {hashes[b] for b in range(len(hashes)) if mask >> b & 1}
        kept = [w for i, w in enumerate(words) if i not in drop]
        if kept:
            variants.add(".".join(kept))
    return variants


@functools.lru_cache(maxsize=4096)
def topic_matches(pattern: str, routing_key: str) -> bool:
    """RabbitMQ's topic matching: ``*`` is one word, ``#`` zero or more (``a.#`` matches ``a``)."""
    words, keys = pattern.split("."), routing_key.split(".")

    @functools.cache
    def match(i: int, j: int) -> bool:
        if i == len(words):
            return j == len(keys)
        if words[i] == "#":
            return match(i + 1, j) or (j < len(keys) and match(i, j + 1))
        if j == len(keys):
            return False
        return words[i] in ("*", keys[j]) and match(i + 1, j + 1)

    return match(0, 0)


def topic_matches_any(patterns: list[str], routing_key: str) -> bool:
    """Whether any of ``patterns`` matches ``routing_key``."""
    return any(topic_matches(p, routing_key) for p in patterns)
