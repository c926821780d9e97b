"""Errors of the control plane: what an ioctl would return, and why.

``DmError`` carries an errno name (``EBUSY``, ``ENXIO``...) like the kernel's return value, and a
reason, the line the kernel would have written to its log (``thin-pool: Invalid block size``).
``udmsetup`` turns the errno into dmsetup's ``device-mapper: <ioctl> ioctl on <name> ... failed:
<strerror>`` line; the reason goes to the daemon's log and, for the user's benefit, to stderr.
``stage`` names the ioctl that failed when one request runs several (create = create, reload,
resume), and ``devno`` the device number it ran on, because dmsetup's message names it then.
``logged`` is False for refusals the kernel does not log (a taken name at create, removing an open
device): udmsetup then prints only dmsetup's own lines.
"""

from __future__ import annotations

from devmapper.errors import DeviceError

__all__ = ["DmError"]


class DmError(DeviceError):
    """An ioctl-level failure of the userspace device-mapper."""

    def __init__(
        self, errno_name: str, reason: str = "", *, stage: str | None = None, devno: tuple[int, int] | None = None,
        logged: bool = True,
    ) -> None:
        super().__init__(reason or errno_name, errno_name)
        self.reason = reason
        self.stage = stage
        self.devno = devno
        self.logged = logged

    def at(self, stage: str, devno: tuple[int, int] | None = None) -> DmError:
        """This error, marked as coming from ``stage`` (unless a deeper stage already said so)."""
        if self.stage is None:
            self.stage = stage
        if self.devno is None:
            self.devno = devno
        return self
