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


def _serve_args(argv):
    from profusion_rt.cli import build_parser

    return build_parser().parse_args(["serve", *argv])


def test_options_are_derived_from_serve_config():
    """No option repeats a default: `serve` without options gives ServeConfig(); each option sets its field."""
    import dataclasses

    from profusion_rt.serve.config import ServeConfig, config_from_args

    assert config_from_args(_serve_args([])) == ServeConfig()
    args = _serve_args(["--data", "d", "--max-queue", "7", "--max-wait-ms", "2.5", "--steps-limit", "20",
                        "--customize-augmentations", "0", "--subject-cache", "9", "--no-customize"])
    config = config_from_args(args)
    assert (str(config.data_dir), config.max_queue, config.max_wait_ms, config.steps_limit) == ("d", 7, 2.5, 20)
    assert config.default_steps == 20  # unset: follows --steps-limit
    assert config.customize_augmentations == 0 and config.subject_cache == 9 and config.allow_customize is False
    assert config_from_args(_serve_args(["--steps-limit", "20", "--default-steps", "5"])).default_steps == 5
    with_options = [f.name for f in dataclasses.fields(ServeConfig) if "cli" in f.metadata]
    assert set(with_options) >= {"max_queue", "max_batch", "timeout_s", "max_upload_bytes", "max_delta_bytes",
                                 "max_pixels", "steps_limit", "warmup_steps", "api_keys_file", "metrics_need_key"}
    parsed = vars(_serve_args([]))
    assert all(name in parsed for name in with_options)


def test_help_shows_defaults_from_the_config(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "400")  # no line wrapping inside an option name
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    for text in ("--max-queue MAX_QUEUE", "--data DATA ", "(default 32)", "(default 10 MiB)", "(default: --steps-limit)",
                 "--api-keys-file", "--metrics-need-key", "--no-customize", "--precision"):
        assert text in out, text
