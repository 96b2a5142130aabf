"""``profusion-rt serve`` on the command line: options are checked before any model is loaded."""

from __future__ import annotations

import pytest

from profusion_rt.cli import main


@pytest.mark.parametrize("argv, message", [
    (["--max-batch", "0"], "max_batch must be an integer >= 1"),
    (["--backend", "onnxruntime"], "needs --artifacts"),
    (["--port", "70000"], "--port must be 0..65535"),
    (["--max-wait-ms", "-1"], "max_wait_ms must be a positive number"),
    (["--steps-limit", "4", "--default-steps", "8"], "default_steps (8) is above steps_limit (4)"),
])
def test_bad_options_exit_2_with_one_line(argv, message, capsys):
    assert main(["serve", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err


def test_help_lists_the_server_options(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["serve", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for option in ("--artifacts", "--backend", "--host", "--port", "--data", "--max-queue", "--max-batch",
                   "--max-wait-ms", "--timeout-s", "--max-upload-bytes", "--max-pixels", "--steps-limit"):
        assert option in out
