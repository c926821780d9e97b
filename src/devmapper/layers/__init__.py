"""Docker-devicemapper-style image and container storage on a thin pool (the graph driver's model).

A base thin device carries an empty filesystem; every image layer is a snapshot of its parent
layer with the layer's tar applied; a container is an ``-init`` snapshot of its image's top layer
plus a read-write snapshot of that.  The on-disk bookkeeping follows Docker's
``/var/lib/docker/devicemapper`` layout so that old Docker directories open here too.
"""
