"""A step whose loss or gradient is NaN/inf is skipped before megatron's optimizer, on every
rank; a NaN weight is never checkpointed. TP=2 on gloo, the real DDP and optimizer."""

import math
import os

import torch

from tests.checkpoint import sessions as S
from tests.distributed import run_distributed
from tests.helpers import write_tiny_llama


def _snapshot(s):
    params = [p.detach().clone() for c in s.chunks for p in c.parameters()]
    optimizers = getattr(s.trainer.optimizer, "chained_optimizers", [s.trainer.optimizer])
    moments = [v.clone() for opt in optimizers for state in opt.optimizer.state.values()
               for v in state.values() if isinstance(v, torch.Tensor)]
    assert moments, "no Adam state to compare"
    return params, moments, s.trainer.scheduler.num_steps


def _same(a, b) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


def _nonfinite_steps(root: str) -> dict:
    from repo_megatron.run.dry_run import synthetic_groups
    from repo_megatron.run.guard import TrainingStopped

    s = S.session(root, parallel={"tensor_model_parallel_size": 2})
    rank = torch.distributed.get_rank()
    out = {}
    S.train_step(s, 1)  # Adam states exist from here on
    groups = synthetic_groups(2, 2, 6, seed=7)

    # 1. NaN advantages: the loss is NaN.
    before = _snapshot(s)
    prepared = s.prepare(groups)
    prepared.minibatches[0][0].advantages.fill_(math.nan)
    m = s.update(prepared)
    out["nan_loss"] = (math.isnan(m["train/loss"]), m["train/nonfinite_skipped"],
                       m["train/nonfinite_in_a_row"], m["train/skipped_updates"])
    after = _snapshot(s)
    out["nan_loss_untouched"] = (_same(before[0], after[0]), _same(before[1], after[1]),
                                 before[2] == after[2])

    # 2. A finite loss with a NaN gradient on rank 1 only: both ranks skip.
    param = next(p for p in s.chunks[0].parameters() if p.requires_grad)
    hook = param.register_hook(lambda g: torch.full_like(g, math.nan)) if rank == 1 else None
    m = s.update(s.prepare(groups))
    out["nan_grad"] = (math.isfinite(m["train/loss"]), math.isnan(m["train/grad_norm"]),
                       m["train/nonfinite_skipped"], m["train/nonfinite_in_a_row"])
    out["nan_grad_untouched"] = _same(after[0], _snapshot(s)[0])

    # 3. A clean step updates again and resets the count.
    if hook is not None:
        hook.remove()
    m = s.update(s.prepare(groups))
    out["clean"] = (m["train/nonfinite_skipped"], m["train/nonfinite_in_a_row"],
                    not _same(after[0], _snapshot(s)[0]), s.trainer.parameters_finite())

    # 4. The control: megatron's optimizer applies a NaN gradient; such weights are never saved.
    s.trainer.train_step(s.prepare(groups).minibatches[0])  # fills the gradients
    for p in s.chunks[0].parameters():
        p.main_grad.fill_(math.nan)
    s.trainer.optimizer.step()
    out["megatron_alone_finite"] = s.trainer.parameters_finite()
    try:
        s.save(5)
        out["saved"] = True
    except TrainingStopped as e:
        out["saved"] = str(e)
    out["checkpoints"] = os.listdir(s.checkpoints.directory) if os.path.isdir(
        s.checkpoints.directory) else []
    s.close()
    return out


def test_nonfinite_loss_or_gradient_skips_the_update_on_every_rank(tmp_path):
    write_tiny_llama(str(tmp_path / "model"), num_layers=2)
    for rank, out in enumerate(run_distributed(_nonfinite_steps, 2, str(tmp_path), timeout=600)):
        assert out["nan_loss"] == (True, 1.0, 1.0, 1.0), (rank, out)
        assert out["nan_loss_untouched"] == (True, True, True), (rank, out)  # weights, Adam, lr
        assert out["nan_grad"] == (True, True, 1.0, 2.0), (rank, out)
        assert out["nan_grad_untouched"], rank
        assert out["clean"] == (0.0, 0.0, True, True), (rank, out)
        assert out["megatron_alone_finite"] is False, "control: megatron applies NaN gradients"
        assert out["saved"] == ("step 5: a weight is NaN or infinite; not checkpointing it, the "
                                "last good checkpoint is kept"), out["saved"]
        assert out["checkpoints"] == [], out
