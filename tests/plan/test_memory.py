"""The memory formulas against figures computed by hand (the arithmetic is spelled out)."""

import pathlib

import pytest

from repo_megatron.models.architecture import parse_hf_config, read_architecture
from repo_megatron.plan.memory import (GIB, Colocation, Layout, Workload, in_flight_micro_batches,
                                       kv_cache_tokens, layer_activation_bytes, stage_memory,
                                       weight_sync_bytes)

MiB = 2**20
ROOT = pathlib.Path(__file__).resolve().parents[2]

LLAMA2_7B = parse_hf_config({
    "architectures": ["LlamaForCausalLM"], "hidden_size": 4096, "intermediate_size": 11008,
    "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32,
    "vocab_size": 32000, "hidden_act": "silu", "tie_word_embeddings": False})
LLAMA3_70B = read_architecture(str(ROOT / "examples/models/llama-3.1-70b-instruct"))


def test_7b_tp2_dp4_by_hand():
    layout = Layout(tensor=2, pipeline=1, virtual=None, data=4, sequence_parallel=True,
                    distributed_optimizer=True)
    work = Workload(seq_length=2048, micro_batch_size=2, num_micro_batches=8,
                    recompute="selective", params_bytes=2, reference_model=False)
    m = stage_memory(LLAMA2_7B, 32000, layout, work, rank=0, gpu_bytes=80 * GIB,
                     reserve_bytes=5 * GIB)

    # One layer on one of 2 TP ranks (head_dim 4096 / 32 = 128):
    qkv = 4096 * (32 + 2 * 32) * 128          # 50,331,648
    proj = 32 * 128 * 4096                    # 16,777,216
    mlp = 3 * 4096 * 11008                    # 135,266,304 (gate, up, down)
    layer = (qkv + proj + mlp) // 2 + 2 * 4096  # 101,195,776 (two RMSNorms replicated)
    # 32000 is already a multiple of 128 x TP 2; embedding and untied output both split by TP.
    embedding = 32000 * 4096 // 2             # 65,536,000
    params = 32 * layer + 2 * embedding + 4096  # + final norm = 3,369,340,928
    assert m.params == params == 3_369_340_928
    assert m.weights == params * 2            # bf16
    assert m.gradients == params * 4          # fp32 main grads
    assert m.optimizer == params * 12 / 4     # fp32 master + m + v, sharded over DP 4
    # Activations, bf16, s b = 4096 tokens: the two norms' inputs and outputs (4h, split by
    # SP), and split by TP the QKV output (a + 2g) d, Q and K roped (a + g) d, the attention
    # output a d, FC1 and SwiGLU outputs 3f; RoPE's cos / sin of Q and K, 4 s d.
    sharded = 96 * 128 + 64 * 128 + 32 * 128 + 3 * 11008          # 57,600
    per_layer = 4096 * 2 * (4 * 4096 / 2 + sharded / 2) + 4 * 2048 * 128 * 2
    assert per_layer == 305_135_616
    # per micro-batch in flight (1 without PP): the stack's boundary [s, b, h] / t, the causal
    # mask s^2 (bool), the rotary table [s, d] (fp32); and the forward's temporaries, the
    # gathered input and the row-parallel output [s, b, h] (bf16)
    stack = 2048 * 2 * 4096 * 2 / 2 + 2048 ** 2 + 4 * 2048 * 128
    forward = 2 * 2048 * 2 * 4096 * 2
    assert m.in_flight == 1
    assert m.activations == 32 * per_layer + stack + forward == 9_853_468_672
    # logits [s, b, V/t] in bf16, and while GPTModel transposes them to [b, s, V/t] (a copy
    # for b = 2) the output layer's [s, b, V/t] (more than 2.5 16 MiB log-prob chunks)
    logits = 2048 * 2 * 32000 / 2 * 2                               # 262 MB
    assert m.logits == 2 * logits
    # backward: the logits' gradient (and its contiguous copy, b = 2), the output layer's
    # weight gradient V h / t, its gathered input's gradient s b h, the residual's s b h / t
    assert m.backward == 2 * logits + (16000 * 4096 + 2048 * 2 * 4096 * 1.5) * 2
    # weight sync (512 MiB buckets >= attention + FC1 of a layer, so a whole bucket is open):
    # the bucket, FC1 gathered and merged (2 x 2 f h) and FC2 gathered (f h), in bf16
    assert m.weight_sync == 512 * MiB + (2 * 2 * 11008 + 11008) * 4096 * 2
    # the peak of the step: the activations kept in flight with that backward moment (the
    # forward's temporaries and this micro-batch's logits are gone by then)
    assert m.step == m.activations - forward + m.backward > m.weight_sync
    assert m.trainer == m.weights + m.gradients + m.optimizer + m.step
    assert m.total == m.trainer + 5 * GIB


