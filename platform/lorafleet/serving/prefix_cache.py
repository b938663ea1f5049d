"""Automatic prefix caching: the keys and values of prompts' first tokens, kept across requests.

Most requests to a chat model begin alike: the chat template's system prompt, a tenant's house instructions, the
earlier turns of a conversation. Their keys and values in every attention layer depend only on those tokens, the
position they start at (always 0 here) and the adapters the request is routed through, so a request whose prompt
begins as an earlier one's can skip computing them: its prefill runs only the tokens after the cached start.
vLLM's automatic prefix caching and SGLang's radix cache do the same on GPUs; here it also works on the CPU.

**Blocks.** A prompt is cut into blocks of ``block_tokens`` tokens. Block ``i`` is stored under a key that hashes
(sha256) the salt, the routing signature and *every* token up to the block's end, so a block is found only
after the same whole start, and each block is stored once however many prompts share it (a chain, as vLLM's
block hashes). ``lookup`` returns the longest run of cached blocks that leaves at least one token of the prompt
to run (the first generated token needs that token's logits).

**What keys a block.**
- The *routing signature* (``DecodeBatch`` makes it): for each route of the row, the weights file's sha256 of the
  adapter in that slot, its LoRA scaling and the route's weight; empty for the base model. A slot reloaded with
  another version gives another signature, so a stale block is never used; a slot whose weights may change
  (trained in place, no content hash) is not cached at all, nor is a bank with slots merged into the base.
- The *salt*: the engine salts with the tenant's id, so one tenant's requests never reuse (or time) another's
  cached prompts.

**Memory.** At most ``max_bytes`` of keys and values (on the model's device); the least recently used blocks go
first. A hit is exact up to float rounding: the cached keys and values are those the same tokens computed in an
earlier forward, possibly batched with other rows (the tests compare logits and greedy tokens with and
without the cache).
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch

#: tokens per cached block (a SmolLM2 chat prompt's template start, up to the user's text, is about 3 blocks)
DEFAULT_BLOCK_TOKENS = 8
#: the engine's default budget for cached keys and values
DEFAULT_PREFIX_CACHE_BYTES = 256 * 1024 * 1024


@dataclass(frozen=True)
class CachedBlock:
    """One block's keys and values in every attention layer, each ``[kv_heads, block_tokens, head_dim]``."""

    keys: tuple[torch.Tensor, ...]
    values: tuple[torch.Tensor, ...]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))


@dataclass
class PrefixCacheStats:
    """Counters since the cache was made: prompt tokens looked up, of them found cached, blocks stored and
    evicted."""

    lookup_tokens: int = 0
    hit_tokens: int = 0
    stored_blocks: int = 0
    evicted_blocks: int = 0

    @property
    def hit_rate(self) -> float:
        return self.hit_tokens / self.lookup_tokens if self.lookup_tokens else 0.0


class PrefixCache:
    """Blocks of prompts' keys and values by (salt, routing signature, tokens so far); see the module docstring.
    Not thread-safe: the engine uses it under its model lock, as it does the model."""

    def __init__(
        self, max_bytes: int = DEFAULT_PREFIX_CACHE_BYTES, *, block_tokens: int = DEFAULT_BLOCK_TOKENS
    ):
        if max_bytes < 0 or block_tokens < 1:
            raise ValueError("max_bytes must be >= 0 and block_tokens >= 1")
        self.max_bytes, self.block_tokens = max_bytes, block_tokens
        self._blocks: OrderedDict[bytes, CachedBlock] = OrderedDict()
        self.nbytes = 0
        self.stats = PrefixCacheStats()

    def __len__(self) -> int:
        return len(self._blocks)

    def block_keys(self, salt: str, signature: str, prompt: Sequence[int], n_blocks: int) -> list[bytes]:
        """The keys of the prompt's first ``n_blocks`` blocks (each hashes everything before its end)."""
        digest = hashlib.sha256(f"{len(salt)}:{salt}|{len(signature)}:{signature}|".encode())
        keys = []
        for i in range(n_blocks):
            block = prompt[i * self.block_tokens : (i + 1) * self.block_tokens]
            digest.update(array("q", block).tobytes())
            keys.append(digest.copy().digest())
        return keys

    def lookup(self, salt: str, signature: str, prompt: Sequence[int]) -> list[CachedBlock]:
        """The longest run of cached blocks at the prompt's start that leaves at least one token to run (most
        recently used from now on); empty on a miss."""
        usable = (len(prompt) - 1) // self.block_tokens
        found: list[CachedBlock] = []
        for key in self.block_keys(salt, signature, prompt, usable):
            block = self._blocks.get(key)
            if block is None:
                break
            self._blocks.move_to_end(key)
            found.append(block)
        self.stats.lookup_tokens += len(prompt)
        self.stats.hit_tokens += len(found) * self.block_tokens
        return found

    def store(
        self,
        salt: str,
        signature: str,
        prompt: Sequence[int],
        keys: Sequence[torch.Tensor],
        values: Sequence[torch.Tensor],
        *,
        cached_blocks: int = 0,
    ) -> None:
        """Keep the prompt's whole blocks after its first ``cached_blocks`` (already cached). ``keys[layer]`` and
        ``values[layer]`` are ``[kv_heads, tokens, head_dim]`` from the first of those blocks on (at least up to
        the last whole block; ``new_blocks`` says which tokens), copied here: the caller's tensors may be views of
        a batch's cache."""
        n_blocks = len(prompt) // self.block_tokens
        if n_blocks <= cached_blocks or self.max_bytes == 0:
            return
        width = self.block_tokens
        for i, key in enumerate(self.block_keys(salt, signature, prompt, n_blocks)):
            if i < cached_blocks or key in self._blocks:
                continue
            span = slice((i - cached_blocks) * width, (i - cached_blocks + 1) * width)
            block = CachedBlock(
                tuple(k[:, span].clone() for k in keys), tuple(v[:, span].clone() for v in values)
            )
            self._blocks[key] = block
            self.nbytes += block.nbytes
            self.stats.stored_blocks += 1
        while self.nbytes > self.max_bytes and self._blocks:
            _, gone = self._blocks.popitem(last=False)
            self.nbytes -= gone.nbytes
            self.stats.evicted_blocks += 1

    def new_blocks(self, prompt_tokens: int, cached_blocks: int) -> slice:
        """The prompt's token positions ``store`` reads: its whole blocks after the first ``cached_blocks``."""
        return slice(
            cached_blocks * self.block_tokens, prompt_tokens // self.block_tokens * self.block_tokens
        )

    def snapshot(self) -> dict[str, int]:
        """The counters (``PrefixCacheStats``), and the blocks held and their bytes: what ``/metrics`` and a Serve
        replica's stats report."""
        return {**asdict(self.stats), "blocks": len(self._blocks), "bytes": self.nbytes}

    def clear(self) -> None:
        self._blocks.clear()
        self.nbytes = 0


__all__ = [
    "DEFAULT_BLOCK_TOKENS",
    "DEFAULT_PREFIX_CACHE_BYTES",
    "CachedBlock",
    "PrefixCache",
    "PrefixCacheStats",
]
