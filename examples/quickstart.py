"""Define an event, store it, and let a service react: embedded, no server needed.

python examples/quickstart.py [DATABASE_URL [BROKER_URL]]

On the defaults (a SQLite file, ``memory://``) the relay and the worker run as threads of this
process; with a RabbitMQ URL they would usually be their own processes (``eventbus relay``,
``eventbus run examples.quickstart``).
"""

import sys
import threading
from typing import Annotated

from eventbus import (
    Context,
    Event,
    EventStore,
    Relay,
    Service,
    Worker,
    configure_logging,
    fields,
    upgrade_database,
    validate,
)


class UserLoggedIn(Event):  # type name "user.logged_in", routing key "user.logged_in"
    user_id: Annotated[str, fields.Str(validate=validate.Length(min=1))]
    ip: str = "unknown"


greeter = Service("quickstart")
handled = threading.Event()


@greeter.handles(UserLoggedIn)  # queue "quickstart.greet", bound to "user.logged_in"
def greet(event: UserLoggedIn, ctx: Context) -> None:
    print(f"  {ctx.queue} got {event.type} user={event.user_id} (attempt {ctx.attempt})")
    handled.set()


def main(url: str = "sqlite:///quickstart.db", broker: str = "memory://") -> None:
    configure_logging("WARNING")
    upgrade_database(url)
    store = EventStore(url)
    worker = Worker(greeter, broker_url=broker, store=store).start()
    relay = Relay(store, broker).start()
    try:
        worker.ready.wait(30)
        stream = "user-alice"
        version = store.stream_version(stream)
        stored = store.append(
            stream, [UserLoggedIn(user_id="alice", ip="10.0.0.7")], expected_version=version
        )
        print(f"appended {stored[0].type} as version {stored[0].stream_version} of {stream}")
        for event in store.read_stream(stream):
            print(f"  v{event.stream_version} {event.type} user={event.user_id} ip={event.ip}")
        print(f"store head: position {store.head()}")
        if not handled.wait(30):
            sys.exit("the handler did not receive the event within 30 s")
    finally:
        relay.stop()
        worker.stop()
        store.close()


if __name__ == "__main__":
    main(*sys.argv[1:])
