"""Errors the merge reports to the user. Every message names the path or option at fault."""


class MergeError(Exception):
    """A merge that cannot proceed. The message is meant for the user, as is."""


class AdapterError(MergeError):
    """A LoRA leaf the engine cannot pair, shape-check or interpret."""


class ConfigError(MergeError):
    """LoRA configs that are missing or do not match the checkpoint."""


class CheckpointError(MergeError):
    """A missing, unreadable or malformed checkpoint."""


class NonFiniteError(MergeError):
    """NaN or Inf in an adapter or in a merged weight."""


class VerificationError(MergeError):
    """The merged weights do not reproduce the LoRA forward."""


class OutputExistsError(MergeError):
    """The output directory exists and overwriting was not requested."""


class OutputRefusedError(MergeError):
    """An output the command must not write: the source, inside or around it, or something --overwrite may not
    replace (anything but an empty directory or an earlier output of this tool)."""


class IntegrityError(MergeError):
    """A merged checkpoint that cannot be verified at all: missing, not a merged checkpoint, or no usable manifest."""
