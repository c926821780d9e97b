"""The userspace device-mapper: mapped devices, tables and targets, a daemon and its protocol.

This package plays the kernel's part for ``udmsetup``, the way ``dm-ioctl.c``, ``dm-table.c`` and the
target modules do for ``dmsetup``:

* ``table.py`` -- table lines as dmsetup reads and prints them;
* ``lower.py`` -- the devices a table names (files, block devices, our own mapped devices);
* ``targets/`` -- linear, striped, zero, error, thin-pool and thin;
* ``pools.py`` -- running pools, shared by the tables that name their metadata device;
* ``device.py`` -- a mapped device: live and inactive tables, the I/O gate, open counts, events;
  it implements ``devmapper.export.Export`` for the NBD and FUSE exports;
* ``manager.py`` -- the ioctls (create, load, resume, suspend, remove, message, status...) and the
  restore of saved devices; ``state.py`` saves them atomically; ``autoextend.py`` grows pools;
* ``protocol.py`` (sans-IO framing), ``api.py`` (requests to manager calls), ``server.py`` (the
  daemon), ``client.py`` and ``endpoint.py`` -- the control socket;
* ``report.py`` -- dmsetup's output formats (info, ls, deps, tree, columns, error lines).

Layering: imports ``thin`` and below; never prints, exits or reads the environment -- the CLI hands
in the runtime and state directories.
"""
