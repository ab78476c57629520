"""Rank 0's rollout side in a process of its own, for rollouts that run ahead of the trainer.

With ``rollout.max_staleness > 0`` and SGLang servers, the rollout of step t+1 (sampling,
rewards, the RePO stage) runs while Megatron trains step t. On a thread of the trainer's process
the two share one GIL: the trainer issues thousands of small ops a step, each of which drops and
retakes it, while the rollout's Python (HTTP, encoding, rewards, gate, injection) holds it in
between, and a training step beside a rollout ran up to twice as slow as alone. So, as slime and
verl run their rollout workers, the :class:`~.rollout_side.EngineRollout` (the SGLang servers
this run launches, the tokenizer, the prompts, the rewards, the RePO stage, the ledger) lives in
a child process, and the trainer's process keeps a proxy, :class:`RolloutProcess`, and a
client of the same servers for what it does itself: the weight sync (every pipeline stage
streams to the servers) and the Hugging Face export (the weights never cross a pipe).

The two talk over one pipe, one request at a time, in plain data only (a step's groups as
:meth:`Group.to_plain`, metrics, the checkpoint's rollout state), both ends ours: rollout,
evaluate, state, load_state, close. The child applies them in order, so a run is the same
sequence of rollouts as in one process: the same samples under the same seed. A failure in the
child comes back as the same exception (its traceback as a note). The child ignores Ctrl-C and
stops when the parent closes the pipe, also when the parent is killed (the pipe's end of file),
stopping the servers and reward workers it started.

The :class:`~.async_rollout.AsyncRollout` producer thread still schedules the rollouts ahead; in
the trainer's process it only waits on the pipe (no GIL held) and unpickles the result.
"""

from __future__ import annotations

import atexit
import logging
import multiprocessing
import os
import pickle
import signal
import traceback
from typing import Any

from ..config import Config
from ..data.run_data import RunData
from ..rollout.types import Group
from .rollout_side import RolloutResult, RolloutSide, write_hf_export

log = logging.getLogger(__name__)

# seconds the child gets to stop its servers and reward workers after "close"
CLOSE_TIMEOUT_S = 120.0


def runs_in_own_process(cfg: Config) -> bool:
    """Whether rank 0's rollouts run in a child process: they run ahead of the trainer
    (``rollout.max_staleness > 0``) on SGLang servers, which a second client reaches as well as
    the first. The embedded engine's model is the trainer process's own, so its rollouts stay
    on a thread (docs/rollout.md)."""
    from ..engines.factory import uses_sglang

    return cfg.rollout.max_staleness > 0 and uses_sglang(cfg)


