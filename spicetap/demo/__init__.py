"""`spicetap demo`: a local test VM behind a recording proxy (see cli.py)."""
