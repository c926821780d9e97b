"""Thin provisioning: pool metadata (mirrors dm-thin-metadata.c), checking, dump and restore."""
