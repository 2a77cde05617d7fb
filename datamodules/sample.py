"""The sample every source yields, and the exception a map-style source raises for a bad one.

A sample is a dict::

    {"image": PIL RGB image | float tensor [3, H, W] in [0, 1],
     "captions": {"alt": str | list[str], "short": ..., "long": ..., ...},  # at least one text
     "id": str}                                                              # unique in the source

plus whatever else a source knows (``objects`` for scenes shards). Map-style sources raise
`CorruptSample` for an item that cannot be read; the batch streams skip it, count it and log it,
so one bad file never stops training.
"""


class CorruptSample(Exception):
    """A sample that cannot be read (image does not decode, no caption). Streams skip it."""
