"""Writing tiny GGUF files for the tests: a random Llama with a cut-down copy of SmolLM2's tokenizer."""

from __future__ import annotations

from pathlib import Path

import numpy as np

#: The shape of the tiny model, as its GGUF metadata states it.
HIDDEN, FFN, LAYERS, HEADS, KV_HEADS, VOCAB = 32, 64, 2, 4, 2, 2048


def tokenizer_fields(vocab: int = VOCAB) -> dict[str, tuple[object, list]]:
    """SmolLM2's ``tokenizer.*`` metadata, cut to its first ``vocab`` tokens: ``{key: (value, types)}``.

    A byte-level BPE stays whole when cut this way: its first tokens are the specials and the bytes, and a
    merge is kept only when both parts and the merged token are among the kept tokens.
    """
    from gguf import GGUFReader

    from kvkeep.models import MODELS, find_gguf

    fields = GGUFReader(find_gguf(MODELS["smollm2"])).fields
    tokens = fields["tokenizer.ggml.tokens"].contents()[:vocab]
    kept = set(tokens)
    merges = []
    for merge in fields["tokenizer.ggml.merges"].contents():
        left, right = merge.split(" ")
        if left in kept and right in kept and left + right in kept:
            merges.append(merge)
    out = {}
    for key, field in fields.items():
        if key.startswith("tokenizer."):
            value = field.contents()
            if key == "tokenizer.ggml.tokens":
                value = tokens
            elif key == "tokenizer.ggml.token_type":
                value = value[:vocab]
            elif key == "tokenizer.ggml.merges":
                value = merges
            out[key] = (value, list(field.types))
    return out


def write_tiny_llama(path: Path, tokenizer: dict, seed: int = 0, context: int = 64) -> dict[str, np.ndarray]:
    """Write a random two-layer Llama (F32 tensors) with ``tokenizer``'s metadata; return its tensors by name."""
    import gguf

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(LAYERS)
    writer.add_context_length(context)
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_rope_dimension_count(HIDDEN // HEADS)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(VOCAB)
    for key, (value, types) in tokenizer.items():
        writer.add_key_value(key, value, types[0], sub_type=types[1] if len(types) > 1 else None)
    rng = np.random.default_rng(seed)
    head_dim = HIDDEN // HEADS
    shapes = {"token_embd.weight": (VOCAB, HIDDEN), "output_norm.weight": (HIDDEN,)}
    for i in range(LAYERS):
        shapes |= {
            f"blk.{i}.attn_norm.weight": (HIDDEN,),
            f"blk.{i}.ffn_norm.weight": (HIDDEN,),
            f"blk.{i}.attn_q.weight": (HEADS * head_dim, HIDDEN),
            f"blk.{i}.attn_k.weight": (KV_HEADS * head_dim, HIDDEN),
            f"blk.{i}.attn_v.weight": (KV_HEADS * head_dim, HIDDEN),
            f"blk.{i}.attn_output.weight": (HIDDEN, HEADS * head_dim),
            f"blk.{i}.ffn_gate.weight": (FFN, HIDDEN),
            f"blk.{i}.ffn_up.weight": (FFN, HIDDEN),
            f"blk.{i}.ffn_down.weight": (HIDDEN, FFN),
        }
    tensors = {}
    for name, shape in shapes.items():
        norm = name.endswith("norm.weight")
        tensors[name] = np.ones(shape, np.float32) if norm else (rng.standard_normal(shape) * 0.3).astype(np.float32)
        writer.add_tensor(name, tensors[name])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return tensors
