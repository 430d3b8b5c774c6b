"""Compile the kernels an interpreted run launched for a real GPU target (sm_90: H100/H200), with
Triton's own compiler (it needs no GPU to emit a cubin). The interpreter accepts code the compiler
would refuse (tensor sizes that are not powers of two, dtype mix-ups in tl.dot, Python it cannot
lower), so this is the check that the generated kernels are GPU code, short of running them on one.

Triton cannot compile in a process that imported it with TRITON_INTERPRET=1, so the compilation
runs in a child process, on the same kernels.py source.
"""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from types import ModuleType

import torch

POINTER_TYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.uint8: "u8",
                 torch.int8: "i8", torch.int32: "i32", torch.int64: "i64"}


def record_launches(kernels: ModuleType) -> list[tuple[str, dict, dict]]:
    """Wrap each interpreted kernel of `kernels` so that its launches are recorded as
    (kernel name, signature, constexprs); returns the list that fills up. Kernels whose code is the
    same but for their name (the q, k, v, o projections' GEMVs) are recorded under the first name."""
    from triton.runtime.interpreter import InterpretedFunction

    launches: list[tuple[str, dict, dict]] = []
    bodies: dict[str, str] = {}
    for name, value in vars(kernels).items():
        if not isinstance(value, InterpretedFunction):
            continue
        parameters = inspect.signature(value.fn).parameters
        original = value.run
        body = inspect.getsource(value.fn).replace(name, "kernel")
        name = bodies.setdefault(body, name)

        def run(*args, grid, warmup, name=name, parameters=parameters, original=original, **kwargs):
            bound = dict(zip(parameters, args)) | kwargs
            signature, constants = {}, {}
            for arg, parameter in parameters.items():
                given = bound[arg]
                if "constexpr" in str(parameter.annotation):
                    signature[arg], constants[arg] = "constexpr", given
                elif isinstance(given, torch.Tensor):
                    signature[arg] = "*" + POINTER_TYPES[given.dtype]
                else:
                    signature[arg] = "i64" if abs(int(given)) >= 2**31 else "i32"
            launches.append((name, signature, constants))
            return original(*args, grid=grid, warmup=warmup, **kwargs)

        value.run = run
    return launches


CHILD = r'''
import importlib.util, json, sys
import triton
from triton.backends.compiler import GPUTarget
path, launches, capability = sys.argv[1], json.loads(open(sys.argv[2]).read()), int(sys.argv[3])
spec = importlib.util.spec_from_file_location("kernels_under_test", path)
kernels = importlib.util.module_from_spec(spec)
spec.loader.exec_module(kernels)
shared = {}
for name, signature, constants in launches:
    source = triton.compiler.ASTSource(fn=getattr(kernels, name), signature=signature, constexprs=constants)
    compiled = triton.compile(source, target=GPUTarget("cuda", capability, 32))
    assert compiled.asm.get("cubin"), name
    shared[name] = max(shared.get(name, 0), compiled.metadata.shared)
print(json.dumps(shared))
'''


def compile_for_gpu(source: str, launches: list[tuple[str, dict, dict]], capability: int = 90,
                    half: bool = False, only: set[str] | None = None) -> dict[str, int]:
    """Compile each distinct recorded launch of the kernels in `source` for CUDA `capability`; with
    `half`, float32 pointers become float16 (a half-precision model); `only`: these kernels only.
    Launches differing only in shape constants compile once. Returns kernel → bytes of shared memory
    it uses; raises AssertionError with the compiler's message when one fails."""
    distinct = {}
    for name, signature, constants in launches:
        if only is not None and name not in only:
            continue
        if half:
            signature = {k: "*fp16" if v == "*fp32" else v for k, v in signature.items()}
        distinct.setdefault(json.dumps([name, signature], sort_keys=True), [name, signature, constants])
    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / "kernels.py").write_text(source)
        (Path(folder) / "launches.json").write_text(json.dumps(list(distinct.values())))
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        done = subprocess.run([sys.executable, "-c", CHILD, str(Path(folder) / "kernels.py"),
                               str(Path(folder) / "launches.json"), str(capability)],
                              capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])
