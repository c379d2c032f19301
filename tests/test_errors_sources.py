"""Convert sources and model names tried wrong: a revision with a local folder is an error, not ignored (the
user asked for some version and would not get it), in the API and the CLI."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

import dalle2_portable as d2
from dalle2_portable.cli import main


def test_a_revision_with_a_local_folder_is_one_line(models, tmp_path):
    for source in (models["karlo_src"], models["karlo"]):  # a diffusers folder, a model directory
        with pytest.raises(d2.Dalle2Error, match="is a local folder, read as it is; a revision .'v2'. applies to Hub"):
            d2.load_pipeline(source, revision="v2", backend="torch")
    with pytest.raises(d2.Dalle2Error, match="a revision .'main'. applies to Hub repo ids only"):
        d2.convert(models["karlo_src"], tmp_path / "out", revision="main")
    r = CliRunner().invoke(main, ["convert", str(models["clip"]), str(tmp_path / "c"), "--revision", "v1"])
    assert r.exit_code == 2 and len(r.output.strip().splitlines()) == 1 and "--revision in the CLI" in r.output
    assert not (tmp_path / "c").exists() and not (tmp_path / "out").exists()
