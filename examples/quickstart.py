"""Define an event, append it to the store, read it back: on a SQLite file, no server needed.

python examples/quickstart.py [DATABASE_URL]
"""

import sys
from typing import Annotated

from eventbus import Event, EventStore, configure_logging, fields, upgrade_database, validate


class UserLoggedIn(Event):  # type name "user.logged_in"
    user_id: Annotated[str, fields.Str(validate=validate.Length(min=1))]
    ip: str = "unknown"


def main(url: str = "sqlite:///quickstart.db") -> None:
    configure_logging("INFO")
    upgrade_database(url)
    store = EventStore(url)
    stream = "user-alice"
    version = store.stream_version(stream)
    stored = store.append(
        stream, [UserLoggedIn(user_id="alice", ip="10.0.0.7")], expected_version=version
    )
    print(f"appended {stored[0].type} as version {stored[0].stream_version} of {stream}")
    for event in store.read_stream(stream):
        print(f"  v{event.stream_version} {event.type} user={event.user_id} ip={event.ip}")
    print(f"store head: position {store.head()}")
    store.close()


if __name__ == "__main__":
    main(*sys.argv[1:])
