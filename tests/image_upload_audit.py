"""A service added to the image-upload example later, without a change to its modules: an audit
log of uploads. tests/test_image_upload.py runs it as ``eventbus run tests.image_upload_audit``
after images were uploaded; ``catch_up=True`` brings it the past uploads from the store first.

``python -m tests.image_upload_audit`` creates its table (its own release step). The table has no
unique key, so an upload recorded twice would show.
"""

from __future__ import annotations

import sqlalchemy as sa

from eventbus import Context, Service, Settings
from examples.image_upload.events import NewImage

metadata = sa.MetaData()
upload_audit = sa.Table(
    "upload_audit",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("event_id", sa.String(36), nullable=False),
    sa.Column("image_id", sa.String(32), nullable=False),
    sa.Column("user_id", sa.String(64), nullable=False),
    sa.Column("replayed", sa.Boolean, nullable=False),  # fed from the store, not a live message
)

audit = Service("upload-audit", catch_up=True)


@audit.handles(NewImage)
def record(event: NewImage, ctx: Context) -> None:
    ctx.connection.execute(
        upload_audit.insert().values(
            event_id=str(event.event_id),
            image_id=event.image_id,
            user_id=event.user_id,
            replayed=ctx.replaying,
        )
    )


if __name__ == "__main__":
    engine = sa.create_engine(Settings.from_env().database_url)
    metadata.create_all(engine)
    engine.dispose()
