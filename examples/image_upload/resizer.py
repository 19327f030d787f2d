"""Resizer: every new image gets a thumbnail in each size.

A thumbnail file is written before the transaction that records it commits, so after a crash it
may be written again: its path depends only on the image and the size, and it is replaced
whole, so writing it twice leaves one file. Its row and ``ImageResized`` commit once.
``catch_up``: on its first start the resizer also makes the thumbnails of earlier uploads.
"""

from __future__ import annotations

from PIL import Image, ImageOps

from eventbus import Context, Service
from examples.image_upload.app import media_path, save_image
from examples.image_upload.events import ImageResized, NewImage, image_stream
from examples.image_upload.tables import thumbnails

SIZES = (64, 128, 256)  # the longest side, in pixels

resizer = Service("resizer", catch_up=True)


@resizer.handles(NewImage)
def make_thumbnails(event: NewImage, ctx: Context) -> None:
    paths = []
    with Image.open(media_path(event.path)) as original:
        upright = ImageOps.exif_transpose(original)  # photos taken sideways
        for size in SIZES:
            thumbnail = upright.copy()
            thumbnail.thumbnail((size, size))  # fits it in size x size, keeps the aspect ratio
            path = f"thumbnails/{event.image_id}/{size}.png"
            if not ctx.dry_run:
                save_image(thumbnail, path)
            width, height = thumbnail.size
            ctx.connection.execute(
                thumbnails.insert().values(
                    image_id=event.image_id, size=size, path=path, width=width, height=height
                )
            )
            paths.append(path)
    done = ImageResized(image_id=event.image_id, sizes=SIZES, thumbnails=paths)
    ctx.append(image_stream(event.image_id), [done])
