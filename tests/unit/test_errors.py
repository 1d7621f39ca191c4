"""Errors as facts: what a user of the CLI gets for bad input (one `error:` line, exit 1) versus a bug in semalign
(its traceback, exit 4), and what the scoring API may answer (every status semalign's errors carry is in the
OpenAPI contract, with the error body it documents)."""
import os
import subprocess
import sys

import pytest

from semalign.errors import EXIT_FAILED, EXIT_INTERNAL, DamagedFileError, DataValidationError, InvalidInputError


def _cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "semalign.cli", *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **(env or {})})


def test_bad_input_is_one_error_line_and_exit_code_1(tmp_path):
    bad = _cli("ids", "diff", "v1", "v2", "--out", str(tmp_path / "table.txt"), env={"SEMALIGN_HOME": str(tmp_path)})
    assert bad.returncode == EXIT_FAILED == 1, bad.stderr
    assert "error: --out" in bad.stderr and "expected a .csv or .parquet file" in bad.stderr
    assert "Traceback" not in bad.stderr and "internal error" not in bad.stderr


def test_a_bad_setting_names_the_variable(tmp_path):
    bad = _cli("ids", "diff", "v1", "v2", env={"SEMALIGN_HOME": str(tmp_path), "SEMALIGN_SEED": "twelve"})
    assert bad.returncode == 1, bad.stderr
    assert "error: invalid settings: SEMALIGN_SEED='twelve'" in bad.stderr and "Traceback" not in bad.stderr


def test_main_reports_semalign_errors_and_surfaces_anything_else_as_a_bug(monkeypatch, capsys):
    """cli.main over a command that raises: InvalidInputError is the user's (its message, exit 1); a bare
    ValueError or KeyError from inside is semalign's bug: traceback and exit 4, never passed off as bad input."""
    import typer

    import semalign.cli as cli

    raised = {}
    probe = typer.Typer()

    @probe.command()
    def boom():
        raise raised["e"]

    @probe.command()
    def other():  # two commands: typer then takes the command name as an argument
        pass

    monkeypatch.setattr(cli, "app", probe)
    monkeypatch.setattr(sys, "argv", ["semalign", "boom"])
    outcomes = {}
    for name, e in (("input", DataValidationError("items.csv", 3, "item_id", "a non-empty id")),
                    ("value", ValueError("operands could not be broadcast together with shapes (3,) (4,)")),
                    ("key", KeyError("sid_7"))):
        raised["e"] = e
        with pytest.raises(SystemExit) as done:
            cli.main()
        outcomes[name] = (done.value.code, capsys.readouterr().err)
    code, err = outcomes["input"]
    assert code == EXIT_FAILED and "error: items.csv, row 3, column 'item_id': expected a non-empty id" in err
    assert "Traceback" not in err
    for name in ("value", "key"):
        code, err = outcomes[name]
        assert code == EXIT_INTERNAL != EXIT_FAILED, (name, code)
        assert "Traceback" in err and "internal error" in err and "error: " not in err.split("Traceback")[0]
    assert "operands could not be broadcast" in outcomes["value"][1]  # the bug's own text, for its report


def test_the_help_lists_the_internal_error_code():
    out = _cli("--help", env={"COLUMNS": "400"}).stdout
    assert f"{EXIT_INTERNAL} internal error" in out


def test_loaders_of_models_name_the_damaged_file(tmp_path):
    """models/ raises ValueError (it imports nothing of semalign's); where semalign loads its files the refusal
    becomes DamagedFileError with the path, still a ValueError for callers that catch that."""
    from semalign.artifacts import CodebookFolder

    folder = tmp_path / "rqkmeans-abc"
    folder.mkdir()
    with pytest.raises(DamagedFileError, match="no codebook in"):                  # its files are missing
        CodebookFolder(folder).load_codebook()
    (folder / "codebook.json").write_text("{ not json")
    (folder / "codebook.safetensors").write_bytes(b"\0" * 16)
    with pytest.raises(DamagedFileError, match="not valid JSON") as got:            # edited by hand
        CodebookFolder(folder).load_codebook()
    assert got.value.path == str(folder) and str(folder) in str(got.value)
    assert isinstance(got.value, ValueError) and got.value.http_status == 500  # the server's file, not the caller's


def _subclasses(cls):
    for sub in cls.__subclasses__():
        yield sub
        yield from _subclasses(sub)


def test_every_status_semalign_errors_carry_is_in_the_api_contract():
    import semalign.deploy.auth  # noqa: F401  (the modules that define error classes)
    import semalign.deploy.champion  # noqa: F401
    import semalign.deploy.registry  # noqa: F401
    import semalign.deploy.scoring  # noqa: F401
    import semalign.deploy.scoring_service  # noqa: F401
    import semalign.feature_repo.errors  # noqa: F401
    import semalign.flows.errors  # noqa: F401
    from semalign.deploy.api import ERRORS
    from semalign.errors import SemalignError

    statuses = {cls.__name__: cls.http_status for cls in _subclasses(SemalignError)}
    assert len(statuses) >= 20 and statuses["InvalidInputError"] == 422
    assert {name: s for name, s in statuses.items() if s not in ERRORS} == {}
    assert issubclass(DataValidationError, InvalidInputError)
