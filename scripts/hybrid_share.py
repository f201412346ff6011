"""How much KV memory a budget saves on a hybrid sliding/global model (Gemma 3 270M's layout, random weights).

Gemma 3 270M: 18 layers, 15 sliding over a 512-token window and 3 global, 1 KV head of dimension 256.  The
budget governs the global layers only; this prints, per prompt length, the bytes held after the prompt and
one new token under h2o at budget 0.5, against what full attention holds (sliding layers at their window).

    python scripts/hybrid_share.py [--prompts 460,2000] [--budget 0.5]
"""

from __future__ import annotations

import argparse

import torch
import transformers as tf

import kvkeep


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", default="460,2000")
    parser.add_argument("--budget", type=float, default=0.5)
    args = parser.parse_args()
    config = tf.Gemma3TextConfig(
        vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=18, num_attention_heads=4,
        num_key_value_heads=1, head_dim=256, sliding_window=512, max_position_embeddings=4096,
    )  # fmt: skip
    torch.manual_seed(0)
    model = tf.Gemma3ForCausalLM(config).eval()
    sliding = sum(t == "sliding_attention" for t in config.layer_types)
    print(f"Gemma 3 270M layout: {config.num_hidden_layers} layers, {sliding} sliding ({config.sliding_window}), "
          f"h2o budget {args.budget}")  # fmt: skip
    print("prompt tokens | KV bytes kept / full | share of full's bytes in the global layers")
    for n in (int(x) for x in args.prompts.split(",")):
        cache = kvkeep.KVKeepCache(model, "h2o", budget=args.budget)
        ids = torch.randint(3, config.vocab_size, (1, n))
        kvkeep.generate(model, ids, cache=cache, max_new_tokens=2)
        held = min(n + 1, config.sliding_window)  # what a sliding layer holds under full attention
        globals_ = config.num_hidden_layers - sliding
        share = globals_ * (n + 1) / (globals_ * (n + 1) + sliding * held)
        print(f"{n:13d} | {cache.nbytes() / cache.full_nbytes():20.4f} | {share:.0%}")


if __name__ == "__main__":
    main()
