"""The loss does not depend on how the step is batched: token-budget micro-batches (padded, or
packed into rows), and the step's sequences in another order, train exactly like fixed
micro-batches of ``micro_batch_size`` sequences.

In fp32, two optimizer steps from the same weights give the same loss, gradient norm and
updated weights (within 1e-6), and the same loss metrics (sums over tokens: within a relative
1e-5), at TP2, PP2, PP2 with VPP2 (where every micro-batch of a rank runs in one shape) and DP2,
in every loss aggregation mode. The step is a RePO step
with LUFFY and replay rows: a rephrased trace (on-policy under ``q``), an expert trace (LUFFY's
shaped term), replayed samples (the replay term against their behaviour log-probs), per-sequence
advantages, KL to a reference model (other weights, so KL and its gradient are not zero) and an
entropy bonus, dual-clip and gradient clipping; responses from 1 to 40 tokens.

Everything on the path is the run's own: ``run/batching.py`` plans the micro-batches (a number
of micro-batches per rank that is no power of two: the loss's ``M_r`` scaling), ``run/batch.py``
builds them, the old and reference log-probs are computed on those same micro-batches, and the
loss goes through Megatron's real schedules and DDP.
"""

import dataclasses
import os
import random

import pytest
import torch

from tests.distributed import run_distributed
from tests.helpers import write_tiny_llama

MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")
LAYOUTS = {  # name: (TP, PP, VPP)
    "tp2": (2, 1, None),
    "pp2": (1, 2, None),
    "pp2vpp2": (1, 2, 2),
    "dp2": (1, 1, None),
}
BUDGET = 96  # positions per micro-batch: the longest sequence (52) alone, several per budget
VARIANTS = {  # name: (algorithm overrides, permuted order)
    "fixed": (dict(micro_batch_size=3), False),
    "token_budget": (dict(max_tokens_per_microbatch=BUDGET), False),
    "token_budget_permuted": (dict(max_tokens_per_microbatch=BUDGET), True),
    "packing": (dict(max_tokens_per_microbatch=BUDGET, sequence_packing=True), False),
}
VOCAB = 1000
# Loss and gradient norm: 1e-6, relative above 1 (an fp32 norm of 7.5 has a unit in the last
# place of 4.8e-7: two roundings apart is 1e-6 absolute); the weights: 1e-6 absolute.
TOLERANCE = 1e-6
# The metrics are sums over tokens (per-provenance sums of log-prob differences among them):
# each token's log-prob may differ by float rounding, so they get test_train_parity's relative
# 1e-5.
METRIC_TOLERANCE = 1e-5
CLIP_GRAD = 0.1
ADAM_EPS = 1e-2  # see test_train_parity: keeps Adam's first update a continuous function of g


def step_groups(permuted: bool):
    """Three groups of a RePO step plus a LUFFY expert trace and two replayed samples; with
    ``permuted`` the same groups in another order, their samples shuffled."""
    from repo_megatron.rollout.types import Group, Prompt, Sample

    rng = random.Random(3)
    groups = []
    for g in range(3):
        prompt = Prompt(uid=f"p{g}", question="", answer="", solution="k",
                        prompt_ids=tuple(rng.randrange(VOCAB) for _ in range(rng.randint(4, 12))))
        samples = []
        for j in range(5):
            n = 40 if (g, j) == (1, 2) else rng.randint(1, 14)
            kind = {(0, 0): "rephrased", (1, 0): "expert", (2, 3): "replay",
                    (2, 4): "replay"}.get((g, j), "rollout")
            sampled = kind in ("rollout", "replay")
            samples.append(Sample(
                prompt_uid=prompt.uid, prompt_ids=prompt.prompt_ids,
                response_ids=[rng.randrange(VOCAB) for _ in range(n)], response_text="",
                reward=float(rng.random() < 0.5) if kind == "rollout" else 1.0,
                reward_reason="", finish_reason="expert" if kind == "expert" else "stop",
                behaviour_logprobs=[-rng.random() * 3 for _ in range(n)] if sampled else None,
                is_rephrased=kind == "rephrased", is_offpolicy=kind in ("expert", "replay"),
                is_replay=kind == "replay"))
        groups.append(Group(prompt, samples, gate_fired=True, injected_index=0))
    if permuted:
        order = random.Random(9)
        groups = [Group(g.prompt, order.sample(g.samples, len(g.samples)), gate_fired=True)
                  for g in order.sample(groups, len(groups))]
    return groups