def test_70b_tp8_pp4_vpp2_dp2_by_hand():
    layout = Layout(tensor=8, pipeline=4, virtual=2, data=2, sequence_parallel=True,
                    distributed_optimizer=True)
    work = Workload(seq_length=4096, micro_batch_size=1, num_micro_batches=256,
                    recompute="selective", params_bytes=2, reference_model=False,
                    sync_bucket_bytes=1024 * MiB)
    first, last = (stage_memory(LLAMA3_70B, 129024, layout, work, rank=r, gpu_bytes=80 * GIB,
                                reserve_bytes=0) for r in (0, 3))

    # One layer on one of 8 TP ranks (64 heads, 8 KV heads, head_dim 128, FFN 28672):
    layer = (8192 * (64 + 16) * 128 + 64 * 128 * 8192 + 3 * 8192 * 28672) // 8 + 2 * 8192
    assert layer == 106_971_136
    # 128256 padded to a multiple of 128 x 8 = 1024: 129024; 80 layers / PP 4 = 20 per stage.
    embedding = 129024 * 8192 // 8            # 132,120,576
    assert first.params == 20 * layer + embedding == 2_271_543_296
    assert last.params == 20 * layer + embedding + 8192  # output layer + final norm
    assert first.optimizer == first.params * 12 / 2
    # Interleaved 1F1B, rank 0: 2 (PP-1) + (v-1) PP + 1 = 11 chunks of 10 layers in flight,
    # i.e. 5.5 stage-micro-batches = Korthikanti's PP (1 + (PP-1)/(PP v)) = 4 x 1.375.
    assert first.in_flight == 5.5 == 4 * (1 + 3 / (4 * 2))
    # 36.75 s b h / t per layer (Korthikanti's GPT count is 34), 1 of it RoPE's cos and sin
    per_layer = 4096 * 2 * (4 * 8192 / 8 + (80 * 128 + 72 * 128 + 64 * 128 + 3 * 28672) / 8) \
        + 4 * 4096 * 128 * 2
    assert per_layer == 36.75 * 4096 * 8192 / 8 == 154_140_672
    chunk = 10 * per_layer + 4096 * 8192 * 2 / 8 + 4096 ** 2 + 4 * 4096 * 128
    forward = 2 * 4096 * 8192 * 2
    assert first.activations == 11 * chunk + forward == 17_389_584_384   # 16.2 GiB
    # Last rank: (v-1) PP + 1 = 5 chunks = 2.5 stage-micro-batches; it alone holds logits.
    assert last.in_flight == 2.5
    assert last.activations == 5 * chunk + forward
    assert first.logits == 0
    assert last.logits == 4096 * 129024 / 8 * 2 + 2.5 * 16 * MiB == 174_063_616
    # weight sync, 1 GiB buckets, in MiB: attention 288, FC1 896 (gathered and merged), FC2
    # 448 (gathered ahead); the last stage's output layer (2016) with FC1 and FC2 of the bucket
    # before it: 2528 and 3360 MiB, what --measure measures
    assert first.weight_sync == (288 + 2 * 896 + 448) * MiB == 2528 * MiB
    assert last.weight_sync == (2016 + 896 + 448) * MiB == 3360 * MiB


