"""Persistent data: block manager, transaction manager, space maps and B-trees.

Mirrors the kernel's ``drivers/md/persistent-data``: nothing here knows about thin provisioning.
"""
