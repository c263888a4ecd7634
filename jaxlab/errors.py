"""The one exception type for mistakes a user can fix (bad config, bad data)."""


class UserError(Exception):
  """A mistake in the user's input, reported as one line without a traceback.

  The message names the file, key or value at fault and says what would be
  right. `launch.py` prints it and exits with status 2.
  """