def test_layer_activations_by_recomputation_and_kernels():
    s, b, h, t, d = 4096, 1, 8192, 8, 128
    a = 64
    arch = LLAMA3_70B
    sharded = (80 + 72 + 64) * 128 + 3 * 28672
    rope = 4 * s * d * 2
    selective = s * b * 2 * (4 * h / t + sharded / t) + rope
    assert layer_activation_bytes(arch, s, b, t, True, "selective") == selective
    # without sequence parallelism the norms' inputs and outputs are whole on every TP rank
    assert layer_activation_bytes(arch, s, b, t, False, "selective") == \
        s * b * 2 * (4 * h + sharded / t) + rope
    # no recomputation: flash attention keeps its fp32 log-sum-exp per head and token; the
    # local spec's attention its fp32 softmax and bf16 probabilities per score
    assert layer_activation_bytes(arch, s, b, t, True, None) == selective + 4 * b * a / t * s
    unfused = s * b * 2 * (4 * h / t + (sharded + 2 * 28672) / t) + rope
    assert layer_activation_bytes(arch, s, b, t, True, None, fused_kernels=False) == \
        unfused + 6 * b * a / t * s * s
    assert layer_activation_bytes(arch, s, b, t, False, "full") == 2 * s * b * h
    assert layer_activation_bytes(arch, s, b, t, True, "full") == 2 * s * b * h / t


def test_full_recompute_keeps_layer_inputs_and_recomputes_one_layer_in_the_backward():
    layout = Layout(8, 4, None, 1, True, True)
    work = Workload(4096, 1, 64, "full", 2, False)
    m = stage_memory(LLAMA3_70B, 129024, layout, work, rank=0, gpu_bytes=80 * GIB,
                     reserve_bytes=0)
    sbh = 4096 * 8192
    chunk = 20 * 2 * sbh / 8 + 2 * sbh / 8 + 4096 ** 2 + 4 * 4096 * 128
    # the forward's temporaries: gathered input, row-parallel output, and the FC1 and
    # SwiGLU outputs the checkpointed layer does not keep
    forward = 2 * 2 * sbh + 3 * 4096 * 28672 / 8 * 2
    assert m.activations == 4 * chunk + forward
    recomputed = layer_activation_bytes(LLAMA3_70B, 4096, 1, 8, True, None)
    assert m.backward == max(recomputed, 129024 * 8192 / 8 * 2 + 2 * sbh + 2 * sbh / 8)


