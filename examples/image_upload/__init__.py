"""The image-upload application rebuilt as decoupled services (see README.md here).

The upload endpoint stores the file and records ``NewImage``; independent services react, each
run by ``eventbus run examples.image_upload.<module>``:

    events.py     the facts: UserLoggedIn, NewImage, ImageResized, FriendsNotified, ImageTweeted
    upload.py     log in, accept an image, record NewImage (its HTTP face: web.py)
    resizer.py    thumbnails in several sizes
    notifier.py   a notification per friend
    points.py     points and badges, a projection
    tweeter.py    a status on the status API
    tables.py, app.py   the plumbing they share (tables, settings, files, setup)
    microblog.py  a stand-in status API; demo.py: ``eventbus demo``
    traces.py     EVENTBUS_EXAMPLE_TRACE=console: the trace of each upload (README.md)
"""

from examples.image_upload.traces import setup_from_env

setup_from_env()  # in every process of the example; nothing unless EVENTBUS_EXAMPLE_TRACE is set
