"""Mapped devices as files on a FUSE mount (``vfs`` is pure, ``adapter`` binds it to libfuse3 via mfusepy)."""
