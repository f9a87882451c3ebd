"""Memory a model holds."""
import torch


def module_bytes(module: torch.nn.Module) -> int:
    """Bytes of parameters and buffers, a tensor shared under several names (tied weights) counted once.

    bitsandbytes' ``Int8Params`` keep their row scales as an attribute (``SCB``), neither parameter nor buffer:
    counted too, so that its 8-bit model is weighed as int8mm's (whose scales are buffers).
    """
    seen, total = set(), 0
    for tensor in list(module.parameters()) + list(module.buffers()):
        for held in (tensor, getattr(tensor, "SCB", None)):
            if isinstance(held, torch.Tensor) and held.data_ptr() not in seen:
                seen.add(held.data_ptr())
                total += held.numel() * held.element_size()
    return total