class RolloutProcess(RolloutSide):
    """:class:`~.rollout_side.EngineRollout` on ``cfg`` in a child process (``spawn``: no
    copy of the trainer's threads or process groups), reached over a pipe; ``engine`` is this
    process's client of the servers the child's side uses."""

    def __init__(self, cfg: Config, data: RunData):
        from ..engines.factory import hf_config
        from ..engines.sglang.engine import SGLangEngine

        self.engine = None
        self.hf_config, self.tokenizer = hf_config(cfg), data.tokenizer
        context = multiprocessing.get_context("spawn")
        self.conn, child_end = context.Pipe()
        self.process = context.Process(
            target=child_main, name="repo-megatron-rollout",
            args=(child_end, cfg, logging.getLogger().getEffectiveLevel()))
        self.process.start()
        child_end.close()
        # a run that ends without close() (an error before the loop) still stops the child
        # (and its servers) before multiprocessing joins it at exit
        atexit.register(self.close)
        try:
            sglang = self._call("start")    # the servers' URLs once the child's side is up
            self.engine = SGLangEngine(sglang)
        except BaseException:
            self.close()
            raise

    def _call(self, op: str, *args) -> Any:
        if self.conn.closed:
            raise RuntimeError(f"rollout process: {op} after close")
        try:
            self.conn.send((op, args))
            status, value, trace = self.conn.recv()
        except (EOFError, OSError) as e:
            self.process.join(5)                    # its exit code, once it is reaped
            raise RuntimeError(f"rollout process (pid {self.process.pid}) died during {op} "
                               f"(exit code {self.process.exitcode}); its output is above") from e
        if status == "error":
            value.add_note(f"in the rollout process (pid {self.process.pid}):\n{trace}")
            raise value
        return value

    def rollout(self, step: int) -> RolloutResult:
        # the version the servers serve: this process's weight sync set it (no sync runs while
        # a rollout does: the sync waits for the rollouts ahead), the child's client checks
        # every answer against it and stamps it on the samples
        groups, metrics = self._call("rollout", step, self.engine.weight_version)
        return [Group.from_plain(g) for g in groups], metrics

    def evaluate(self) -> dict:
        return self._call("evaluate", self.engine.weight_version)

    def state(self) -> dict:
        return self._call("state")

    def load_state(self, state: dict) -> None:
        self._call("load_state", state)

    def export(self, weights: dict, out: str) -> None:
        write_hf_export(weights, out, self.hf_config, self.tokenizer)

    def close(self) -> None:
        """Close this client, then the child (its servers and reward workers); idempotent."""
        atexit.unregister(self.close)
        if self.engine is not None:
            self.engine.close()
        if not self.conn.closed:
            try:
                self.conn.send(("close", ()))
            except OSError:
                pass                                # the child is gone already
            self.conn.close()
        self.process.join(CLOSE_TIMEOUT_S)
        if self.process.is_alive():
            log.warning("rollout process %d did not stop in %.0f s: killed", self.process.pid,
                        CLOSE_TIMEOUT_S)
            self.process.kill()
            self.process.join()


def _reply(conn, side, op: str, args: tuple) -> None:
    """Run one request on ``side`` and send its result (or its exception) back."""
    try:
        if op == "start":
            value = side.engine.cfg
        elif op == "rollout":
            step, version = args
            side.engine.set_weight_version(version)
            groups, metrics = side.rollout(step)
            value = ([g.to_plain() for g in groups], metrics)
        elif op == "evaluate":
            side.engine.set_weight_version(*args)
            value = side.evaluate()
        elif op in ("state", "load_state"):
            value = getattr(side, op)(*args)
        else:
            raise ValueError(f"rollout process: unknown request {op!r}")
        conn.send(("ok", value, None))
    except Exception as e:                                      # noqa: BLE001 - sent back
        _send_error(conn, e)


def _send_error(conn, error: BaseException) -> None:
    """``error`` itself where it survives pickling (a UserError keeps its one-line message and
    exit code), else a RuntimeError naming its type; the traceback as text."""
    trace = traceback.format_exc()
    try:
        pickle.loads(pickle.dumps(error))    # an exception whose __init__ takes other arguments
    except Exception:                                           # noqa: BLE001 - not portable
        error = RuntimeError(f"{type(error).__name__}: {error}")
    conn.send(("error", error, trace))


def child_main(conn, cfg: Config, log_level: int = logging.INFO) -> None:
    """The child: build the rollout side, then answer requests until "close" or the end of
    the pipe; then stop what the side started."""
    import torch

    from ..cli import quiet_libraries
    from ..data.run_data import load_run_data
    from .rollout_side import EngineRollout

    signal.signal(signal.SIGINT, signal.SIG_IGN)     # the trainer's process decides when to stop
    logging.basicConfig(level=log_level, datefmt="%H:%M:%S",
                        format="%(asctime)s %(levelname)s %(name)s [rollout]: %(message)s")
    quiet_libraries()
    torch.set_num_threads(1)                         # no arithmetic here: HTTP, text, rewards
    try:
        side = EngineRollout(cfg, load_run_data(cfg))
    except Exception as e:                                      # noqa: BLE001 - sent back
        try:
            conn.recv()                              # "start"
            _send_error(conn, e)
        except (EOFError, OSError):
            pass
        return
    log.info("rollout process %d up", os.getpid())
    try:
        while True:
            try:
                op, args = conn.recv()
            except EOFError:                         # the trainer's process is gone
                break
            if op == "close":
                break
            _reply(conn, side, op, args)
    finally:
        side.close()
