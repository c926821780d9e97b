"""NBD (network block device) export of devmapper devices.

``protocol`` is the sans-IO protocol core (bytes and events only); ``server`` runs it on sockets and
threads against ``devmapper.export.Export`` objects.  Nothing here imports ``thin`` or ``control``.
"""
