"""jaxscale's exceptions. This module imports nothing heavy, so the CLI can catch them all."""


class JaxscaleError(Exception):
    """Base of the errors jaxscale raises on purpose, each with a one-line message."""


class ConfigError(JaxscaleError, ValueError):
    """A setting is invalid. The message is one line naming the key, the value and what is valid."""


class ShardingError(ConfigError):
    """A sharding rule or annotation cannot be applied; the message names the array."""


class NonFiniteError(JaxscaleError, FloatingPointError):
    """The loss or gradient norm became NaN or infinite (on_nonfinite=abort)."""


class CheckpointError(JaxscaleError):
    """A checkpoint cannot be saved or restored; the message names the step and what to do."""


class Preempted(JaxscaleError):
    """A stop signal (SIGTERM, SIGINT) ended the run after a checkpoint committed; rerun resumes."""
