"""Errors whose message is meant for the person using the studio: short, and saying what to do."""


class StudioError(Exception):
    """Base class: the message is shown to the user as it is."""


class InvalidRequest(StudioError):
    """The request's values are out of range or unknown. `problems` lists each one."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__(" ".join(self.problems))


class UnknownPreset(InvalidRequest):
    def __init__(self, name: str, available: list[str]):
        super().__init__([f"Unknown preset {name!r}. Available presets: {', '.join(available)}."])


class ModelUnavailable(StudioError):
    """A preset's weights could not be loaded (no Hub connection, missing folder, broken files).

    `reason` is one sentence for the page; `command`, where there is one, downloads the missing files (the page
    offers it to copy beside the preset). The message (str) has both, for API callers and the log."""

    def __init__(self, reason: str, command: str | None = None):
        self.reason = reason
        self.command = command
        super().__init__(reason if command is None else f"{reason}\nTo download its files:\n{command}")


class OutOfMemoryBudget(StudioError):
    """The models a request needs do not fit in the device budget even after evicting everything unlocked."""


class NumericalError(StudioError):
    """A model gave NaN or inf values (not numbers): the denoiser, or the VAE even in float32. The message names
    the stage, the preset and the dtype, and what to try."""
