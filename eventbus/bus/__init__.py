import eventbus.logging  # noqa: F401  (eventbus logs through stdlib logging unless configured)
