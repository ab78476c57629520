"""SGLang's own code as the judge of what our client sends, run in a process of its own.

    python -m tests.sglang.sglang_oracle CASES.json OUT_DIR   -> one JSON line per case

A case is ``{"endpoint", "body"}`` (a request), ``{"payload": entry}`` (one entry of
``serialized_named_tensors``) or ``{"weight_versions": {"events", "current", "tokens"}}`` (the
weight versions SGLang reports for a response across version changes). Requests are parsed the way SGLang's HTTP server parses them:
the request class is the one SGLang's ``http_server.py`` annotates the route's ``obj`` with
(read from its source), validated with pydantic as FastAPI's ``Body()`` does, and every field
we send must be a field of that class (SGLang would drop an unknown one silently). ``/generate``
bodies also go through SGLang's ``SamplingParams`` and its ``verify``. Payloads are loaded with
SGLang's ``MultiprocessingSerializer.deserialize`` (its ``SafeUnpickler``) and rebuilt as
``_update_weights_from_flattened_bucket`` does, with its ``FlattenedTensorMetadata`` and
``FlattenedTensorBucket``; the tensors are written to ``OUT_DIR/<case>.safetensors``.

Why a process of its own: importing SGLang patches transformers (and sets cache variables) in
the importing process; the test process must not be changed by its judge. torchvision: no
PyPI build loads against the CPU torch of this project (its C++ ops need CUDA libraries), and
SGLang's config registry imports it for vision models' image transforms only. When it does
not import, this process alone gets an inert placeholder for it (never called here), after
transformers has recorded that torchvision is unavailable.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import inspect
import json
import os
import re
import sys
import types


class _Inert:
    """Any attribute, call or subclassing of a module nobody here uses."""

    def __init__(self, *args, **kwargs):
        pass

    def __call__(self, *args, **kwargs):
        return self

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _Inert()


class _InertModule(types.ModuleType):
    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return type(name, (_Inert,), {}) if name[:1].isupper() else _Inert()


class _InertFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def __init__(self, root: str):
        self.root = root

    def find_spec(self, fullname, path=None, target=None):
        if fullname == self.root or fullname.startswith(self.root + "."):
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        module = _InertModule(spec.name)
        module.__path__ = []
        return module

    def exec_module(self, module):
        pass


def _torchvision_placeholder() -> bool:
    """Install the placeholder if torchvision does not import; whether it was needed."""
    try:
        import torchvision  # noqa: F401
        return False
    except Exception:                         # ImportError, or its ops failing to register
        for name in [m for m in sys.modules if m == "torchvision" or
                     m.startswith("torchvision.")]:
            del sys.modules[name]
    from transformers.utils import import_utils
    import_utils.is_torchvision_available()   # cached False before the placeholder exists
    sys.meta_path.insert(0, _InertFinder("torchvision"))
    return True


def route_classes(http_server_source: str) -> dict[str, str]:
    """``{"/endpoint": "RequestClass"}`` from SGLang's route decorators and ``obj`` params."""
    routes = {}
    pattern = re.compile(r'@app\.(?:post|api_route|put)\(\s*"(/[^"]+)"[^@]*?\)\s*\n'
                         r'(?:@[^\n]*\n)*async def \w+\(\s*obj: (?:Annotated\[)?(\w+)')
    for endpoint, cls in pattern.findall(http_server_source):
        routes.setdefault(endpoint, cls)
    return routes


def check_request(io_struct, routes, endpoint: str, body: dict) -> dict:
    from pydantic import TypeAdapter

    name = routes.get(endpoint)
    if name is None:
        return {"ok": False, "error": f"SGLang's http_server has no {endpoint} with a body"}
    cls = getattr(io_struct, name)
    fields = set(getattr(cls, "__struct_fields__", ()) or
                 getattr(cls, "__dataclass_fields__", {}).keys())
    unknown = sorted(set(body) - fields)
    try:
        TypeAdapter(cls).validate_python(body)
    except Exception as e:
        return {"ok": False, "class": name, "error": f"{type(e).__name__}: {e}"}
    if endpoint == "/generate":
        from sglang.srt.sampling.sampling_params import SamplingParams
        try:
            params = SamplingParams(**body.get("sampling_params") or {})
            verify = params.verify
            kwargs = {"vocab_size": 50000} if "vocab_size" in inspect.signature(verify).parameters \
                else {}
            verify(**kwargs)
        except Exception as e:
            return {"ok": False, "class": "SamplingParams", "error": f"{type(e).__name__}: {e}"}
    return {"ok": not unknown, "class": name, "unknown_fields": unknown}


def check_payload(entry: str, out: str) -> dict:
    from safetensors.torch import save_file
    from sglang.srt.utils import MultiprocessingSerializer
    from sglang.srt.weight_sync.tensor_bucket import FlattenedTensorBucket, FlattenedTensorMetadata

    try:
        data = MultiprocessingSerializer.deserialize(entry)
    except Exception as e:
        return {"ok": False, "error": f"{type(e).__name__}: {e}"}
    metadata = [FlattenedTensorMetadata(name=m.name, shape=m.shape, dtype=m.dtype,
                                        start_idx=m.start_idx, end_idx=m.end_idx, numel=m.numel)
                for m in data["metadata"]]
    bucket = FlattenedTensorBucket(flattened_tensor=data["flattened_tensor"], metadata=metadata)
    tensors = {name: t.contiguous() for name, t in bucket.reconstruct_tensors()}
    save_file(tensors, out)
    return {"ok": True, "names": list(tensors), "file": out}


def check_weight_versions(case: dict) -> dict:
    """``meta_info``'s weight versions of a response, as SGLang's scheduler and tokenizer
    manager compute them from the version changes it saw (``events``)."""
    from sglang.srt.utils.weight_versions import (WeightVersionEvent,
                                                  add_weight_versions_to_meta_info,
                                                  compute_weight_version_spans)

    events = [WeightVersionEvent(old_version=v, num_output_tokens=n) for v, n in case["events"]]
    spans = compute_weight_version_spans(events, current_version=case["current"],
                                         num_output_tokens=case["tokens"])
    meta: dict = {}
    add_weight_versions_to_meta_info(meta, spans, num_output_tokens=case["tokens"])
    return {"ok": True, "meta_info": meta}


def main() -> None:
    cases_path, out_dir = sys.argv[1], sys.argv[2]
    placeholder = _torchvision_placeholder()
    import sglang
    from sglang.srt.managers import io_struct

    root = os.path.dirname(sglang.__file__)
    with open(os.path.join(root, "srt", "entrypoints", "http_server.py")) as f:
        routes = route_classes(f.read())
    from importlib.metadata import version
    print(json.dumps({"sglang": version("sglang"), "torchvision_placeholder": placeholder,
                      "routes": len(routes)}))
    with open(cases_path) as f:
        cases = json.load(f)
    for i, case in enumerate(cases):
        if "payload" in case:
            result = check_payload(case["payload"], os.path.join(out_dir, f"{i}.safetensors"))
        elif "weight_versions" in case:
            result = check_weight_versions(case["weight_versions"])
        else:
            result = check_request(io_struct, routes, case["endpoint"], case["body"])
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
