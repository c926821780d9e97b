"""Block devices: the byte stores under metadata and data (file, memory, fault-injecting).

Every device is byte-addressed (``read(offset, length)``, ``write(offset, data)``) with an explicit
``flush()`` that makes earlier writes durable; callers that need 4 KiB metadata blocks do the
arithmetic themselves.  Nothing here knows about metadata formats.
"""

from devmapper.blockdev.base import BlockDevice
from devmapper.blockdev.faulty import FaultyBlockDevice
from devmapper.blockdev.file import FileBlockDevice
from devmapper.blockdev.memory import MemoryBlockDevice

__all__ = ["BlockDevice", "FaultyBlockDevice", "FileBlockDevice", "MemoryBlockDevice"]
