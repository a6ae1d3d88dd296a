"""The problems minifastv reports as one sentence: bad input, a bad checkpoint, a bad image or
video, bad settings.

The commands (python -m minifastv, .analyze, .bench, .flops) turn these, and only these, into
`error: ...` and exit code 2. Any other exception is a bug, in minifastv or in code you changed, and
keeps its traceback so that you can see where it happened. Each class is also a ValueError, so
library code that catches ValueError keeps working.
"""


class MinifastvError(ValueError):
    """Something the user can fix, said in one sentence."""


class UsageError(MinifastvError):
    """A command-line argument that is out of range or does not fit the model."""


class CheckpointError(MinifastvError):
    """A checkpoint that cannot be used: missing, damaged or foreign files, a config this code does
    not implement."""


class ImageError(MinifastvError):
    """An image we cannot use (missing, unreadable, too many pixels, empty); the message names
    the file."""


class VideoError(MinifastvError):
    """A video we cannot use (missing, unreadable, no frames, PyAV missing for MP4); the message
    names the file."""


class SettingsError(MinifastvError):
    """FastV or sampling settings that are out of range, or that do not fit the prompt."""
