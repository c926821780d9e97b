"""On-disk formats of dm-thin metadata: bytes in, records out, and back.

Nothing here does I/O.  Every record has its pack and unpack side by side, fields in disk order with
their offsets; ``struct.error`` and friends are turned into ``MetadataError`` at this boundary.
"""
