"""The files a run leaves in its workdir, read and written in one place.

  config.json     the resolved config
  history.jsonl   one JSON object per finished epoch
  results.json    final numbers, written when the run ends
"""

import json
import os
from typing import Any

CONFIG, HISTORY, RESULTS = 'config.json', 'history.jsonl', 'results.json'
FAILED = 'failed.json'  # A suite run that raised: {"error": message}.
HISTORY_KEYS = ('epoch', 'train_loss', 'train_accuracy', 'val_loss',
                'val_accuracy', 'images_per_sec')


def write_json(path: str, obj: Any) -> None:
  """Writes `obj` as JSON to `path` through a temporary file."""
  tmp = path + '.tmp'
  with open(tmp, 'w') as f:
    json.dump(obj, f, indent=2, sort_keys=True)
    f.write('\n')
  os.replace(tmp, path)


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
  path = os.path.join(workdir, HISTORY)
  tmp = path + '.tmp'
  with open(tmp, 'w') as f:
    f.writelines(json.dumps(h, sort_keys=True) + '\n' for h in kept)
  os.replace(tmp, path)


def append_history(workdir: str, entry: dict) -> None:
  with open(os.path.join(workdir, HISTORY), 'a') as f:
    f.write(json.dumps(entry, sort_keys=True) + '\n')
