"""The files a run leaves in its workdir, read and written in one place.

  config.json     the resolved config
  history.jsonl   one JSON object per finished epoch
  results.json    final numbers, written when the run ends
  events.out.tfevents.*  TensorBoard's scalars, through `metric_writer`
"""

import json
import os
import re
from typing import Any

from jaxlab import storage

CONFIG, HISTORY, RESULTS = 'config.json', 'history.jsonl', 'results.json'
FAILED = 'failed.json'  # A suite run that raised: {"error": message}.
HISTORY_KEYS = ('epoch', 'train_loss', 'train_accuracy', 'val_loss',
                'val_accuracy', 'images_per_sec')


def write_json(path: str, obj: Any) -> None:
  """Writes `obj` as JSON to `path` through a temporary file."""
  storage.write_atomic(path, json.dumps(obj, indent=2, sort_keys=True) + '\n')


def read_json(path: str) -> Any | None:
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def write_config(workdir: str, config_dict: dict) -> None:
  write_json(os.path.join(workdir, CONFIG), config_dict)


def read_config(workdir: str) -> dict | None:
  return read_json(os.path.join(workdir, CONFIG))


def write_results(workdir: str, results: dict) -> None:
  write_json(os.path.join(workdir, RESULTS), results)


def read_results(workdir: str) -> dict | None:
  return read_json(os.path.join(workdir, RESULTS))


def read_history(workdir: str) -> list[dict]:
  """The epochs in history.jsonl; a last line cut short by a kill is dropped
  (that epoch has no checkpoint either, so it will be trained again)."""
  path = os.path.join(workdir, HISTORY)
  if not os.path.exists(path):
    return []
  with open(path) as f:
    lines = [line for line in f if line.strip()]
  entries = []
  for i, line in enumerate(lines):
    try:
      entries.append(json.loads(line))
    except json.JSONDecodeError:
      if i < len(lines) - 1:
        raise
  return entries


def truncate_history(workdir: str, last_epoch: int) -> None:
  """Keeps only epochs <= `last_epoch` (those a resumed run will not redo)."""
  kept = [h for h in read_history(workdir) if h['epoch'] <= last_epoch]
  text = ''.join(json.dumps(h, sort_keys=True) + '\n' for h in kept)
  path = os.path.join(workdir, HISTORY)
  if os.path.exists(path):
    with open(path) as f:
      if f.read() == text:
        return  # Unchanged: nothing to write on a disk that may be full.
  storage.write_atomic(path, text)


def append_history(workdir: str, entry: dict) -> None:
  storage.append_text(os.path.join(workdir, HISTORY),
                      json.dumps(entry, sort_keys=True) + '\n')


def _events_call(workdir: str, function, *args, **kwargs):
  """`function(*args, **kwargs)`, with a refused write of TensorBoard's
  events file as `storage.WriteFailed`."""
  try:
    return function(*args, **kwargs)
  except Exception as e:  # pylint: disable=broad-except
    if not storage.is_write_error(e):
      raise
    path = re.search(r'(\S*events\.out\.tfevents\S*?);', str(e))
    raise storage.failure(path.group(1) if path else workdir, e,
                          None) from None


class _StorageCheckedWriter:
  """A clu metric writer whose failed writes (a full disk, a read-only
  folder) raise `storage.WriteFailed` naming the events file."""

  def __init__(self, writer, workdir: str):
    self._writer, self._workdir = writer, workdir

  def __getattr__(self, name: str):
    method = getattr(self._writer, name)
    return lambda *args, **kwargs: _events_call(self._workdir, method, *args,
                                                **kwargs)


def metric_writer(workdir: str, just_logging: bool = False):
  """clu's default metric writer (the console, and TensorBoard events in
  `workdir`), with failed writes as `storage.WriteFailed`."""
  # Imported here: clu's writers import TensorFlow (seconds), which a run
  # that stops at a config error never needs.
  from clu import metric_writers  # pylint: disable=g-import-not-at-top
  writer = _events_call(workdir, metric_writers.create_default_writer,
                        workdir, just_logging=just_logging)
  return _StorageCheckedWriter(writer, workdir)
