"""The frozen prefix: below the lowest adapted layer nothing depends on an adapter, so compute it once per example.

When every adapter a forward uses sits at decoder layer >= L, the hidden states entering layer L are the frozen
base model's, whatever the adapters: a training job computes them once per example and runs each step through
layers L.. only; QA scores the same rows under several columns (base, previous, candidate, mixtures) and shares
them too. With SmolLM2 (30 layers) and adapters on the top 10 (the default), a step runs a third of the full depth.

Three parts:

- :class:`DecoderSplit` sees a decoder-only causal LM as ``embed -> layers[:L] -> layers[L:] -> norm -> head``. It
  captures what the upper layers are called with (causal mask, rotary position embeddings, position ids) from the
  model's own forward, with a pre-hook that stops it at the right layer, so masks and positions are computed by
  transformers' code, not re-implemented here. :meth:`DecoderSplit.find` checks the split against the model's
  full forward once (logits equal within fp tolerance) and returns None for a model it does not fit; callers
  then take the full path.
- :class:`PrefixCache` keeps per-example states keyed by the backbone's identity (fingerprint, quantisation,
  device), the layer and the token ids, so a later round reuses them for replayed records. It is bounded: past
  its memory budget the least recently used entries spill to disk, past the disk budget they are dropped and
  recomputed when needed. It never fails a job.
- :class:`FrozenPrefix` ties them: ``states(layer, sequences)`` returns each sequence's ``[len, hidden]`` states,
  computing the misses in batches of similar length.

Only positions that carry a loss need logits (SmolLM2's output head costs as much as about 8 of its layers per
token): :meth:`DecoderSplit.head` takes the gathered hidden states of those positions only.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import tempfile
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from lorafleet.adapters.bank import layer_of
from lorafleet.adapters.injection import model_base_only

if TYPE_CHECKING:
    from lorafleet.adapters import AdapterBank
    from lorafleet.backbone import Backbone

logger = logging.getLogger(__name__)

DEFAULT_MEMORY_BUDGET = 512 * 2**20
DEFAULT_DISK_BUDGET = 4 * 2**30
#: rows per forward when computing missing prefix states
PREFIX_BATCH_ROWS = 32
_SPLIT_CHECK_TOLERANCE = 1e-3


def lowest_adapted_layer(bank: AdapterBank, slots: Iterable[int], num_layers: int) -> int:
    """The lowest decoder layer any of ``slots`` has weights on (``num_layers`` when none; 0 when unknown)."""
    lowest = num_layers
    for slot in set(slots):
        info = bank.slot_info(slot)
        if info is None:
            continue
        for module in info.modules:
            layer = layer_of(module)
            if layer is None:  # an adapted module outside the layer stack: nothing below it is frozen
                return 0
            lowest = min(lowest, layer)
    return lowest


#: the fewest tokens every row of a batch must begin with for that start to run once per route rather than in
#: every row (scoring and training: ``DecoderSplit.run_from_shared``; decoding: ``DecodeBatch.join``)
MIN_SHARED_START = 8


def common_start(sequences: Sequence[Sequence[int]]) -> int:
    """How many tokens every one of ``sequences`` begins with (a chat template's system prompt, say)."""
    if not sequences:
        return 0
    first = sequences[0]
    length = min(len(s) for s in sequences)
    for seq in sequences[1:]:
        length = next((i for i in range(length) if seq[i] != first[i]), length)
    return length


def route_groups(keys: Sequence[Hashable]) -> tuple[list[int], list[int]]:
    """Rows grouped by their routing ``keys``: each row's group (numbered in order of first appearance) and the
    first row of each group."""
    groups: dict[Hashable, int] = {}
    owners = [groups.setdefault(key, len(groups)) for key in keys]
    return owners, [owners.index(g) for g in range(len(groups))]


class _Stop(Exception):
    """Raised by a capture hook to end a forward once the wanted inputs are seen."""


#: logits at some positions of a check's batch ``[n, vocab]``, and which positions ``[batch, seq]`` bool
_Checked = tuple[torch.Tensor, torch.Tensor]


@dataclass
class _Captured:
    hidden: torch.Tensor | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)


