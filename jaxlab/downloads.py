"""Downloading files with a checksum, and telling quickly when there is no network."""

import hashlib
import os
import socket
import urllib.parse
import urllib.request

from jaxlab import storage
from jaxlab.errors import UserError


def network_reachable(url: str, timeout: float = 3.0) -> bool:
  """Whether a TCP connection to `url`'s host opens within `timeout` s."""
  parsed = urllib.parse.urlparse(url)
  port = parsed.port or (443 if parsed.scheme == 'https' else 80)
  try:
    socket.create_connection((parsed.hostname, port), timeout=timeout).close()
    return True
  except OSError:
    return False


def sha256_of(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, 'rb') as f:
    for chunk in iter(lambda: f.read(1 << 20), b''):
      digest.update(chunk)
  return digest.hexdigest()


def download(url: str, destination: str, sha256: str,
             timeout: float = 60.0) -> str:
  """Downloads `url` to `destination` if the SHA-256 matches; returns the path.

  The file is written beside `destination` under a temporary name and only
  renamed into place once complete and verified, so a failed or corrupt
  download never leaves a file that looks finished.
  """
  if not network_reachable(url):
    raise UserError(f'cannot reach {url} (no network?); download it on '
                    f'another machine and put it at {destination}')
  folder = os.path.dirname(os.path.abspath(destination))
  with storage.writing(folder, None):
    os.makedirs(folder, exist_ok=True)
  partial = destination + '.partial'
  digest = hashlib.sha256()
  with storage.writing(destination, None):
    out = open(partial, 'wb', buffering=0)  # pylint: disable=consider-using-with
  complete = False
  try:
    with out, urllib.request.urlopen(url, timeout=timeout) as response:
      size = response.headers.get('Content-Length')
      for chunk in iter(lambda: response.read(1 << 20), b''):
        digest.update(chunk)
        with storage.writing(destination, size and int(size)):
          view = memoryview(chunk)
          while view:
            view = view[out.write(view):]
    complete = digest.hexdigest() == sha256
  except OSError as e:  # The network's: a failed write is WriteFailed.
    raise UserError(f'downloading {url} failed: {e}') from None
  finally:
    if not complete:
      os.remove(partial)  # Cut short, failed or corrupt.
  if not complete:
    raise UserError(f'{url} has SHA-256 {digest.hexdigest()}, expected '
                    f'{sha256}; the download was discarded')
  os.replace(partial, destination)
  return destination
