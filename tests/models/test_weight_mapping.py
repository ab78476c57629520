"""The layout transforms, alone: each is the inverse of its partner and produces Megatron's
documented layout."""

import torch

from repo_megatron.models import weight_mapping


def _rows(n: int, start: int = 0) -> torch.Tensor:
    """[n, 2] rows whose first column is the row's id, to read layouts off the result."""
    ids = torch.arange(start, start + n, dtype=torch.float32)
    return torch.stack([ids, -ids], dim=1)


def test_qkv_interleaved_per_query_group():
    # 4 query heads, 2 groups, head_dim 1: q = 0..3, k = 10..11, v = 20..21.
    qkv = weight_mapping.interleave_qkv(_rows(4), _rows(2, 10), _rows(2, 20), num_query_groups=2)
    assert qkv[:, 0].tolist() == [0, 1, 10, 20, 2, 3, 11, 21]


def test_split_qkv_inverts_interleave_for_weights_and_biases():
    heads, groups, head_dim, hidden = 8, 2, 3, 5
    q = torch.randn(heads * head_dim, hidden)
    k, v = torch.randn(groups * head_dim, hidden), torch.randn(groups * head_dim, hidden)
    for tensors in ((q, k, v), (q[:, 0], k[:, 0], v[:, 0])):
        fused = weight_mapping.interleave_qkv(*tensors, groups)
        back = weight_mapping.split_qkv(fused, heads, groups, head_dim)
        assert all(torch.equal(a, b) for a, b in zip(back, tensors))


def test_split_qkv_of_a_tp_shard_is_its_groups():
    """TP splits the fused rows into whole query groups: rank 1 of 2 holds group 1."""
    heads, groups, head_dim = 4, 2, 2
    q, k, v = _rows(heads * head_dim), _rows(groups * head_dim, 100), _rows(groups * head_dim, 200)
    shard = weight_mapping.interleave_qkv(q, k, v, groups).chunk(2)[1]
    q1, k1, v1 = weight_mapping.split_qkv(shard, heads // 2, 1, head_dim)
    assert torch.equal(q1, q[4:]) and torch.equal(k1, k[2:]) and torch.equal(v1, v[2:])


def test_gate_up_split_and_tp_merge():
    gate, up = _rows(4), _rows(4, 100)
    fc1 = torch.cat([gate, up])
    assert all(torch.equal(a, b) for a, b in zip(weight_mapping.split_gate_up(fc1), (gate, up)))
    # TP rank i holds [gate_i; up_i]; merging the shards gives back cat(gate, up).
    shards = [torch.cat([g, u]) for g, u in zip(gate.chunk(2), up.chunk(2))]
    assert torch.equal(weight_mapping.merge_tp_gate_up(shards), fc1)


def test_vocab_padding_is_zero_rows_and_truncation_inverts_it():
    emb = torch.randn(10, 3)
    pieces = weight_mapping.pad_vocab_rows(emb, 16)
    assert pieces[0] is emb and torch.equal(pieces[1], torch.zeros(6, 3))
    assert torch.equal(weight_mapping.truncate_vocab_rows(torch.cat(pieces), 10), emb)
    assert weight_mapping.pad_vocab_rows(emb, 10) == [emb]


def test_transforms_plan_shapes_on_meta_tensors():
    q = torch.empty(8, 4, device="meta")
    kv = torch.empty(4, 4, device="meta")
    assert weight_mapping.interleave_qkv(q, kv, kv, 2).shape == (16, 4)
    assert [p.shape for p in weight_mapping.pad_vocab_rows(q, 12)] == [(8, 4), (4, 4)]


def test_piece_shapes_on_row_ids_equal_meta_tensor_shapes():
    """Planning on row ids (no meta kernels, no torch._dynamo import) gives the shapes that
    ``to_megatron`` gives on meta tensors, for every family, with GQA, biases, QK norms and
    a padded vocabulary."""
    from repo_megatron.models.architecture import parse_hf_config

    for arch_name, model_type in (("LlamaForCausalLM", "llama"), ("MistralForCausalLM", "mistral"),
                                  ("Qwen2ForCausalLM", "qwen2"), ("Qwen3ForCausalLM", "qwen3")):
        arch = parse_hf_config({
            "architectures": [arch_name], "model_type": model_type, "hidden_act": "silu",
            "num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 96,
            "num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": 8,
            "vocab_size": 1003, "max_position_embeddings": 128, "rms_norm_eps": 1e-6,
            "rope_theta": 10000.0, "tie_word_embeddings": False})
        dims = weight_mapping.ModelDims(arch, 1024)
        for m in weight_mapping.mappings_for(arch):
            metas = [torch.empty(s, dtype=torch.bfloat16, device="meta")
                     for s in m.hf_shapes(arch)]
            expected = [tuple(p.shape) for p in m.to_megatron(dims, metas)]
            assert weight_mapping.megatron_piece_shapes(m, dims, torch.bfloat16) == expected, \
                (model_type, m.megatron)
