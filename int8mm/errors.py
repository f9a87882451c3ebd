"""``CheckpointError``: what every way of loading 8-bit weights raises for a checkpoint that does not fit."""


class CheckpointError(ValueError, RuntimeError):
    """A checkpoint that does not fit the model: missing, unexpected or mismatched tensors, values no quantizer
    writes, truncated or unreadable files. The message names the key and, where there is one, the file.

    A ``ValueError`` (a bad input), and a ``RuntimeError`` too, which is what ``nn.Module.load_state_dict``
    raises for a state dict that does not fit, so code written against either keeps catching it.
    """
