"""SGLang 0.5.23's own protocol models, run in the SGLang environment (not a test module).

tests/test_sim_conformance.py runs this file with the interpreter of a
separate environment that has ``sglang==0.5.23`` installed without its
dependencies (plus pydantic, msgspec and openai, which its protocol module
imports). It reads ``{"checks": [{"kind": ..., "doc": ...}, ...]}`` on stdin
and writes one result per check on stdout: ``{"ok": true, "dump": ...}`` with
SGLang's own serialization of the validated document, or ``{"ok": false,
"error": ...}``.

``sglang/__init__.py`` imports torch, so the package is not imported: its
modules are loaded from the installed files under stub parent packages, and
the one helper protocol.py takes from ``sglang.utils`` is compiled from that
file's own source. Plain-dict answers (model_info, the /v1/loads snapshot)
are checked against the keys read from SGLang's source by ``ast``.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import sys
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any


def _sglang_dir() -> Path:
    spec = importlib.util.find_spec("sglang")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("sglang is not installed in this environment (pip install --no-deps sglang==0.5.23)")
    return Path(next(iter(spec.submodule_search_locations)))


ROOT = _sglang_dir()


def _stub_package(name: str, path: Path) -> None:
    module = types.ModuleType(name)
    module.__path__ = [str(path)]
    sys.modules[name] = module


def _function_from_source(path: Path, name: str, namespace: dict) -> Callable:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    node = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == name)
    exec(compile(ast.Module(body=[node], type_ignores=[]), str(path), "exec"), namespace)
    return namespace[name]


def _load() -> dict[str, Any]:
    _stub_package("sglang", ROOT)
    _stub_package("sglang.srt", ROOT / "srt")
    _stub_package("sglang.srt.entrypoints", ROOT / "srt" / "entrypoints")
    _stub_package("sglang.srt.entrypoints.openai", ROOT / "srt" / "entrypoints" / "openai")
    from pydantic import BaseModel

    utils = types.ModuleType("sglang.utils")
    utils.convert_json_schema_to_str = _function_from_source(  # type: ignore[attr-defined]
        ROOT / "utils.py", "convert_json_schema_to_str", {"json": json, "BaseModel": BaseModel, **_typing()}
    )
    sys.modules["sglang.utils"] = utils
    from sglang.srt.entrypoints.openai import protocol, sse_utils

    return {"protocol": protocol, "sse": sse_utils}


def _typing() -> dict:
    import typing

    return {name: getattr(typing, name) for name in ("Any", "Dict", "List", "Optional", "Type", "Union")}


def _dict_keys(path: Path, function: str, variable: str) -> list[str]:
    """The keys of the dict literal assigned to `variable` in `function` of a source file."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.AsyncFunctionDef | ast.FunctionDef) and node.name == function:
            for sub in ast.walk(node):
                if (
                    isinstance(sub, ast.Assign)
                    and any(isinstance(t, ast.Name) and t.id == variable for t in sub.targets)
                    and isinstance(sub.value, ast.Dict)
                ):
                    return [k.value for k in sub.value.keys if isinstance(k, ast.Constant)]
    raise LookupError(f"{function}.{variable} not found in {path}")


def _struct_fields(path: Path, cls: str) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    node = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == cls)
    return [s.target.id for s in node.body if isinstance(s, ast.AnnAssign) and isinstance(s.target, ast.Name)]


def checkers(m: dict[str, Any]) -> dict[str, Callable[[Any], Any]]:
    """kind -> a function that validates a document with SGLang's model and returns SGLang's dump of it."""
    import msgspec

    p = m["protocol"]
    sse = m["sse"]

    def pydantic(model: Any, **dump: Any) -> Callable[[Any], Any]:
        return lambda doc: json.loads(model.model_validate(doc).model_dump_json(by_alias=True, **dump))

    def struct(kind: Any) -> Callable[[Any], Any]:
        return lambda doc: msgspec.to_builtins(msgspec.convert(doc, kind))

    def key_set(keys: list[str]) -> Callable[[Any], Any]:
        return lambda doc: sorted(keys)

    return {
        # requests: what the sim accepts, SGLang accepts
        "chat.request": pydantic(p.ChatCompletionRequest, exclude_unset=True),
        "completion.request": pydantic(p.CompletionRequest, exclude_unset=True),
        "embedding.request": pydantic(p.EmbeddingRequest, exclude_unset=True),
        # answers, each with the serializer SGLang uses for it
        "chat.response": pydantic(p.ChatCompletionResponse),  # model_json_response: model_dump_json(by_alias=True)
        "chat.chunk": struct(sse.StreamChunk),  # build_sse_content: msgspec, omit_defaults
        "chat.chunk.pydantic": pydantic(p.ChatCompletionStreamResponse),  # tool calls, the usage chunk
        "completion.response": pydantic(p.CompletionResponse),
        "completion.chunk": pydantic(p.CompletionStreamResponse),
        "completion.usage_chunk": pydantic(p.CompletionStreamResponse, exclude_none=True),
        "embedding.response": pydantic(p.EmbeddingResponse),
        "error": pydantic(p.ErrorResponse),
        "models": pydantic(p.ModelList),
        "model": pydantic(p.ModelCard),
        "tokenize": pydantic(p.TokenizeResponse),
        "detokenize": pydantic(p.DetokenizeResponse),
        # plain dicts: the keys SGLang's source builds
        "model_info.keys": key_set(_dict_keys(ROOT / "srt/entrypoints/http_server.py", "model_info", "result")),
        "load.keys": key_set(
            [
                f
                for f in _struct_fields(ROOT / "srt/managers/load_snapshot.py", "LoadSnapshot")
                if f not in ("memory", "speculative", "lora", "disaggregation", "queues")
            ]
        ),
    }


def main() -> None:
    if sys.argv[1:] == ["--version"]:
        from importlib.metadata import version

        print(version("sglang"))
        return
    check = checkers(_load())
    results = []
    for item in json.load(sys.stdin)["checks"]:
        try:
            results.append({"ok": True, "dump": check[item["kind"]](item["doc"])})
        except Exception as err:  # noqa: BLE001 - every failure is a result to report
            results.append({"ok": False, "error": f"{type(err).__name__}: {err}"})
    json.dump(results, sys.stdout)


if __name__ == "__main__":
    main()