def _train(model_dir: str, weights: str, parallel, mode: str, overrides: dict,
           permuted: bool) -> dict:
    """Two optimizer steps of the policy from ``weights``/init on the step's micro-batches as
    the variant plans them: losses, gradient norms, metrics, this rank's parameters after (the
    same shards in every variant of a layout) and the micro-batches' shapes."""
    from megatron.core import parallel_state as ps

    from repo_megatron.algorithm import LossParams
    from repo_megatron.checkpoint.model_io import load_model
    from repo_megatron.config.algorithm import AlgorithmConfig
    from repo_megatron.config.model import ModelConfig
    from repo_megatron.config.optimizer import OptimizerConfig
    from repo_megatron.models.architecture import read_architecture
    from repo_megatron.models.builder import build_model
    from repo_megatron.run import batch as B
    from repo_megatron.run.batching import plan_micro_batches
    from repo_megatron.trainer.forward import forward_logprobs, needs_equal_shapes
    from repo_megatron.trainer.train_step import PolicyTrainer, build_reference_model

    arch, model_cfg = read_architecture(model_dir), ModelConfig(transformer_impl="local")
    chunks = build_model(arch, model_cfg, parallel)
    load_model(chunks, os.path.join(weights, "init"))
    initial = _parameters(chunks)
    reference = build_reference_model(arch, model_cfg, parallel, os.path.join(weights, "ref"))
    trainer = PolicyTrainer(
        chunks, OptimizerConfig(lr=1e-2, clip_grad=CLIP_GRAD, adam_eps=ADAM_EPS),
        LossParams(loss_agg_mode=mode, loss_norm_length=16, kl_coef=0.1, entropy_coef=0.01,
                   dual_clip=3.0, replay_coef=0.5), total_steps=2)
    groups = step_groups(permuted)
    full = B.build_global_batch(groups, B.group_advantages(groups, "grpo", 1e-6), pad_id=0)
    vpp = parallel.virtual_pipeline_model_parallel_size
    plan = plan_micro_batches(
        full.lengths.tolist(), ps.get_data_parallel_world_size(),
        dataclasses.replace(AlgorithmConfig(), **overrides),
        multiple_of=parallel.pipeline_model_parallel_size if vpp else 1,
        equal_shapes=needs_equal_shapes(trainer.model))
    micro_batches = B.micro_batches(full, plan[ps.get_data_parallel_rank()])
    olds = trainer.compute_logprobs(micro_batches)
    refs = forward_logprobs(reference, micro_batches)
    for mb, old, ref in zip(micro_batches, olds, refs):
        mb.old_logprobs, mb.ref_logprobs = old, ref
    steps = [trainer.train_step(micro_batches) for _ in range(2)]
    return {"steps": [(s.loss, s.grad_norm, s.metrics) for s in steps],
            "initial": initial, "params": _parameters(chunks),
            "shapes": [tuple(mb.forward_shape) for mb in micro_batches],
            "planned_tokens": [p.tokens for rank in plan for p in rank]}


def _parameters(chunks: list) -> dict:
    return {name: p.detach().clone() for i, chunk in enumerate(chunks)
            for name, p in chunk.named_parameters(prefix=f"chunk{i}")}


