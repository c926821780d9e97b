"""devmapper: userspace device-mapper thin provisioning with kernel-compatible dm-thin metadata."""

__version__ = "0.1.0"
