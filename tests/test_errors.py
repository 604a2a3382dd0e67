"""Every command ends the same way: one line on stderr and a status a script can branch on."""

from __future__ import annotations

import pytest

from mpt_train.errors import ConfigError, RunFailure, run_cli


def _raise(err: BaseException):
    def body() -> int:
        raise err

    return body


@pytest.mark.parametrize(
    "err, status, line",
    [
        (
            ConfigError("optimizer.lr", "got -1"),
            2,
            "error in run spec x.yaml: optimizer.lr: got -1",
        ),
        (
            FileNotFoundError("no such file: a.pt"),
            2,
            "error in run spec x.yaml: no such file: a.pt",
        ),
        (RunFailure("s3://b/ckpt is corrupt"), 1, "run failed: s3://b/ckpt is corrupt"),
        (TimeoutError("bucket unreachable"), 1, "run failed: bucket unreachable"),
        (KeyboardInterrupt(), 130, "interrupted"),
    ],
)
def test_known_errors_end_in_one_line_and_their_status(
    err: BaseException, status: int, line: str, capsys: pytest.CaptureFixture[str]
) -> None:
    got = run_cli(
        _raise(err),
        prefix="error in run spec x.yaml",
        bad_input=(FileNotFoundError,),
        failures=(TimeoutError,),
    )
    assert got == status
    assert capsys.readouterr().err.splitlines() == [line]


def test_the_body_gives_the_status_and_a_bug_keeps_its_traceback() -> None:
    assert run_cli(lambda: None) == 0
    assert run_cli(lambda: 3) == 3
    with pytest.raises(ZeroDivisionError):
        run_cli(lambda: 1 // 0)
