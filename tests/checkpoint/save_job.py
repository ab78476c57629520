"""A one-process trainer that saves checkpoints, for the tests that kill it or fill its disk.

    python -m tests.checkpoint.save_job ROOT --steps N [--async] [--resume] [--raw]

ROOT holds ``model/`` (a tiny Llama config); the run goes to ``ROOT/run``. Prints one JSON
line: what was saved, restored, or the one-line error and the state of the checkpoint
directory afterwards. ``--raw`` saves once with plain megatron ``dist_checkpointing`` and
then SIGKILLs itself (the control: what megatron leaves behind on its own).
"""

import argparse
import json
import os
import signal


def _report(s) -> dict:
    from repo_megatron.checkpoint.manager import complete_checkpoints

    directory = s.checkpoints.directory
    complete = complete_checkpoints(directory)
    return {"complete": [os.path.basename(p) for _, p in complete],
            "verified": {os.path.basename(p): s.checkpoints.verify(p) is None for _, p in complete},
            "partial": sorted(n for n in os.listdir(directory) if n.startswith(".tmp-"))}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("root")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--async", dest="async_save", action="store_true")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--raw", action="store_true")
    args = parser.parse_args()

    from repo_megatron.errors import CheckpointError
    from tests.checkpoint import sessions

    s = sessions.session(args.root, async_save=args.async_save, keep_last=2)
    if args.raw:
        from megatron.core import dist_checkpointing
        out = os.path.join(args.root, "raw")
        os.makedirs(out)
        dist_checkpointing.save(s._sharded_state(loading=False), out)
        print(json.dumps({"raw_saved": out}), flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    result: dict = {}
    try:
        if args.resume:
            result["restored"] = s.restore()
        start = result.get("restored", 0)
        for step in range(start + 1, start + args.steps + 1):
            sessions.train_step(s, step)
            s.save(step)
            s.checkpoints.poll()
            result.setdefault("saved", []).append(step)
        s.checkpoints.wait()
    except CheckpointError as e:
        result["error"] = str(e)
    result.update(_report(s))
    s.close()
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
