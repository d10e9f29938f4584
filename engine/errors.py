"""Error types the tool raises for problems a user can fix (bad files, bad options)."""


class InfluenceLensError(Exception):
    """A problem with the user's input or settings: the message says what and where."""


class DataError(InfluenceLensError):
    """A dataset file or folder that cannot be used as given."""


class OptionError(InfluenceLensError):
    """An option value that is not one of the valid choices."""

    def __init__(self, option: str, value: object, valid: list[str] | tuple[str, ...]):
        super().__init__(f"unknown {option} {value!r}; valid choices: {', '.join(valid)}")
        self.option, self.value, self.valid = option, value, list(valid)


class TrainingError(InfluenceLensError):
    """Training could not proceed (for example the loss became NaN or infinite)."""
