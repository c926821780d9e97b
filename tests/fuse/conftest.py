"""Fixtures for the FUSE + loop tests (see rig.py): ``rig`` and ``rig_dev_mapper``."""

from fuse.rig import rig_dev_mapper_fixture, rig_fixture

__all__ = ["rig_dev_mapper_fixture", "rig_fixture"]
