"""The family matrix: every causal-LM model type that the installed transformers registers, built tiny on a CPU
from its own config class, and checked through kvkeep (issue 18).

For each model type :func:`check` returns one row: ``refused`` (kvkeep's one-line reason, from the config
alone), ``skipped`` (the generic shrinker cannot build it tiny on a CPU: the reason), or the outcome of the
checks, ``pass`` or ``fail`` with what failed:

- ``full`` equals plain transformers (its own attention and cache) token for token;
- every policy with a budget that covers the sequence equals ``full``;
- every policy at budget 0.5 keeps its budget (in the layers the policy governs);
- a left-padded batch equals each prompt alone (H2O at 0.5);
- the static (slot) cache equals the compacting one (``full`` and H2O at 0.5), unless every layer of the
  model slides (which the static cache refuses);
- on a hybrid (sliding layers beside global ones), the serving engine gives each request (H2O at 0.5) the
  compacting path's tokens, batched.

``python tests/family_matrix.py [--markdown FILE] [--json FILE]`` runs the whole matrix and prints the table.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import warnings

import torch
import transformers as tf
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

import kvkeep
from kvkeep.engine import Request, build
from kvkeep.hf import unsupported_reason, with_cache

#: Sizes every config gets (names a config does not know become plain attributes and do no harm).
TINY = dict(
    num_hidden_layers=2, hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
    head_dim=16, vocab_size=96, max_position_embeddings=256, initializer_range=0.3, num_experts=4,
    num_local_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, n_routed_experts=4, n_shared_experts=1,
    shared_expert_intermediate_size=32, ffn_dim=96, word_embed_proj_dim=64, n_positions=256, n_ctx=256,
    rotary_dim=8, first_k_dense_replace=0, use_cache=True, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    is_decoder=True,
)  # fmt: skip
#: Sliding windows shrink to this, so the tests' prompts slide past them.
WINDOW = 12
MAX_PARAMS = 3_000_000
PROMPT, NEW = 24, 6
COVERING = {"window": {"budget": 1000}, "streaming": {"budget": 1000}, "h2o": {"budget": 1000},
            "keyformer": {"budget": 1000}, "co2": {"budget": 1000, "N": 0}}  # fmt: skip
HALF = {"window": {"budget": 0.5, "floor": 0}, "streaming": {"budget": 0.5, "floor": 0},
        "h2o": {"budget": 0.5, "floor": 0}, "keyformer": {"budget": 0.5, "floor": 0},
        "co2": {"budget": 0.5, "N": 2, "floor": 0}}  # fmt: skip


def model_types() -> list[str]:
    """Every model type with a causal-LM class in the installed transformers."""
    return sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def tiny_config(model_type: str):
    """The model type's own config class at the sizes of :data:`TINY` (a sliding window shrunk to WINDOW)."""
    config_class = tf.CONFIG_MAPPING[model_type]
    config = config_class(**{k: v for k, v in TINY.items() if k in _known_fields(config_class) or k == "is_decoder"})
    text = config.get_text_config(decoder=True)
    if getattr(text, "sliding_window", None) is not None:
        text.sliding_window = WINDOW
    return config


def _known_fields(config_class) -> set[str]:
    """The names a config class takes: its fields (dataclass configs) or arguments, and its attribute map's."""
    if dataclasses.is_dataclass(config_class):
        names = {f.name for f in dataclasses.fields(config_class)}
    else:
        names = set(inspect.signature(config_class.__init__).parameters)
    return names | set(getattr(config_class, "attribute_map", {}))


def tiny_model(config, seed: int = 0):
    torch.manual_seed(seed)
    return tf.AutoModelForCausalLM.from_config(config).eval()


def _prompt(length: int, seed: int) -> torch.Tensor:
    return torch.randint(3, 96, (1, length), generator=torch.Generator().manual_seed(seed))


def _greedy(model, ids, cache=None, mask=None) -> torch.Tensor:
    mask = torch.ones_like(ids) if mask is None else mask
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW, min_new_tokens=NEW,
                         do_sample=False, pad_token_id=0, **with_cache(model, cache))  # fmt: skip
    return out[:, ids.shape[1] :]


def _cache(model, policy: str, static: bool = False, **params):
    return kvkeep.KVKeepCache(model, policy, static=static, max_new_tokens=NEW, **params)


