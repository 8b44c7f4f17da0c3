"""Selection policies: scores -> kept positions (the [policies] issue fills this package)."""