def test_weight_sync_moments_follow_the_bucket_size():
    def sync(bucket_mb, flattens=False, first=True, last=False):
        return weight_sync_bytes(LLAMA3_70B, 129024, 2, bucket_mb * MiB, flattens,
                                 embedding=first, output_layer=last, stage_bytes=40 * GIB,
                                 tp=8) / MiB
    # A = 288, F1 = 896, F2 = 448, E = 2016 MiB (see the 70B test)
    assert sync(128) == 128 + 2 * 896 + 448                 # attention flushed to the bucket
    assert sync(2048) == 2048 + 2 * 896 + 448               # a bucket beyond a layer
    assert sync(128, first=False, last=True) == 2016 + 448  # FC1 left with its own bucket
    # colocated: each bucket flattened once more; every stage receives the largest bucket
    assert sync(1024, flattens=True) == 2 * 2016 + 160      # the embedding, QKV gathered
    assert sync(1024, flattens=True, first=False) == 2 * 2016
    # a bucket that holds the whole stage holds it at the end, with the last FC1 gathered
    assert weight_sync_bytes(LLAMA3_70B, 129024, 2, 64 * GIB, False, True, True,
                             stage_bytes=40 * GIB, tp=8) == 40 * GIB + 896 * MiB
    # at TP 1 the tensors are views of the parameters but QKV's split: the QKV copies of the
    # layers a bucket takes (a layer is A + F1 + F2 = 1632 MiB)
    assert weight_sync_bytes(LLAMA3_70B, 128256, 2, 4096 * MiB, False, True, True,
                             stage_bytes=128 * GIB, tp=1) == (4096 // 1632 + 1) * 160 * MiB


@pytest.mark.parametrize("pp,vpp", [(2, 2), (4, 2), (4, 5), (8, 5)])
def test_first_stage_in_flight_matches_korthikanti_interleaved(pp, vpp):
    assert in_flight_micro_batches(0, pp, vpp, 1000) == pytest.approx(pp * (1 + (pp - 1) / (pp * vpp)))


def test_in_flight_1f1b_is_pp_minus_rank_and_capped_by_micro_batches():
    assert [in_flight_micro_batches(r, 4, None, 100) for r in range(4)] == [4, 3, 2, 1]
    assert in_flight_micro_batches(0, 8, None, 3) == 3


def test_reference_model_adds_a_copy_of_the_weights():
    layout = Layout(8, 4, None, 1, True, True)
    work = Workload(4096, 1, 64, "selective", 2, reference_model=True)
    m = stage_memory(LLAMA3_70B, 129024, layout, work, 0, 80 * GIB, 0)
    assert m.reference == m.weights


def test_colocated_sglang_weights_and_kv_cache():
    layout = Layout(8, 8, None, 1, True, True)
    work = Workload(4096, 1, 64, "selective", 2, False)
    m = stage_memory(LLAMA3_70B, 129024, layout, work, 0, 80 * GIB, 0,
                     Colocation(mem_fraction_static=0.35, engine_tp=8))
    # The bf16 HF model (unpadded vocabulary) over the server's TP 8.
    layer = (8192 * 80 * 128 + 64 * 128 * 8192 + 3 * 8192 * 28672) // 8 + 2 * 8192
    params = 80 * layer + 2 * 128256 * 8192 // 8 + 8192
    assert m.sglang_weights == 2 * params == 17_640_734_720
    assert m.sglang_kv_cache == 0.35 * 80 * GIB - 2 * params
    # K and V, 80 layers, 1 of 8 KV heads per GPU, head_dim 128, bf16: 40,960 bytes per token.
    assert kv_cache_tokens(LLAMA3_70B, m.sglang_kv_cache, 8) == int(m.sglang_kv_cache // 40960)


def test_colocated_phases_put_each_side_on_the_gpu_only_while_it_works():
    """Released SGLang and an offloaded trainer: the rollout holds SGLang's share only, the
    step the trainer only, the sync the trainer with SGLang's weights (its KV cache comes back
    after). Without either, every phase holds both: the peak is the old sum."""
    from repo_megatron.plan.memory import max_mem_fraction_static

    layout = Layout(8, 8, None, 1, True, True)
    work = Workload(4096, 1, 64, "selective", 2, False, sync_flattens=True)

    def plan(**flags):
        return stage_memory(LLAMA3_70B, 129024, layout, work, 0, 80 * GIB, 5 * GIB,
                            Colocation(mem_fraction_static=0.35, engine_tp=8, **flags))

    m = plan(releases=True, trainer_offloaded=True)
    state = m.weights + m.gradients + m.optimizer
    sglang = m.sglang_weights + m.sglang_kv_cache
    assert m.state == state
    assert m.rollout_phase == sglang + 5 * GIB
    assert m.train_phase == state + m.step + 5 * GIB
    assert m.sync_phase == state + m.weight_sync + m.sglang_weights + 5 * GIB
    assert m.total == max(m.rollout_phase, m.train_phase, m.sync_phase)
    both = plan()
    assert both.total == both.trainer + sglang + 5 * GIB
    assert m.total < both.total
    # the largest --mem-fraction-static fills the GPU in the rollout phase, no more
    ceiling = max_mem_fraction_static(m, 80 * GIB)
    assert ceiling * 80 * GIB + 5 * GIB == pytest.approx(80 * GIB)
    kept = plan(releases=True)             # the trainer stays: its state caps SGLang's share
    assert max_mem_fraction_static(kept, 80 * GIB) * 80 * GIB == pytest.approx(
        75 * GIB - kept.state)
