"""``devmapper demo``, the main job: the seed walkthrough and (as root with FUSE) its Docker part."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from devmapper.cli import demo_docker
from devmapper.cli.main import main


def test_demo_runs_the_walkthrough_and_checks_clean(tmp_path: Path) -> None:
    out, err = io.StringIO(), io.StringIO()
    rc = main(["demo", "--dir", str(tmp_path)], out, err)
    text = out.getvalue()
    assert rc == 0, text + err.getvalue()
    assert "ok   base unchanged by the snapshots" in text
    assert "thin_check: exit 0" in text
    why = demo_docker.unavailable()
    if why is not None:
        assert f"skipped: {why}" in text
        pytest.skip(f"the Docker part of the demo {why}")
    assert "/etc/motd: 'layer two was here'; /var/log/old.log present: False" in text
    assert "container 2 sees it: False" in text
    assert " Pool Name: docker-" in text and "reconcile: clean" in text
    assert text.count("thin_check: exit 0") == 2


def test_demo_without_docker_part(tmp_path: Path) -> None:
    out = io.StringIO()
    assert main(["demo", "--no-docker", "--dir", str(tmp_path)], out, io.StringIO()) == 0
    assert "Storage Driver" not in out.getvalue()