def _layout_runs(root: str, tp: int, pp: int, vpp) -> dict:
    """Every variant of every mode in this layout; parameters are compared here, with the
    fixed micro-batches', so that only numbers travel back."""
    from megatron.core import parallel_state as ps

    from repo_megatron.checkpoint.model_io import save_model
    from repo_megatron.config.model import ModelConfig
    from repo_megatron.config.parallel import ParallelConfig
    from repo_megatron.models.architecture import read_architecture
    from repo_megatron.models.builder import build_model
    from repo_megatron.runtime.distributed import initialize

    parallel = ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                              virtual_pipeline_model_parallel_size=vpp)
    initialize(parallel, seed=5)
    model_dir = os.path.join(root, "model")
    arch, model_cfg = read_architecture(model_dir), ModelConfig(transformer_impl="local")
    weights = os.path.join(root, f"tp{tp}pp{pp}vpp{vpp}")
    for name in ("init", "ref"):  # the reference policy: other random weights
        save_model(build_model(arch, model_cfg, parallel), os.path.join(weights, name))
    out = {"dp": ps.get_data_parallel_world_size()}
    for mode in MODES:
        runs = {name: _train(model_dir, weights, parallel, mode, overrides, permuted)
                for name, (overrides, permuted) in VARIANTS.items()}
        fixed = runs["fixed"]["params"]
        out[mode] = {name: {
            "steps": run["steps"], "shapes": run["shapes"],
            "planned_tokens": run["planned_tokens"],
            "param_diff": max((run["params"][k] - fixed[k]).abs().max().item() for k in fixed),
            "param_change": max((run["params"][k] - run["initial"][k]).abs().max().item()
                                for k in fixed)} for name, run in runs.items()}
    return out


@pytest.fixture(scope="module", params=list(LAYOUTS))
def layout(request, tmp_path_factory):
    root = str(tmp_path_factory.mktemp("token_budget_parity"))
    write_tiny_llama(os.path.join(root, "model"), vocab_size=VOCAB)
    return request.param, run_distributed(_layout_runs, 2, root, *LAYOUTS[request.param],
                                          timeout=900)


def test_token_budget_and_packing_train_exactly_like_fixed_micro_batches(layout):
    name, per_rank = layout
    for rank, results in enumerate(per_rank):
        for mode in MODES:
            fixed = results[mode]["fixed"]
            assert fixed["param_change"] > 1e-3, "the steps must change the weights"
            (l1, n1, m1), (l2, _, m2) = fixed["steps"]
            assert l1 != l2 and n1 > CLIP_GRAD, "clipping and a second step that differs"
            assert m1["kl"] > 0 and m1["entropy"] > 0
            for kind in ("rephrased", "expert", "replay"):  # every kind of row is in the step
                assert m1[f"{kind}/tokens_sum"] > 0, kind
            for variant in VARIANTS:
                run = results[mode][variant]
                where = f"{name} rank {rank} {mode} {variant}"
                for (loss, norm, metrics), (ref_loss, ref_norm, ref_metrics) in zip(
                        run["steps"], fixed["steps"]):
                    assert abs(loss - ref_loss) < TOLERANCE * max(1.0, abs(ref_loss)), \
                        f"{where}: loss {loss} vs {ref_loss}"
                    assert abs(norm - ref_norm) < TOLERANCE * max(1.0, abs(ref_norm)), \
                        f"{where}: norm {norm} vs {ref_norm}"
                    assert metrics.keys() == ref_metrics.keys(), where
                    for key, value in metrics.items():  # sums over tokens: relative
                        scale = max(1.0, abs(ref_metrics[key]))
                        assert abs(value - ref_metrics[key]) < METRIC_TOLERANCE * scale, \
                            f"{where}: {key} {value} vs {ref_metrics[key]}"
                assert run["param_diff"] < TOLERANCE, f"{where}: weights differ by " \
                                                      f"{run['param_diff']:.2e}"


def test_token_budget_micro_batches_stay_within_the_budget_and_differ_from_fixed(layout):
    name, per_rank = layout
    results = per_rank[0]["token-mean"]
    for variant in ("token_budget", "token_budget_permuted", "packing"):
        tokens = results[variant]["planned_tokens"]
        assert max(tokens) <= BUDGET, f"{name} {variant}: {max(tokens)} > {BUDGET}"
        assert len(results[variant]["shapes"]) != len(results["fixed"]["shapes"])
    assert all(rows == 1 for rows, _ in results["packing"]["shapes"])  # one packed row each
    if name == "pp2vpp2":  # one shape per rank under the interleaved schedule at PP=2
        for variant in VARIANTS:
            assert len(set(results[variant]["shapes"])) == 1, variant
            assert len(results[variant]["shapes"]) % 2 == 0, variant
