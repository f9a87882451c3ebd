"""Launcher of the tiled input-gradient kernel (kernels/triton/backward.py): ``grad_y @ dequantize(q_w)``.

Used by the backward of ``int8_linear`` on CUDA tensors when Triton is installed; under ``TRITON_INTERPRET=1``
it runs on CPU tensors with the interpreter's fixed tile.
"""
import torch

from ..kernels.triton.backward import _dequant_matmul_kernel
from . import triton_interpreting
from .triton_launch import cdiv, launch
from ..devices import on_device_of

# fp32 FMA tiles (no tensor cores at IEEE fp32); the interpreter gets the smallest tile tl.dot accepts
GPU_TILE = {"BLOCK_M": 64, "BLOCK_N": 32, "BLOCK_K": 128, "num_warps": 4, "num_stages": 3}
INTERPRETER_TILE = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 32}


def dequant_matmul(grad_y: torch.Tensor, q_w: torch.Tensor, s_w: torch.Tensor) -> torch.Tensor:
    """``grad_y [M, N] @ (q_w [N, K] * s_w[:, None] / 127)`` as fp32 ``[M, K]``, without the fp32 weight.

    Args: grad_y fp16/bf16/fp32 ``[M, N]``; q_w int8 ``[N, K]``; s_w fp32 ``[N]``; one device.
    """
    if grad_y.dim() != 2 or q_w.dim() != 2 or grad_y.shape[1] != q_w.shape[0] or s_w.shape != (q_w.shape[0],):
        raise ValueError(f"dequant_matmul needs grad_y [M, N], q_w [N, K], s_w [N], got {tuple(grad_y.shape)}, "
                         f"{tuple(q_w.shape)}, {tuple(s_w.shape)}")
    m, n = grad_y.shape
    k = q_w.shape[1]
    s_w = s_w.contiguous()  # the kernel reads the scale at unit stride
    out = torch.empty((m, k), dtype=torch.float32, device=grad_y.device)
    if m == 0 or k == 0:
        return out
    if n == 0:
        return out.zero_()
    tile = INTERPRETER_TILE if triton_interpreting() else GPU_TILE
    grid = (cdiv(m, tile["BLOCK_M"]), cdiv(k, tile["BLOCK_K"]))
    with on_device_of(grad_y):  # a layer on another GPU than the current one (device_map="auto")
        launch(_dequant_matmul_kernel, grid, (
            grad_y, q_w, s_w, out, m, n, k,
            grad_y.stride(0), grad_y.stride(1), q_w.stride(0), q_w.stride(1), out.stride(0), out.stride(1),
        ), tile)
    return out
