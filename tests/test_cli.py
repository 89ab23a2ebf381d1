"""Every command's error exit (saejax/cli.py): a known error is one line on stderr and exit
code 2, a wrong positional argument its usage line and 2, SIGTERM 143, anything else a
traceback."""

import pytest

from saejax import cli
from saejax.errors import SIGTERM_EXIT_CODE, ConfigError, Preempted


def _exit(error, capsys, errors=cli.KNOWN_ERRORS):
    def main(argv):
        del argv
        raise error
    with pytest.raises(SystemExit) as exit_info:
        cli._reporting_errors(main, errors, ["prog"])  # pylint: disable=protected-access
    return exit_info.value.code, capsys.readouterr().err


def test_known_errors_are_one_line_and_exit_code_2(capsys):
    for error in (ConfigError("sae.k=0: k must be positive."), FileNotFoundError("no DIR"),
                  FloatingPointError("Non-finite loss between step 1 and step 5")):
        code, err = _exit(error, capsys)
        assert code == cli.ERROR_EXIT_CODE == 2
        assert err == f"error: {error}\n"
    assert _exit(ValueError("bad tokens"), capsys, (*cli.KNOWN_ERRORS, ValueError))[0] == 2
    with pytest.raises(KeyError):  # a bug keeps its traceback
        _exit(KeyError("W_enc"), capsys)


def test_usage_and_sigterm(capsys):
    with pytest.raises(cli.UsageError, match="^usage: python -m saejax.plots DIR$"):
        cli.positional(["prog"], 1, "python -m saejax.plots DIR")
    assert cli.positional(["prog", "a", "b"], 2, "x") == ["a", "b"]
    code, err = _exit(cli.UsageError("usage: python -m saejax.plots DIR"), capsys)
    assert (code, err) == (2, "usage: python -m saejax.plots DIR\n")
    assert _exit(Preempted(100), capsys)[0] == SIGTERM_EXIT_CODE == 143
