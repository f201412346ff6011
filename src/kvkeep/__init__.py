"""kvkeep: keep only the KV-cache tokens that matter, and physically drop the rest.

import kvkeep
model, tok = kvkeep.load_model("smollm2")
cache = kvkeep.KVKeepCache(model, policy="keyformer", budget=0.5)
out = model.generate(**tok(prompts, return_tensors="pt", padding=True), past_key_values=cache,
                     max_new_tokens=128)
"""

from .adapters import SUPPORTED, install
from .cache import KVKeepCache, KVKeepLayer
from .generation import Generation, generate
from .models import load_model
from .policies import POLICIES, Policy, make_policy

__version__ = "0.1.0"

__all__ = [
    "POLICIES",
    "SUPPORTED",
    "KVKeepCache",
    "Generation",
    "KVKeepLayer",
    "Policy",
    "__version__",
    "generate",
    "install",
    "load_model",
    "make_policy",
]
