"""A request's prompt as token ids: checked before any tokenising, tokenised off the event loop.

A prompt's text is refused before it is tokenised when it cannot fit: no token of the tokenizer covers more
than ``longest`` characters, so a text of more than ``max_prompt * longest`` characters has more than
``max_prompt`` tokens.  Text that is not valid Unicode (a lone surrogate, which JSON can carry) and token ids
outside the model's vocabulary are refused too, each with a 400 that names the field.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

from .protocol import APIError


class Prompts:
    """Token ids of completion prompts and chat conversations for one tokenizer and one engine's limits.

    Args:
        tokenizer: the model's tokenizer (its chat template for chat).
        vocab: the model's vocabulary size: token ids must lie in ``[0, vocab)``.
        max_prompt: the most prompt tokens the engine takes.
    """

    def __init__(self, tokenizer, vocab: int, max_prompt: int):
        self.tokenizer, self.vocab, self.max_prompt = tokenizer, vocab, max_prompt
        self.longest = max((len(token) for token in tokenizer.get_vocab()), default=1)
        self.max_chars = max_prompt * max(self.longest, 1)
        # One thread: a tokenizer is not made for concurrent calls, and the event loop stays free meanwhile.
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="kvkeep-tokenize")

    def check_text(self, text: str, field: str) -> None:
        """A 400 for text that is not valid Unicode or that has more characters than the prompt limit holds."""
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as err:
            raise APIError(
                400, f"{field} is not valid Unicode (a lone surrogate at character {err.start}): send UTF-8 text",
                param=field,
            ) from None  # fmt: skip
        self.check_length(len(text), field)

    def check_length(self, chars: int, field: str) -> None:
        """A 400 when ``chars`` characters cannot fit the prompt limit."""
        if chars > self.max_chars:
            raise APIError(
                400, f"{field} has {chars} characters: more than this server's limit of {self.max_prompt} tokens "
                f"can hold (a token here is at most {self.longest} characters; --max-prompt-tokens)",
                param=field,
            )  # fmt: skip

    def check_ids(self, ids: list[int], field: str = "prompt") -> list[int]:
        """``ids``, or a 400 naming the first id outside ``[0, vocab)``."""
        for i, token in enumerate(ids):
            if not 0 <= token < self.vocab:
                raise APIError(
                    400, f"{field}[{i}] = {token} is not a token id of this model: ids lie in [0, {self.vocab - 1}]",
                    param=field,
                )  # fmt: skip
        return ids

    async def completion(self, prompt: str | list) -> list[int]:
        """The token ids of a completion prompt: a string, token ids, or a list of one of either."""
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str | list):
            if len(prompt) != 1:
                raise APIError(400, "give one prompt per request (batching is the server's job)", param="prompt")
            prompt = prompt[0]
        if isinstance(prompt, list):
            return self.check_ids(prompt)
        self.check_text(prompt, "prompt")
        return await self._run(lambda: list(self.tokenizer(prompt, verbose=False)["input_ids"]))

    async def chat(self, messages: list[dict]) -> list[int]:
        """The token ids of a conversation under the chat template, with the assistant's turn opened."""
        for i, message in enumerate(messages):
            self.check_text(message["content"], f"messages.{i}.content")
        self.check_length(sum(len(message["content"]) for message in messages), "messages")

        def encode() -> list[int]:
            ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
            return list(ids["input_ids"] if hasattr(ids, "keys") else ids)

        return await self._run(encode)

    async def _run(self, work):
        return await asyncio.get_running_loop().run_in_executor(self.pool, work)

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
