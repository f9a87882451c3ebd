"""Memory a model holds."""
import torch


def module_bytes(module: torch.nn.Module) -> int:
    """Bytes of parameters and buffers, a tensor shared under several names (tied weights) counted once."""
    seen, total = set(), 0
    for tensor in list(module.parameters()) + list(module.buffers()):
        if tensor.data_ptr() not in seen:
            seen.add(tensor.data_ptr())
            total += tensor.numel() * tensor.element_size()
    return total
