"""lm-evaluation-harness through a kvkeep cache: the model ``kvkeep`` of ``lm_eval`` (needs ``lm-eval``).

    kvkeep lm-eval --model_args pretrained=smollm2,policy=keyformer,budget=0.5,tau_end=2 --tasks TASK --device cpu

:class:`KVKeepLM` is lm_eval's ``HFLM`` with the model loaded by kvkeep (registry names, folders, GGUF files,
hub ids) and every generation run through a fresh :class:`~kvkeep.cache.KVKeepCache`.  Model arguments:
``pretrained``, ``policy``, ``budget``, any parameter of the policy (``tau_end``, ``alpha``, ``N``, ``rho``,
``recent_ratio``, ``sinks``, ...), ``prefill_chunk`` and ``kv_log``; the others go to ``HFLM``.

Which tasks exercise eviction: ``generate_until`` tasks, whose prompt is compressed after the prefill and
whose answer is generated over the kept tokens.  Log-likelihood tasks (``loglikelihood``,
``multiple_choice``, ``loglikelihood_rolling``) score the whole context in one forward pass, which attends to
every token before anything is evicted: they measure nothing of a policy unless ``prefill_chunk=N`` feeds
the context in chunks of N tokens through the cache, each chunk attending to what the earlier ones kept.

Every cache's bytes go to :attr:`KVKeepLM.kv_records` (and, with ``kv_log=PATH``, one JSON line each).
"""

from __future__ import annotations

import dataclasses
import json
import logging

import torch
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM

from ..cache import KVKeepCache
from ..hf import with_cache
from ..models import load_model
from ..policies import POLICIES, make_policy

__all__ = ["KVKeepLM"]

log = logging.getLogger("kvkeep")


@register_model("kvkeep")
class KVKeepLM(HFLM):
    """``HFLM`` generating through a :class:`~kvkeep.cache.KVKeepCache` (see the module docstring)."""

    def __init__(
        self,
        pretrained="smollm2",
        policy: str = "full",
        budget: float | int | None = None,
        prefill_chunk: int | None = None,
        kv_log: str | None = None,
        device: str | None = None,
        dtype: str | None = None,
        **kwargs,
    ) -> None:
        if policy not in POLICIES:
            raise ValueError(f"unknown policy {policy!r}: choose one of {', '.join(POLICIES)}")
        names = {f.name for cls in POLICIES.values() for f in dataclasses.fields(cls)} - {"budget"}
        self.policy_params = {k: kwargs.pop(k) for k in list(kwargs) if k in names}
        make_policy(policy, budget, **self.policy_params)  # checks them (another policy's too) before loading
        if prefill_chunk is not None and int(prefill_chunk) < 1:
            raise ValueError(f"prefill_chunk must be >= 1, got {prefill_chunk}")
        if not isinstance(pretrained, str):
            raise ValueError("pretrained must be a model name, folder or file for the kvkeep model")
        model, tokenizer = load_model(pretrained, dtype=dtype, device=None if device in (None, "cuda:0") else device)
        kwargs.pop("tokenizer", None)
        super().__init__(pretrained=model, tokenizer=tokenizer, backend="causal", **kwargs)
        self.policy_name, self.budget = policy, budget
        self.prefill_chunk = None if prefill_chunk is None else int(prefill_chunk)
        self.kv_log = kv_log
        self.kv_records: list[dict] = []

    def _cache(self, max_new_tokens: int | None = None) -> KVKeepCache:
        return KVKeepCache(
            self.model, self.policy_name, self.budget, max_new_tokens=max_new_tokens, **self.policy_params
        )

    def _record(self, kind: str, cache: KVKeepCache, prompt_tokens: int) -> None:
        kept, full = map(sum, zip(*cache.sequence_bytes(), strict=True))
        record = {"kind": kind, "prompt_tokens": prompt_tokens, "kv_bytes": kept, "kv_bytes_full": full}
        self.kv_records.append(record)
        if self.kv_log:
            with open(self.kv_log, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")

    def _model_generate(self, context, max_length: int, stop: list[str], **generation_kwargs) -> torch.Tensor:
        """``HFLM``'s generation with a fresh kvkeep cache (its bytes recorded at the end)."""
        cache = self._cache(max_new_tokens=max(1, max_length - context.shape[1]))
        out = super()._model_generate(context, max_length, stop, **generation_kwargs, **with_cache(self.model, cache))
        self._record("generate", cache, context.shape[1])
        return out

    def generate_until(self, requests, disable_tqdm: bool = False):
        out = super().generate_until(requests, disable_tqdm)
        log.warning(self.kv_summary())
        return out

    def _model_call(self, inps: torch.Tensor, attn_mask=None, labels=None) -> torch.Tensor:
        """Logits ``[batch, sequence, vocab]``; with ``prefill_chunk`` the sequence goes through a kvkeep cache in
        chunks (right padding, as ``HFLM`` batches, only follows the real tokens: batch size 1 is exact)."""
        if self.prefill_chunk is None or attn_mask is not None:
            return super()._model_call(inps, attn_mask, labels)
        cache = self._cache()
        logits = []
        precision = self.mixed_precision_dtype  # as HFLM's own forward
        with torch.no_grad(), torch.autocast(self.device.type, dtype=precision, enabled=precision is not None):
            for start in range(0, inps.shape[1], self.prefill_chunk):
                chunk = inps[:, start : start + self.prefill_chunk]
                positions = torch.arange(start, start + chunk.shape[1], device=inps.device).expand(chunk.shape[0], -1)
                out = self.model(
                    input_ids=chunk, position_ids=positions, use_cache=True, **with_cache(self.model, cache)
                )
                logits.append(out.logits)
        self._record("loglikelihood", cache, inps.shape[1])
        return torch.cat(logits, dim=1)

    def kv_summary(self) -> str:
        """One line: how many caches, and the share of the full-attention KV bytes they kept."""
        kept = sum(r["kv_bytes"] for r in self.kv_records)
        full = sum(r["kv_bytes_full"] for r in self.kv_records)
        share = f"{100 * kept / full:.1f}%" if full else "-"
        return (
            f"kvkeep {self.policy_name} (budget {self.budget}): {len(self.kv_records)} caches, KV kept {share} of full"
        )
