"""Writing files so that a full disk or a refused write ends a run cleanly.

Every file jaxlab writes (records, checkpoints, TensorBoard events, reports,
figures, converted or downloaded weights) goes through these helpers or
through `failure` when another library writes it. A write that fails raises
`WriteFailed`: one line naming the path, the operating system's reason, the
space the write needed and the space that is free there. Files are replaced
through a temporary file, so a failed write leaves the previous version whole.
"""

import contextlib
import os
import re

from jaxlab.errors import UserError

_OS_ERROR_CODE = re.compile(r"os_error_code='?(\d+)")


class WriteFailed(UserError):
  """A file could not be written (no space, no permission, read-only)."""


def format_bytes(n: int | None) -> str:
  """`n` bytes for people: '812 B', '4.2 MiB'."""
  if n is None:
    return 'an unknown amount'
  for unit in ('B', 'KiB', 'MiB', 'GiB'):
    if n < 1024 or unit == 'GiB':
      return f'{n} {unit}' if unit == 'B' else f'{n:.1f} {unit}'
    n /= 1024
  raise AssertionError('unreachable')


def free_bytes(path: str) -> int | None:
  """Bytes free to this user on the filesystem that holds (or would hold)
  `path`; None if no folder above it exists."""
  folder = os.path.abspath(path)
  while not os.path.isdir(folder):
    parent = os.path.dirname(folder)
    if parent == folder:
      return None
    folder = parent
  try:
    stat = os.statvfs(folder)
  except OSError:
    return None
  return stat.f_bavail * stat.f_frsize


def _reason(error: BaseException) -> str:
  """The operating system's words for `error`, in one short line."""
  if isinstance(error, OSError) and error.strerror:
    return error.strerror
  text = str(error)
  code = _OS_ERROR_CODE.search(text)
  if code:  # TensorStore (orbax) names the errno.
    return os.strerror(int(code.group(1)))
  for words in ('No space left on device', 'Read-only file system',
                'Permission denied', 'Disk quota exceeded'):
    if words in text:
      return words
  return (text.strip().splitlines() or [type(error).__name__])[0][:200]


def is_write_error(error: BaseException) -> bool:
  """Whether `error` (an OSError, or a library's error carrying one) says
  that a write was refused, not that the program is wrong."""
  if isinstance(error, OSError):
    return True
  text = str(error)
  return bool(_OS_ERROR_CODE.search(text)) or any(
      status in text for status in ('RESOURCE_EXHAUSTED', 'PERMISSION_DENIED',
                                    'No space left on device',
                                    'Read-only file system',
                                    'Permission denied'))


def failure(path: str, error: BaseException, needed: int | None
            ) -> WriteFailed:
  """The one-line error for writing `needed` bytes to `path` and failing."""
  return WriteFailed(
      f'could not write {path}: {_reason(error)} (the write needed '
      f'{format_bytes(needed)}; {format_bytes(free_bytes(path))} free there); '
      'free some space or fix the permissions, then run the same command '
      'again: it resumes from the last checkpoint')


@contextlib.contextmanager
def writing(path: str, needed: int | None):
  """Turns an OSError raised in the body into `WriteFailed` for `path`."""
  try:
    yield
  except OSError as e:
    raise failure(path, e, needed) from None


def _remove_quietly(path: str) -> None:
  with contextlib.suppress(OSError):
    os.remove(path)


def write_atomic(path: str, data: bytes | str,
                 temporary: str | None = None) -> None:
  """Writes `data` to `path` through a temporary file (`path`.tmp unless
  named) renamed into place."""
  payload = data.encode() if isinstance(data, str) else data
  temporary = temporary or path + '.tmp'
  with writing(path, len(payload)):
    try:
      with open(temporary, 'wb') as f:
        f.write(payload)
      os.replace(temporary, path)
    except OSError:
      _remove_quietly(temporary)
      raise


def append_text(path: str, text: str) -> None:
  """Appends `text` to `path`; on failure the file is cut back to what it
  held, so no half-written line is left behind."""
  payload = text.encode()
  with writing(path, len(payload)):
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
      size = os.fstat(fd).st_size
      try:
        view = memoryview(payload)
        while view:
          view = view[os.write(fd, view):]
      except OSError:
        with contextlib.suppress(OSError):
          os.ftruncate(fd, size)
        raise
    finally:
      os.close(fd)
