"""Target types, registered by name as the kernel's ``dm_register_target`` does.

``TARGET_TYPES`` lists them in the order ``dmsetup targets`` prints (the kernel keeps its list
newest-registered first).
"""

from __future__ import annotations

from devmapper.control.targets.base import Target, TargetContext
from devmapper.control.targets.linear import LinearTarget
from devmapper.control.targets.simple import ErrorTarget, ZeroTarget
from devmapper.control.targets.striped import StripedTarget
from devmapper.control.targets.thin import PoolTarget, ThinTarget

__all__ = ["TARGET_TYPES", "Target", "TargetContext", "target_type"]

TARGET_TYPES: tuple[type[Target], ...] = (PoolTarget, ThinTarget, ZeroTarget, StripedTarget, LinearTarget, ErrorTarget)
_BY_NAME = {t.type_name: t for t in TARGET_TYPES}


def target_type(name: str) -> type[Target] | None:
    return _BY_NAME.get(name)