def _checks(config) -> list[str]:
    """What fails for this config (empty: every check passes)."""
    failed = []
    plain_model, model = tiny_model(config), tiny_model(config)
    prompt = _prompt(PROMPT, seed=1)
    plain = _greedy(plain_model, prompt)
    full = _greedy(model, prompt, _cache(model, "full"))
    if not torch.equal(full, plain):
        failed.append("full differs from transformers")
    for policy, params in COVERING.items():
        if not torch.equal(_greedy(model, prompt, _cache(model, policy, **params)), full):
            failed.append(f"{policy} with a covering budget differs from full")
    for policy, params in HALF.items():
        cache = _cache(model, policy, **params)
        _greedy(model, prompt, cache)
        if any(layer["budget"] is not None and max(layer["kept"]) > max(layer["budget"]) for layer in cache.stats()):
            failed.append(f"{policy} at 0.5 holds more than its budget")
    prompts = [_prompt(PROMPT, seed=2)[0], _prompt(PROMPT - 7, seed=3)[0]]
    ids = torch.zeros(2, PROMPT, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, p in enumerate(prompts):
        ids[row, PROMPT - len(p) :], mask[row, PROMPT - len(p) :] = p, 1
    batched = _greedy(model, ids, _cache(model, "h2o", **HALF["h2o"]), mask)
    for row, p in enumerate(prompts):
        if not torch.equal(batched[row], _greedy(model, p[None], _cache(model, "h2o", **HALF["h2o"]))[0]):
            failed.append("batched differs from alone")
            break
    text = config.get_text_config(decoder=True)
    hybrid = kvkeep.hf.window_layers(text)[0] is not None
    if hybrid or "sliding_attention" not in kvkeep.hf.layer_types(text):
        for policy, params in (("full", {}), ("h2o", HALF["h2o"])):
            static = kvkeep.generate(model, prompt, cache=_cache(model, policy, True, **params), max_new_tokens=NEW)
            compact = kvkeep.generate(model, prompt, cache=_cache(model, policy, **params), max_new_tokens=NEW)
            if not torch.equal(static.tokens, compact.tokens):
                failed.append(f"static {policy} differs from compacting")
    if hybrid and not _engine_equals_compacting(model, prompts):
        failed.append("the engine differs from compacting")
    return failed


class _Tokens:
    """A tokenizer stand-in for the engine: token ids as text."""

    def decode(self, ids, skip_special_tokens=True):
        return "".join(f"<{i}>" for i in ids)


def _engine_equals_compacting(model, prompts: list[torch.Tensor]) -> bool:
    """The engine (H2O at 0.5, two rows) serves both prompts, batched, with the compacting path's tokens."""
    policy = kvkeep.make_policy("h2o", **HALF["h2o"])
    engine = build(model, _Tokens(), policy, max_prompt=PROMPT, max_tokens=NEW, rows=2)
    served = engine.run([Request(p.tolist(), NEW) for p in prompts])
    return all(
        request.output_ids == _greedy(model, p[None], _cache(model, "h2o", **HALF["h2o"]))[0].tolist()
        for request, p in zip(served, prompts, strict=True)
    )


def check(model_type: str) -> dict:
    """One row of the matrix for ``model_type`` (see the module docstring)."""
    row = {"model_type": model_type, "class": MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type]}
    try:
        config = tiny_config(model_type)
    except Exception as err:  # the generic shrinker's limits, not kvkeep's
        return {**row, "status": "skipped", "reason": f"no tiny config: {type(err).__name__}"}
    try:
        reason = unsupported_reason(config)
    except Exception as err:  # kvkeep's check must answer every config
        return {**row, "status": "fail", "reason": f"unsupported_reason raised {type(err).__name__}: {err}"}
    if reason is not None:
        return {**row, "status": "refused", "reason": reason}
    try:
        with torch.device("meta"):
            params = sum(p.numel() for p in tf.AutoModelForCausalLM.from_config(config).parameters())
        if params > MAX_PARAMS:
            return {**row, "status": "skipped", "reason": f"{params / 1e6:.0f}M parameters at the tiny sizes"}
        plain = tiny_model(config)
        with torch.no_grad():
            plain(input_ids=_prompt(PROMPT, seed=0))
    except Exception as err:
        return {**row, "status": "skipped", "reason": f"does not build tiny: {type(err).__name__}"}
    try:
        failed = _checks(config)
    except Exception as err:
        failed = [f"{type(err).__name__}: {' '.join(str(err).split())[:160]}"]
    return {**row, "status": "fail" if failed else "pass", "reason": "; ".join(failed)}


def markdown(rows: list[dict]) -> str:
    """The families page: the model types that pass, those refused with their reasons, and those not built."""
    passed = ", ".join(f"`{r['model_type']}`" for r in rows if r["status"] == "pass")
    lines = [f"**Pass ({sum(r['status'] == 'pass' for r in rows)})**: {passed}.", "",
             "**Refused**, from the config alone, before any weight loads:", "",
             "| model type | because |", "|---|---|"]  # fmt: skip
    lines += [f"| `{r['model_type']}` | {r['reason']} |" for r in rows if r["status"] == "refused"]
    lines += ["", "**Not built tiny** by the matrix's generic shrinker, so untested (kvkeep does not refuse them):", "",
              "| model type | why |", "|---|---|"]  # fmt: skip
    lines += [f"| `{r['model_type']}` | {r['reason']} |" for r in rows if r["status"] == "skipped"]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json")
    parser.add_argument("--markdown")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    tf.logging.set_verbosity_error()
    rows = []
    for model_type in model_types():
        rows.append(check(model_type))
        print(json.dumps(rows[-1]), flush=True)
    counts = {s: sum(r["status"] == s for r in rows) for s in ("pass", "fail", "refused", "skipped")}
    print(f"transformers {tf.__version__}: {counts}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"transformers": tf.__version__, "rows": rows}, f, indent=1)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(markdown(rows) + "\n")


if __name__ == "__main__":
    main()
