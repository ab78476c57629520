"""Production code never names CUDA outside the one CPU-compatibility module."""

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[2] / "repo_megatron"
ALLOWED = {
    ROOT / "runtime" / "cpu_compat.py",
    # names torch.cuda classes as data only: its copy of SGLang's SafeUnpickler allow-list
    # (a test pins it equal to SGLang's); it calls nothing of CUDA
    ROOT / "engines" / "sglang_server" / "tensor_payload.py",
}
CUDA = re.compile(r"\.cuda\(|torch\.cuda\b|device\s*=\s*['\"]cuda|['\"]cuda(:\d+)?['\"]|"
                  r"current_device\(\)")


def test_no_cuda_call_outside_compat_module():
    offenders = []
    for path in sorted(ROOT.rglob("*.py")):
        if path in ALLOWED:
            continue
        for i, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#", 1)[0]
            if CUDA.search(code):
                offenders.append(f"{path.relative_to(ROOT.parent)}:{i}: {line.strip()}")
    assert not offenders, "CUDA named outside runtime/cpu_compat.py:\n" + "\n".join(offenders)


def test_the_pattern_catches_cuda_calls():
    for line in ("x.cuda()", "torch.cuda.synchronize()", "torch.empty(3, device='cuda')",
                 "t.to(\"cuda:0\")", "torch.cuda.current_device()"):
        assert CUDA.search(line), line
    assert not CUDA.search("cpu_compat.device()")
