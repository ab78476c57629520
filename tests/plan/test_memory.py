"""The memory formulas against figures computed by hand (the arithmetic is spelled out)."""

import pathlib

import pytest

from repo_megatron.models.architecture import parse_hf_config, read_architecture
from repo_megatron.plan.memory import (GIB, Colocation, Layout, Workload, in_flight_micro_batches,
                                       kv_cache_tokens, layer_activation_bytes, stage_memory)

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
    # Korthikanti selective + SP: 34 s b h / t per layer, 1 micro-batch in flight without PP.
    assert m.in_flight == 1
    assert m.activations == 32 * 34 * 2048 * 2 * 4096 / 2 == 9_126_805_504
    # logits [s, b, V/t] + their gradient in bf16, plus three 16 MiB fp32 log-prob chunks
    assert m.logits == 2 * 2048 * 2 * 32000 / 2 * 2 + 3 * 16 * MiB
    assert m.total == pytest.approx(6_738_681_856 + 13_477_363_712 + 10_108_022_784
                                    + 9_126_805_504 + 312_475_648 + 5 * GIB)


def test_70b_tp8_pp4_vpp2_dp2_by_hand():
    layout = Layout(tensor=8, pipeline=4, virtual=2, data=2, sequence_parallel=True,
                    distributed_optimizer=True)
    work = Workload(seq_length=4096, micro_batch_size=1, num_micro_batches=256,
                    recompute="selective", params_bytes=2, reference_model=False)
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
    per_layer = 34 * 4096 * 1 * 8192 / 8      # 142,606,336 bytes (selective, SP)
    assert first.activations == 5.5 * 20 * per_layer == 15_686_696_960
    # Last rank: (v-1) PP + 1 = 5 chunks = 2.5 stage-micro-batches; it alone holds logits.
    assert last.in_flight == 2.5
    assert last.activations == 2.5 * 20 * per_layer
    assert first.logits == 0
    assert last.logits == 2 * 4096 * 129024 / 8 * 2 + 3 * 16 * MiB == 314_572_800


def test_activation_formulas_of_korthikanti_table_2():
    s, b, h, a, t = 4096, 1, 8192, 64, 8
    sbh = s * b * h
    arch = LLAMA3_70B
    assert layer_activation_bytes(arch, s, b, 1, False, None) == sbh * (34 + 5 * a * s / h)
    assert layer_activation_bytes(arch, s, b, t, False, None) == \
        sbh * (10 + 24 / t + 5 * a * s / (h * t))
    assert layer_activation_bytes(arch, s, b, t, True, None) == sbh / t * (34 + 5 * a * s / h)
    assert layer_activation_bytes(arch, s, b, t, True, "selective") == sbh / t * 34
    assert layer_activation_bytes(arch, s, b, t, False, "full") == 2 * sbh
    assert layer_activation_bytes(arch, s, b, t, True, "full") == 2 * sbh / t


def test_full_recompute_keeps_layer_inputs_plus_one_layer_being_recomputed():
    layout = Layout(8, 4, None, 1, True, True)
    work = Workload(4096, 1, 64, "full", 2, False)
    m = stage_memory(LLAMA3_70B, 129024, layout, work, rank=0, gpu_bytes=80 * GIB,
                     reserve_bytes=0)
    sbh = 4096 * 8192
    assert m.activations == 4 * 20 * 2 * sbh / 8 + sbh / 8 * (34 + 5 * 64 * 4096 / 8192)


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
