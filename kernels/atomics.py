"""Atomic counters for threads that share the work of one parallel region (kernels/ggml_step.py's decode step).

Three operations on an int64 at a byte address, as LLVM's atomics: fetch_add (claims a chunk of work, or counts
work done: sequentially consistent, so the stores of the work before it are visible to whoever reads the count),
load_acquire (reads a count; the loads after it see what was stored before the count was raised) and spin_pause
(x86's `pause` while a thread waits on a count, which tells the core it spins; nothing elsewhere). Values never
depend on them: they only order the threads' reads after the writes they need.
"""

from __future__ import annotations

import platform

from llvmlite import ir
from numba import types
from numba.extending import intrinsic

I64 = ir.IntType(64)
X86 = platform.machine().lower() in ("x86_64", "amd64", "i386", "i686")


def _slot(builder, addr):
    return builder.inttoptr(addr, ir.PointerType(I64))


@intrinsic
def fetch_add(typingctx, addr, value):
    """The int64 at byte address addr (8-byte aligned) raised by value, atomically -> its value before."""
    sig = types.int64(types.int64, types.int64)

    def codegen(context, builder, signature, args):
        return builder.atomic_rmw("add", _slot(builder, args[0]), args[1], "seq_cst")
    return sig, codegen


@intrinsic
def load_acquire(typingctx, addr):
    """The int64 at byte address addr (8-byte aligned), read atomically with acquire order."""
    sig = types.int64(types.int64)

    def codegen(context, builder, signature, args):
        return builder.load_atomic(_slot(builder, args[0]), "acquire", 8)
    return sig, codegen


@intrinsic
def spin_pause(typingctx):
    """One round of a spin wait: x86's `pause` (llvm.x86.sse2.pause); elsewhere nothing."""
    sig = types.void()

    def codegen(context, builder, signature, args):
        if X86:
            fn = builder.module.globals.get("llvm.x86.sse2.pause")
            if fn is None:
                fn = ir.Function(builder.module, ir.FunctionType(ir.VoidType(), []), "llvm.x86.sse2.pause")
            builder.call(fn, [])
        return context.get_dummy_value()
    return sig, codegen
