"""Keys of full KV pages for automatic prefix caching (kv_cache.PagePool holds the cache itself).

A page's key is (hash, parent hash, its tokens): the hash chains its parent page's hash with its own tokens,
so equal hashes mean equal prefixes, and a lookup also compares the parent hash and the tokens, so a hash
collision is a miss, never wrong KV. Python's hash of a tuple of ints is the same in every process (no hash
seed for ints), as multi-host followers need: they repeat the leader's scheduling.
"""
from __future__ import annotations

ROOT = 0x6E616E6F   # the parent hash of a sequence's first page


def extend_keys(keys: list[tuple], token_at, num_tokens: int, page_size: int) -> list[tuple]:
  """Appends to `keys` the keys of the full pages among the first `num_tokens` tokens (token_at(i) gives
  token i) that it does not have yet; returns it."""
  for j in range(len(keys), num_tokens // page_size):
    toks = tuple(token_at(i) for i in range(j * page_size, (j + 1) * page_size))
    parent = keys[-1][0] if keys else ROOT
    keys.append((hash((parent, toks)), parent, toks))
  return keys


def same_page(stored: tuple, wanted: tuple) -> bool:
  return stored[1] == wanted[1] and stored[2] == wanted[2]
