"""One run per workdir: a second is refused naming the holder; a lock left
by a run that is gone is taken over."""

import json
import os
import subprocess
import sys
import time

import pytest

from jaxlab import workdir_lock
from jaxlab.errors import UserError


def _lock(tmp_path):
  return str(tmp_path / workdir_lock.LOCK)


def test_second_holder_is_refused_and_release_frees_it(tmp_path):
  first = workdir_lock.WorkdirLock(str(tmp_path))
  first.acquire()
  holder = json.load(open(_lock(tmp_path)))
  assert holder['pid'] == os.getpid()
  with pytest.raises(UserError, match=rf'workdir {tmp_path} is in use by pid '
                     rf'{os.getpid()} on host {holder["host"]}') as e:
    workdir_lock.WorkdirLock(str(tmp_path)).acquire()
  assert '\n' not in str(e.value)
  first.release()
  assert not os.path.exists(_lock(tmp_path))
  with workdir_lock.hold(str(tmp_path)):  # Free again.
    assert os.path.exists(_lock(tmp_path))
  assert not os.path.exists(_lock(tmp_path))


def _write(tmp_path, **holder):
  with open(_lock(tmp_path), 'w') as f:
    json.dump({'time': time.time(), 'token': 'theirs', **holder}, f)


def test_lock_of_a_process_that_is_gone_is_taken_over(tmp_path, caplog):
  gone = subprocess.Popen([sys.executable, '-c', 'pass'])
  gone.wait()
  here = workdir_lock.WorkdirLock(str(tmp_path)).mine['host']
  _write(tmp_path, host=here, pid=gone.pid, start=None)
  with workdir_lock.hold(str(tmp_path)):
    assert json.load(open(_lock(tmp_path)))['pid'] == os.getpid()
  assert f'pid {gone.pid}' in caplog.text and 'Taking over' in caplog.text


def test_reused_pid_does_not_keep_a_lock(tmp_path):
  # This process's pid with another start time: the holder was another
  # process, now gone, whose pid came round again.
  here = workdir_lock.WorkdirLock(str(tmp_path)).mine
  _write(tmp_path, host=here['host'], pid=os.getpid(), start='1')
  with workdir_lock.hold(str(tmp_path)):
    pass


def test_other_hosts_lock_is_stale_only_once_not_refreshed(tmp_path):
  _write(tmp_path, host='elsewhere', pid=1, start=None)
  with pytest.raises(UserError, match='in use by pid 1 on host elsewhere'):
    workdir_lock.WorkdirLock(str(tmp_path)).acquire()
  old = time.time() - workdir_lock.STALE_SECONDS - 10
  os.utime(_lock(tmp_path), (old, old))
  with workdir_lock.hold(str(tmp_path)):
    assert json.load(open(_lock(tmp_path)))['host'] != 'elsewhere'


def test_holder_refreshes_its_lock(tmp_path, monkeypatch):
  monkeypatch.setattr(workdir_lock, 'REFRESH_SECONDS', 0.05)
  with workdir_lock.hold(str(tmp_path)):
    old = time.time() - 1000
    os.utime(_lock(tmp_path), (old, old))
    time.sleep(0.3)
    assert time.time() - os.path.getmtime(_lock(tmp_path)) < 10
