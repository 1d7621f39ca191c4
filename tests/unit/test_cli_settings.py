"""Flags a user leaves out leave the environment's settings alone; a flag given wins over the environment."""
from __future__ import annotations

import pytest


@pytest.mark.parametrize("command", ["run", "encode", "experiment"])
@pytest.mark.parametrize("argv,env,expected", [([], "false", False), ([], None, True), (["--images"], "false", True),
                                               (["--no-images"], "true", False)])
def test_images_flag_left_out_keeps_semalign_use_images(command, argv, env, expected, monkeypatch, tmp_path):
    from typer.main import get_command

    from semalign.cli import app
    from semalign.cli.common import load_settings

    if env is None:
        monkeypatch.delenv("SEMALIGN_USE_IMAGES", raising=False)
    else:
        monkeypatch.setenv("SEMALIGN_USE_IMAGES", env)
    cmd = get_command(app).commands[command]
    params = cmd.make_context(command, ["--data", str(tmp_path), *argv]).params
    assert load_settings(tmp_path / "home", None, use_images=params["images"]).use_images is expected