class _SharedStart:
    """What the attention layers see as their cache when rows' shared start runs once (``run_from_shared``):
    first each layer's keys and values of the start are recorded, one row per group; then each row's own keys
    and values follow its group's start (``owners``: the group of each row)."""

    def __init__(self, owners: torch.Tensor) -> None:
        self.owners = owners  # [batch]
        self.recording = True
        self._start: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def update(
        self, keys: torch.Tensor, values: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``[rows, kv_heads, seq, head_dim]`` keys and values to attend to, as a transformers cache returns."""
        if self.recording:
            self._start[layer_idx] = (keys, values)
            return keys, values
        start_keys, start_values = self._start[layer_idx]
        return (
            torch.cat([start_keys.index_select(0, self.owners), keys], dim=-2),
            torch.cat([start_values.index_select(0, self.owners), values], dim=-2),
        )


def _cache_kwarg(kwargs: dict[str, Any]) -> str:
    """The name a decoder layer takes its KV cache by (``cache`` in transformers 5.x, ``past_key_values`` before)."""
    return "cache" if "cache" in kwargs else "past_key_values"


class DecoderSplit:
    """A decoder-only causal LM cut at a layer: the frozen part below, the adapted part above."""

    def __init__(self, model: nn.Module, decoder: nn.Module, layers: nn.ModuleList, norm: nn.Module) -> None:
        self.model, self.decoder, self.layers, self.norm = model, decoder, layers, norm
        #: whether :meth:`run_from_shared` may be used (checked against the full forward by :meth:`find`)
        self.shares_starts = True
        head = model.get_output_embeddings()  # type: ignore[operator]
        if head is None:
            raise ValueError("the model has no output head")
        self.head_module: nn.Module = head

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @classmethod
    def find(cls, model: nn.Module, *, check: bool = True) -> DecoderSplit | None:
        """The split of a Llama-like model (``decoder.layers`` + ``decoder.norm``), checked against its full
        forward; None when the model does not fit (callers then run the whole model)."""
        get_decoder = getattr(model, "get_decoder", None)
        decoder = get_decoder() if callable(get_decoder) else getattr(model, "model", None)
        layers = getattr(decoder, "layers", None)
        norm = getattr(decoder, "norm", None)
        if not isinstance(decoder, nn.Module) or not isinstance(layers, nn.ModuleList) or norm is None:
            return None
        try:
            split = cls(model, decoder, layers, norm)
        except (ValueError, AttributeError):
            return None
        if check and not split._matches_full_forward():
            logger.warning(
                "frozen-prefix split does not reproduce %s's logits: prefix cache off", type(model).__name__
            )
            return None
        if check and not split._shared_start_matches():
            logger.warning(
                "shared starts do not reproduce %s's logits: every row runs its whole length",
                type(model).__name__,
            )
            split.shares_starts = False
        return split

    # --- the frozen part ---------------------------------------------------------------------------------------
    @torch.no_grad()
    def states_at(
        self, layer: int, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor
    ) -> torch.Tensor:
        """``[batch, seq, hidden]``: the hidden states entering ``layer`` (the final norm's input at
        ``num_layers``), from the model's own forward stopped there."""
        target = self.norm if layer >= self.num_layers else self.layers[layer]
        captured = self._run_until(
            target, input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids
        )
        assert captured.hidden is not None
        return captured.hidden

    def layer_kwargs(
        self,
        hidden: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        *,
        cache: tuple[str, Any] | None = None,
    ) -> dict[str, Any]:
        """What each decoder layer is called with for a batch shaped like ``hidden`` (mask, rotary
        embeddings, positions), computed by the model's own forward; ``hidden`` only gives shape and dtype.
        ``cache``: ``(keyword, cache)`` the forward is given (tokens it has seen come before ``hidden``'s)."""
        with torch.no_grad():
            captured = self._run_until(
                self.layers[0],
                inputs_embeds=hidden.detach(),
                attention_mask=attention_mask,
                position_ids=position_ids,
                **dict([cache] if cache is not None else []),
            )
        return captured.kwargs

    # --- the adapted part --------------------------------------------------------------------------------------
    def run_from(self, layer: int, hidden: torch.Tensor, kwargs: dict[str, Any]) -> torch.Tensor:
        """``[batch, seq, hidden]`` after layers ``layer..`` and the final norm (gradients flow to adapters)."""
        return self.norm(self._run_layers(layer, hidden, kwargs))

    def run_from_shared(
        self,
        layer: int,
        start: torch.Tensor,
        rest: torch.Tensor,
        rest_mask: torch.Tensor,
        owners: torch.Tensor,
        route_start: Callable[[], AbstractContextManager[Any]] = nullcontext,
    ) -> torch.Tensor:
        """``[batch, rest, hidden]``: :meth:`run_from` for rows that all begin with the same tokens, whose layers
        ``layer..`` run once per group of rows routed alike (a chat template's system prompt is most of a short
        prompt). ``start`` ``[groups, L, hidden]`` holds each group's states of the shared tokens, ``rest``
        ``[batch, T, hidden]`` each row's states after them (left-padded, ``rest_mask`` ``[batch, T]``) and
        ``owners`` ``[batch]`` each row's group. The groups' keys and values are computed under ``route_start()``
        (a routing context whose plan has one row per group), then each row's tokens attend to its group's and
        their own. The same numbers as :meth:`run_from` on whole rows, up to float rounding; gradients flow
        through both parts."""
        groups, length = start.shape[0], start.shape[1]
        ones = rest_mask.new_ones((groups, length))  # [groups, L]
        start_kwargs = self.layer_kwargs(start, ones, ones.cumsum(-1) - 1)
        cache_name = _cache_kwarg(start_kwargs)
        shared = _SharedStart(owners)
        start_kwargs[cache_name] = shared
        with route_start():
            self._run_layers(layer, start, start_kwargs)  # records each layer's keys and values of the start
        shared.recording = False
        full_mask = torch.cat(
            [rest_mask.new_ones((rest.shape[0], length)), rest_mask], dim=1
        )  # [batch, L + T]
        positions = (full_mask.cumsum(-1) - 1).clamp(min=0)[:, length:]  # [batch, T]
        # the mask and rotary embeddings for T new tokens after L cached ones, from the model's own forward: a
        # stand-in cache of L positions gives it the length (only its size is read)
        from transformers import DynamicCache

        stand_in = DynamicCache(config=getattr(self.model, "config", None))
        blank = rest.new_zeros((rest.shape[0], 1, length, 1))
        stand_in.update(blank, blank, 0)
        kwargs = self.layer_kwargs(rest, full_mask, positions, cache=(cache_name, stand_in))
        kwargs[cache_name] = shared
        return self.norm(self._run_layers(layer, rest, kwargs))

    def _run_layers(self, layer: int, hidden: torch.Tensor, kwargs: dict[str, Any]) -> torch.Tensor:
        for block in self.layers[layer:]:
            out = block(hidden, **kwargs)
            hidden = out[0] if isinstance(out, tuple) else out
        return hidden

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """fp32 logits of (gathered) final hidden states ``[..., hidden] -> [..., vocab]``."""
        return self.head_module(hidden).float()

    def final_hidden(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor
    ) -> torch.Tensor:
        """``[batch, seq, hidden]``: the whole decoder (no prefix), normed, as the head sees it."""
        out = self.decoder(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
        )
        return out.last_hidden_state

    # --- internals -------------------------------------------------------------------------------------------
    def _run_until(self, target: nn.Module, **inputs: Any) -> _Captured:
        captured = _Captured()

        def hook(_module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            captured.hidden = args[0] if args else kwargs.get("hidden_states")
            captured.kwargs = {k: v for k, v in kwargs.items() if k != "hidden_states"}
            raise _Stop

        handle = target.register_forward_pre_hook(hook, with_kwargs=True)
        try:
            self.decoder(**inputs, use_cache=False)
        except _Stop:
            pass
        finally:
            handle.remove()
        if captured.hidden is None:
            raise RuntimeError(f"the decoder never called {type(target).__name__}")
        return captured

    def _matches_full_forward(self) -> bool:
        """One small padded batch: full-model logits against the split at mid depth."""
        ids = torch.arange(1, 17).view(2, 8)  # [2, 8]
        mask = torch.ones_like(ids)
        mask[1, :3] = 0  # left padding on the second row

        def split(layer: int, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor) -> _Checked:
            hidden = self.states_at(layer, ids, mask, positions)
            logits = self.head(self.run_from(layer, hidden, self.layer_kwargs(hidden, mask, positions)))
            return logits[mask.bool()], mask.bool()

        return self._agrees_with_full_forward("frozen-prefix split", ids, mask, split)

    def _shared_start_matches(self) -> bool:
        """Two rows that begin with the same 5 tokens (one left-padded after them), through
        :meth:`run_from_shared` at mid depth against the full forward, at the tokens after the start."""
        rows = [list(range(1, 10)), [1, 2, 3, 4, 5, 11, 12]]
        width, length = 9, 5
        ids = torch.zeros((2, width), dtype=torch.long)  # [2, 9]
        mask = torch.zeros_like(ids)
        for r, seq in enumerate(rows):
            ids[r, width - len(seq) :] = torch.tensor(seq)
            mask[r, width - len(seq) :] = 1

        def shared(layer: int, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor) -> _Checked:
            states = self.states_at(layer, ids, mask, positions)  # [2, 9, hidden]
            start = states[:1, :length]  # [1, 5, hidden]: the first row has no padding
            rest = torch.zeros_like(states[:, length:])  # [2, 4, hidden]
            rest_mask = torch.zeros_like(mask[:, length:])  # [2, 4]
            for r, seq in enumerate(rows):
                n = len(seq) - length
                rest[r, rest.shape[1] - n :] = states[r, width - n :]
                rest_mask[r, rest.shape[1] - n :] = 1
            owners = torch.zeros(2, dtype=torch.long, device=ids.device)
            logits = self.head(self.run_from_shared(layer, start, rest, rest_mask, owners))  # [2, 4, vocab]
            where = torch.zeros_like(mask, dtype=torch.bool)
            where[:, length:] = rest_mask.bool()
            return logits[rest_mask.bool()], where

        return self._agrees_with_full_forward("shared-start", ids, mask, shared)

    def _agrees_with_full_forward(
        self,
        what: str,
        ids: torch.Tensor,
        mask: torch.Tensor,
        run: Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], _Checked],
    ) -> bool:
        """``run(layer, ids, mask, positions)`` at mid depth gives logits ``[n, vocab]`` at ``n`` positions of the
        batch (``[batch, seq]`` bool): the full forward's logits there, within the tolerance? A model the path
        does not fit (an error) says no, with a warning, and never fails."""
        device = next(self.model.parameters()).device
        vocab = int(getattr(self.model.config, "vocab_size", 32))
        ids, mask = ids.remainder(vocab).to(device), mask.to(device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad(), model_base_only(self.model):
                full = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False)
                logits, where = run(self.num_layers // 2, ids, mask, positions)
        except Exception as exc:  # any model this path does not fit: fall back, never fail
            logger.warning("%s check failed (%s: %s)", what, type(exc).__name__, exc)
            return False
        finally:
            self.model.train(was_training)
        diff = (full.logits.float()[where] - logits).abs().max()
        return bool(diff <= _SPLIT_CHECK_TOLERANCE * max(1.0, float(full.logits.abs().max())))


class PrefixCache:
    """Per-sequence prefix states, bounded in memory; least recently used entries spill to disk, then drop."""

    def __init__(
        self,
        *,
        identity: str,
        memory_budget: int = DEFAULT_MEMORY_BUDGET,
        disk_budget: int = DEFAULT_DISK_BUDGET,
        spill_dir: str | Path | None = None,
    ) -> None:
        """``identity`` names the backbone the states come from (fingerprint, quantisation, device)."""
        self.identity = identity
        self.memory_budget, self.disk_budget = memory_budget, disk_budget
        self._memory: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._disk: OrderedDict[str, int] = OrderedDict()  # key -> bytes on disk
        self._memory_bytes = self._disk_bytes = 0
        self._spill_root = Path(spill_dir) if spill_dir is not None else None
        self._spill: Path | None = None
        #: ``computed``: sequences whose states were computed (a sequence asked for twice in one call counts once)
        self.stats = {"hits": 0, "misses": 0, "computed": 0, "spilled": 0, "dropped": 0, "disk_hits": 0}

    def key(self, layer: int, ids: Sequence[int]) -> str:
        digest = hashlib.sha256(f"{self.identity}|{layer}|".encode())
        digest.update(torch.tensor(list(ids), dtype=torch.int64).numpy().tobytes())
        return digest.hexdigest()

    def get(self, key: str) -> torch.Tensor | None:
        found = self._memory.get(key)
        if found is not None:
            self._memory.move_to_end(key)
            self.stats["hits"] += 1
            return found
        if key in self._disk:
            tensor = load_file(str(self._path(key)))["h"]
            self.stats["disk_hits"] += 1
            self.stats["hits"] += 1
            return tensor
        self.stats["misses"] += 1
        return None

    def put(self, key: str, states: torch.Tensor) -> None:
        """Keep ``states`` (``[len, hidden]``, detached); evicts least recently used entries past the budget."""
        if key in self._memory:
            return
        size = states.numel() * states.element_size()
        self._memory[key] = states
        self._memory_bytes += size
        while self._memory_bytes > self.memory_budget and len(self._memory) > 1:
            old_key, old = self._memory.popitem(last=False)
            self._memory_bytes -= old.numel() * old.element_size()
            self._spill_out(old_key, old)

    @property
    def memory_bytes(self) -> int:
        return self._memory_bytes

    @property
    def disk_bytes(self) -> int:
        return self._disk_bytes

    def clear(self) -> None:
        """Forget everything (memory and spill files)."""
        self._memory.clear()
        self._disk.clear()
        self._memory_bytes = self._disk_bytes = 0
        if self._spill is not None:
            shutil.rmtree(self._spill, ignore_errors=True)
            self._spill = None

    def _spill_out(self, key: str, states: torch.Tensor) -> None:
        size = states.numel() * states.element_size()
        if key in self._disk:
            return
        if self._disk_bytes + size > self.disk_budget:
            self.stats["dropped"] += 1  # recomputed when asked for again
            return
        try:
            save_file({"h": states.detach().to("cpu").contiguous()}, str(self._path(key)))
        except OSError as exc:  # a full or read-only disk: drop the entry, never fail the job
            logger.warning("prefix cache: cannot spill to disk (%s); dropping entries", exc)
            self.stats["dropped"] += 1
            return
        self._disk[key] = size
        self._disk_bytes += size
        self.stats["spilled"] += 1

    def _path(self, key: str) -> Path:
        if self._spill is None:
            if self._spill_root is not None:
                self._spill_root.mkdir(parents=True, exist_ok=True)
            self._spill = Path(tempfile.mkdtemp(prefix="lorafleet-prefix-", dir=self._spill_root))
        return self._spill / f"{key}.safetensors"

    def __del__(self) -> None:
        if self._spill is not None:
            shutil.rmtree(self._spill, ignore_errors=True)


class FrozenPrefix:
    """A model's :class:`DecoderSplit` with a :class:`PrefixCache`: per-sequence states entering a layer."""

    def __init__(
        self, split: DecoderSplit, cache: PrefixCache, *, pad_id: int, bank: AdapterBank | None = None
    ) -> None:
        """With ``bank``, missing states are computed with every adapter off (``bank.base_only()``), whatever
        routing plan the caller is inside."""
        self.split, self.cache, self.pad_id, self.bank = split, cache, pad_id, bank

    @classmethod
    def for_bank(
        cls, bank: AdapterBank, *, identity: str, pad_id: int, **cache_options: Any
    ) -> FrozenPrefix | None:
        """The prefix of the bank's model; None when the model does not split (callers run the whole model)."""
        split = DecoderSplit.find(bank.model)
        if split is None:
            return None
        return cls(split, PrefixCache(identity=identity, **cache_options), pad_id=pad_id, bank=bank)

    @property
    def num_layers(self) -> int:
        return self.split.num_layers

    def states(self, layer: int, sequences: Sequence[Sequence[int]]) -> list[torch.Tensor]:
        """Each sequence's ``[len, hidden]`` states entering ``layer`` (cached; misses in length-sorted batches)."""
        keys = [self.cache.key(layer, ids) for ids in sequences]
        found: list[torch.Tensor | None] = [self.cache.get(k) for k in keys]
        missing = sorted({i for i, f in enumerate(found) if f is None}, key=lambda i: len(sequences[i]))
        unique: dict[str, int] = {}
        for i in missing:
            unique.setdefault(keys[i], i)
        todo = list(unique.values())
        self.cache.stats["computed"] += len(todo)
        for start in range(0, len(todo), PREFIX_BATCH_ROWS):
            chunk = todo[start : start + PREFIX_BATCH_ROWS]
            for i, states in zip(chunk, self._compute(layer, [sequences[i] for i in chunk]), strict=True):
                self.cache.put(keys[i], states)
                found[i] = states
        for i in missing:
            if found[i] is None:  # a duplicate of a sequence computed in this call
                found[i] = found[unique[keys[i]]]
        return [f for f in found if f is not None]

    def _compute(self, layer: int, sequences: Sequence[Sequence[int]]) -> list[torch.Tensor]:
        device = next(self.split.model.parameters()).device
        width = max(len(s) for s in sequences)
        ids = torch.full((len(sequences), width), self.pad_id, dtype=torch.long)  # [batch, seq]
        mask = torch.zeros((len(sequences), width), dtype=torch.long)  # [batch, seq]
        for row, seq in enumerate(sequences):
            ids[row, width - len(seq) :] = torch.tensor(list(seq), dtype=torch.long)
            mask[row, width - len(seq) :] = 1
        ids, mask = ids.to(device), mask.to(device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        with self.bank.base_only() if self.bank is not None else nullcontext():
            hidden = self.split.states_at(layer, ids, mask, positions)  # [batch, seq, hidden]
        return [hidden[row, width - len(seq) :].detach().clone() for row, seq in enumerate(sequences)]


def backbone_identity(backbone: Backbone) -> str:
    """What prefix states depend on besides the tokens: the checkpoint, how it is quantised, where it runs."""
    return f"{backbone.fingerprint.digest}/{backbone.quantization}/{backbone.dtype}/{backbone.device}"


def pad_states(states: Sequence[torch.Tensor], width: int) -> torch.Tensor:
    """Left-pad per-sequence ``[len, hidden]`` states into ``[batch, width, hidden]`` (zeros on padding)."""
    hidden = states[0].shape[-1]
    out = states[0].new_zeros((len(states), width, hidden))
    for row, s in enumerate(states):
        out[row, width - s.shape[0] :] = s
    return out


__all__ = [
    "MIN_SHARED_START",
    "DecoderSplit",
    "FrozenPrefix",
    "PrefixCache",
    "backbone_identity",
    "common_start",
    "layer_of",
    "lowest_adapted_layer",
    "pad_states",
    "route_groups",
]
