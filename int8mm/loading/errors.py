"""``CheckpointError``: what ``load_in_8bit`` raises for a checkpoint that does not fit the model."""


class CheckpointError(ValueError):
    """A checkpoint that does not fit the model: missing, unexpected or mismatched tensors, bad files."""
