"""Stopping a run cleanly when the scheduler (or the user) asks it to.

SIGTERM or SIGINT makes the training loop finish its current step, write a
checkpoint, and end with `Preempted`, which `launch.py` reports in one line
and exits with `EXIT_STATUS`. Running the same command again resumes from
that checkpoint, exactly.

In a multi-process run, JAX's preemption service (started by
`jax.distributed.initialize`) receives SIGTERM on any process and agrees on
the step at which all of them stop; SIGINT is passed on to it as SIGTERM.
"""

import os
import signal
import threading

from absl import logging
import jax
from jax.experimental import multihost_utils

# EX_TEMPFAIL of sysexits.h: stopped on request, and resumable.
EXIT_STATUS = 75


class Preempted(Exception):
  """The run stopped on a signal after writing a checkpoint."""


class StopSignals:
  """While active, SIGTERM and SIGINT ask the run to stop after a step.

  Call `requested(step)` after every train step, on every process, with the
  number of steps done: True once the run should checkpoint and stop (on
  all processes at the same step).
  """

  def __init__(self):
    self._signal = None
    self._previous = {}
    self._multi_process = jax.process_count() > 1

  def _on_signal(self, signum, frame):
    del frame
    if self._signal is not None:
      logging.warning('%s again: already stopping; the checkpoint is being '
                      'written.', signal.Signals(signum).name)
      return
    self._signal = signal.Signals(signum).name
    logging.warning('%s: stopping after this step, with a checkpoint.',
                    self._signal)

  def _pass_on_as_sigterm(self, signum, frame):
    del signum, frame
    self._signal = 'SIGINT'
    os.kill(os.getpid(), signal.SIGTERM)  # To JAX's preemption service.

  @property
  def received(self) -> str | None:
    """The name of the signal that asked the run to stop, if any."""
    return self._signal or ('SIGTERM' if self._multi_process else None)

  def requested(self, step: int) -> bool:
    if self._multi_process:
      return multihost_utils.reached_preemption_sync_point(step)
    return self._signal is not None

  def __enter__(self) -> 'StopSignals':
    if threading.current_thread() is not threading.main_thread():
      return self  # Signals reach the main thread only.
    handlers = {signal.SIGINT: self._on_signal, signal.SIGTERM: self._on_signal}
    if self._multi_process:
      # JAX's own SIGTERM handler must stay.
      handlers = {signal.SIGINT: self._pass_on_as_sigterm}
    for signum, handler in handlers.items():
      self._previous[signum] = signal.signal(signum, handler)
    return self

  def __exit__(self, *exc):
    for signum, handler in self._previous.items():
      signal.signal(signum, handler)
    self._previous.clear()
