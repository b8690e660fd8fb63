"""Experiment: let jax-triton 0.3.1 kernels create TMA descriptors on the device.

Triton 3.6 kernels that call tl.make_tensor_descriptor write each descriptor into a
per-program slot of an implicit 'global scratch' parameter, which jaxlib passes as a null
pointer. This patch rewrites the PTX so the kernel reads that base from its last explicit
pointer argument instead (an output buffer the wrapper allocates: programs x SLOT + 128
bytes), rounded up to 128 bytes."""
import re

try:
    import jax_triton.triton_lib as tlib
except ImportError:  # CPU machine: only _patch_ptx is usable
    tlib = None

SLOT = 512


def _patch_ptx(ptx: str, name: str, size: int) -> str:
    if size > SLOT:
        raise ValueError(f"{name}: global scratch {size} B per program > {SLOT}")
    params = re.findall(rf"\b{re.escape(name)}_param_(\d+)\b", ptx.split("{", 1)[0])
    n = max(int(p) for p in params) + 1
    gs, ours = n - 2, n - 3
    pat = re.compile(rf"ld\.param\.(b64|u64)\s+(%rd\d+),\s*\[{re.escape(name)}_param_{gs}\];")
    m = pat.search(ptx)
    if m is None:
        raise ValueError(f"{name}: no load of the global scratch parameter {gs}")
    reg = m.group(2)
    new = (f"ld.param.b64 \t{reg}, [{name}_param_{ours}];\n\tadd.s64 \t{reg}, {reg}, 127;\n"
           f"\tand.b64 \t{reg}, {reg}, -128;")
    return ptx[:m.start()] + new + ptx[m.end():]


def compile_ttir_to_ptx_inplace(ttir, cuda_backend, cuda_options, compute_capability):
    metadata = {}
    opt_ttir = cuda_backend.make_ttir(ttir, metadata, cuda_options, compute_capability)
    ttgir = cuda_backend.make_ttgir(opt_ttir, metadata, cuda_options, compute_capability)
    llir = cuda_backend.make_llir(ttgir, metadata, cuda_options, compute_capability)
    ptx = cuda_backend.make_ptx(llir, metadata, cuda_options, compute_capability)
    name = metadata["name"]
    size = metadata.get("global_scratch_size", 0)
    if size:
        ptx = _patch_ptx(ptx, name, size)
    return tlib.CompilationResult(binary=ptx, name=name, shared_mem_bytes=metadata["shared"], ttgir=None, llir=None)


def install():
    if tlib is None:
        return
    tlib.compile_ttir_to_ptx_inplace = compile_ttir_to_ptx_inplace
