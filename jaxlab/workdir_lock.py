"""One run per workdir: a lock file that names its holder.

`hold(workdir)` creates `workdir/lock.json` atomically (host, pid, the
process's start time) and removes it when the run ends. A second run on the
workdir stops at once with one line naming the holder. A lock whose holder
is gone is taken over with a warning, so a killed run resumes by running
its command again: gone means, on this host, that its process no longer
runs (pid and start time, so a reused pid does not count); from another
host, that it has not refreshed the lock for `STALE_SECONDS` (a holder
refreshes it every `REFRESH_SECONDS`).
"""

import contextlib
import json
import os
import socket
import threading
import time
import uuid

from absl import logging

from jaxlab import storage
from jaxlab.errors import UserError

LOCK = 'lock.json'
REFRESH_SECONDS = 30.0
STALE_SECONDS = 300.0


def _start_time(pid: int) -> str | None:
  """The process's start time in clock ticks since boot (Linux), or None."""
  try:
    with open(f'/proc/{pid}/stat') as f:
      return f.read().rsplit(')', 1)[1].split()[19]
  except (OSError, IndexError):
    return None


def _running(pid: int, start: str | None) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    pass  # Another user's process: it runs.
  return start is None or _start_time(pid) in (None, start)


def _read(path: str) -> dict | None:
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError):
    return None


def _describe(holder: dict | None) -> str:
  if not holder:
    return 'a run whose lock file is unreadable'
  since = time.strftime('%Y-%m-%d %H:%M:%S',
                        time.localtime(holder.get('time', 0)))
  return (f'pid {holder.get("pid")} on host {holder.get("host")} '
          f'(since {since})')


class WorkdirLock:
  """The lock of one workdir, held by this process."""

  def __init__(self, workdir: str):
    self.path = os.path.join(workdir, LOCK)
    pid = os.getpid()
    self.mine = {'host': socket.gethostname(), 'pid': pid,
                 'start': _start_time(pid), 'time': time.time(),
                 'token': uuid.uuid4().hex}
    self._stop = threading.Event()
    self._refresher = None

  def _stale(self, holder: dict | None) -> bool:
    try:
      age = time.time() - os.path.getmtime(self.path)
    except OSError:
      return True  # Gone meanwhile.
    if not holder:
      return age > STALE_SECONDS  # Unreadable: half-written, or left so.
    if holder.get('host') == self.mine['host']:
      return not _running(int(holder.get('pid', -1)), holder.get('start'))
    return age > STALE_SECONDS

  def _write_new(self) -> bool:
    with storage.writing(self.path, len(json.dumps(self.mine))):
      try:
        fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
      except FileExistsError:
        return False
      try:
        with os.fdopen(fd, 'w') as f:
          json.dump(self.mine, f)
      except OSError:
        # An empty lock would stop the next run for minutes.
        with contextlib.suppress(OSError):
          os.remove(self.path)
        raise
    return True

  def acquire(self) -> None:
    """Takes the lock, or raises a UserError naming its holder."""
    if not self._write_new():
      holder = _read(self.path)
      if not self._stale(holder):
        raise UserError(
            f'workdir {os.path.dirname(self.path)} is in use by '
            f'{_describe(holder)}; wait for that run to end, or use another '
            '--workdir')
      logging.warning('Taking over the lock of %s in %s: that run is gone.',
                      _describe(holder), os.path.dirname(self.path))
      # Written aside and renamed over the old lock; of several processes
      # taking it over at once, the last rename wins, and the others see
      # someone else's token.
      storage.write_atomic(self.path, json.dumps(self.mine),
                           temporary=f'{self.path}.{self.mine["token"]}')
      if (_read(self.path) or {}).get('token') != self.mine['token']:
        raise UserError(f'workdir {os.path.dirname(self.path)} was taken '
                        f'over by {_describe(_read(self.path))} at the same '
                        'time; use another --workdir')
    self._refresher = threading.Thread(target=self._refresh, daemon=True)
    self._refresher.start()

  def _refresh(self) -> None:
    while not self._stop.wait(REFRESH_SECONDS):
      with contextlib.suppress(OSError):
        os.utime(self.path)

  def release(self) -> None:
    self._stop.set()
    if (_read(self.path) or {}).get('token') == self.mine['token']:
      with contextlib.suppress(OSError):
        os.remove(self.path)


@contextlib.contextmanager
def hold(workdir: str, enabled: bool = True):
  """Holds `workdir`'s lock for the body (`enabled=False`: does nothing,
  for processes other than process 0 of a multi-host run)."""
  if not enabled:
    yield
    return
  lock = WorkdirLock(workdir)
  lock.acquire()
  try:
    yield
  finally:
    lock.release()
