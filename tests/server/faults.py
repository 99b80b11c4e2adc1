"""`FaultInjectingEngine`: wraps any engine and breaks chosen requests, chosen by markers in their prompts.

    RAISE    generate raises a RuntimeError (a bug in the model code)
    OOM      generate raises torch.cuda.OutOfMemoryError (the device ran out of memory)
    INVALID  generate raises InvalidRequestError (a request error found late: the client's fault)
    NAN      that request's image comes out NaN
    KILL     the process running the engine exits at once (only in an engine worker process; in the
             test process itself it raises instead)

A batch fails when any of its requests carries RAISE, OOM or INVALID, as a real engine's batch
would. For NAN the wrapper poisons the real engine's VAE output (a forward hook), so the engine's
own finiteness check is what catches it; a fake engine has no tensors, so the wrapper raises
`NonFiniteOutputError` for it, as the engine contract says an engine does. `oom_above` makes
every batch larger than that many images run out of memory, as an over-full batch would.
`gate` holds each call until the test opens it, so tests can queue requests into one batch.
"""

from __future__ import annotations

import multiprocessing
import os
import threading
from typing import Any

import torch

from flashstep.models.errors import InvalidRequestError, NonFiniteOutputError
from flashstep.models.outputs import GenerationRequest, GenerationResult
from flashstep.server.model_manager import registry_loader

RAISE = "[[raise]]"
OOM = "[[oom]]"
INVALID = "[[invalid]]"
NAN = "[[nan]]"
KILL = "[[kill]]"
GATE_TIMEOUT_S = 30


class FaultInjectingEngine:
    """Delegates everything to `inner`, except that `generate` fails as the prompts' markers say."""

    def __init__(self, inner: Any, *, oom_above: int | None = None):
        self.inner = inner
        self.oom_above = oom_above
        self.calls: list[int] = []  # batch size of every generate call, in order
        self.gate: threading.Event | None = None
        self.entered = threading.Event()

    def __getattr__(self, name: str) -> Any:  # name, path, version, family, config, validate, ...
        return getattr(self.inner, name)

    def generate(self, requests: list[GenerationRequest]) -> GenerationResult:
        self.calls.append(len(requests))
        self.entered.set()
        if self.gate is not None and not self.gate.wait(timeout=GATE_TIMEOUT_S):
            raise RuntimeError("the test never opened the gate")
        prompts = [r.prompt for r in requests]
        if any(KILL in p for p in prompts):
            if multiprocessing.parent_process() is None:
                raise RuntimeError("KILL only works in an engine worker process")
            os._exit(70)  # as a segfault or the OOM killer would: no reply, no cleanup
        if any(INVALID in p for p in prompts):
            raise InvalidRequestError("prompt", "`prompt` holds a marker the model refuses (injected)")
        if any(RAISE in p for p in prompts):
            raise RuntimeError("injected engine failure")
        if any(OOM in p for p in prompts) or (self.oom_above is not None and len(requests) > self.oom_above):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected)")
        poisoned = [i for i, p in enumerate(prompts) if NAN in p]
        vae = getattr(self.inner, "vae", None)
        if not poisoned:
            return self.inner.generate(requests)
        if vae is None:  # a fake engine: report as a real one does
            result = self.inner.generate(requests)
            raise NonFiniteOutputError("injected NaN", indices=poisoned, result=result)

        def poison(module, inputs, output):  # (B, 3, H, W): NaN in the chosen rows only
            output = output.clone()
            output[poisoned] = float("nan")
            return output

        hook = vae.decoder.register_forward_hook(poison)
        try:
            return self.inner.generate(requests)
        finally:
            hook.remove()


class FaultInjectingLoader:
    """An `engine_loader` that wraps what `loader` loads in a `FaultInjectingEngine`; keeps the last one."""

    def __init__(self, loader, **fault_kwargs):
        self.loader = loader
        self.fault_kwargs = fault_kwargs
        self.engines: list[FaultInjectingEngine] = []

    def __call__(self, name_or_path, **kwargs) -> FaultInjectingEngine:
        engine = FaultInjectingEngine(self.loader(name_or_path, **kwargs), **self.fault_kwargs)
        self.engines.append(engine)
        return engine


# A picklable loader for engine worker processes: the shipped registry loader behind the fault injector.
faulty_registry_loader = FaultInjectingLoader(registry_loader)
