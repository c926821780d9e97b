"""Fixtures for the control-plane tests (see support.py): ``udm``, ``udm_idle``, ``backing`` and ``mgr``."""

from control.support import backing_fixture, mgr_fixture, udm_fixture, udm_idle_fixture

__all__ = ["backing_fixture", "mgr_fixture", "udm_fixture", "udm_idle_fixture"]
