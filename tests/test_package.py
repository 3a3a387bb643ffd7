"""The package surface: what it exports, and what importing it costs."""

from __future__ import annotations

import json
import subprocess
import sys

import model_server


def test_all_is_pinned() -> None:
    assert sorted(model_server.__all__) == sorted(
        [
            "AsyncChatStream",
            "AsyncModelServer",
            "BenchError",
            "ChatStream",
            "ClientError",
            "ConfigError",
            "Fleet",
            "GroupUnavailableError",
            "InvalidRequestError",
            "LaunchError",
            "ModelServer",
            "ModelServerError",
            "RequestRejectedError",
            "ServerSpec",
            "SimError",
            "StreamInterruptedError",
            "UnexpectedAnswerError",
            "UnknownGroupError",
            "__version__",
            "load_fleet",
        ]
    )
    for name in model_server.__all__:
        assert getattr(model_server, name) is not None  # every public name resolves, the client's lazily


def test_every_exception_the_package_defines_is_public_and_drawn_in_the_tree() -> None:
    import model_server.errors as errors

    defined = {name for name, value in vars(errors).items() if isinstance(value, type) and issubclass(value, Exception)}
    assert defined == set(errors.__all__)
    assert defined <= set(model_server.__all__)  # importable from model_server itself
    for name in defined:
        assert name in (errors.__doc__ or ""), name  # the tree in the docstring names every one
        assert issubclass(getattr(errors, name), errors.ModelServerError)


def test_no_module_outside_errors_defines_a_public_model_server_error() -> None:
    import importlib
    import pkgutil

    import model_server.errors as errors

    for info in pkgutil.walk_packages(model_server.__path__, "model_server."):
        if info.name.startswith("model_server.cli") or info.name == "model_server.errors":
            continue
        module = importlib.import_module(info.name)
        for name, value in vars(module).items():
            if isinstance(value, type) and issubclass(value, errors.ModelServerError):
                assert value.__module__ == "model_server.errors", f"{info.name} defines {name}"


def test_import_pulls_in_no_gpu_stack_and_no_http_client() -> None:
    code = (
        "import json, sys, model_server, model_server.config;"
        "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in "
        "('torch', 'sglang', 'flashinfer', 'openai', 'pynvml', 'fastapi', 'uvicorn'))))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert json.loads(out.stdout) == []


def test_client_is_exported_lazily() -> None:
    from model_server.client import AsyncModelServer, ModelServer

    assert model_server.ModelServer is ModelServer
    assert model_server.AsyncModelServer is AsyncModelServer


def test_unknown_attribute_is_an_attribute_error() -> None:
    try:
        model_server.NoSuchThing  # noqa: B018
    except AttributeError as err:
        assert "NoSuchThing" in str(err)
    else:  # pragma: no cover
        raise AssertionError("expected AttributeError")


def test_console_script_shows_every_command() -> None:
    out = subprocess.run([sys.executable, "-m", "model_server", "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0
    for command in ("check", "serve", "status", "sim", "probe", "bench"):
        assert command in out.stdout, command
