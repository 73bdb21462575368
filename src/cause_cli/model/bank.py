"""The concept bank: teacher features remembered per clusterbook code (METHOD.md section 2.8).

After every front-door step, for each code present in the batch a random half of that
code's teacher features is appended, and each code keeps only its newest ``capacity``
entries. The reference keeps a Python dict of growing tensors and rebuilds the whole bank
by concatenation every step; here the bank is one fixed-size ring buffer per code,
``[K, capacity, E]``, updated with a handful of vectorised operations.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .contrastive import BankByCode


class ConceptBank:
    """Ring buffers of L2-normalised teacher projections, one per clusterbook code.

    A code's ring is a block of ``capacity`` rows, given when the code first keeps an entry;
    blocks are handed out in that order, so the codes in use hold the first blocks of the
    storage. On the CPU the storage grows with them (a folder's images use a few hundred of
    2048 codes) and the loss reads the blocks in use as they lie, with no copy; on GPUs every
    block is there from the start, so an update never waits for the host.
    """

    _storage: torch.Tensor  # made by _allocate

    def __init__(
        self,
        num_codes: int,
        feature_dim: int,
        capacity: int = 100,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        grows: bool | None = None,
    ) -> None:
        self.num_codes = num_codes
        self.capacity = capacity
        self.feature_dim = feature_dim
        device = torch.device(device)
        self.grows = device.type == "cpu" if grows is None else grows  # else every block from the start
        self.filled = torch.zeros(num_codes, dtype=torch.long, device=device)
        self.next_slot = torch.zeros(num_codes, dtype=torch.long, device=device)
        self.block_of_code = torch.full((num_codes,), -1, dtype=torch.long, device=device)
        # One entry more than there are blocks: where codes given no block now write.
        self.code_of_block = torch.zeros(num_codes + 1, dtype=torch.long, device=device)
        self.blocks_used = torch.zeros((), dtype=torch.long, device=device)
        self._allocate(0 if self.grows else num_codes, dtype, device)

    def _allocate(self, blocks: int, dtype: torch.dtype, device: torch.device) -> None:
        # One row more than the blocks hold: writes that must not land go there, so an update
        # needs no boolean indexing (which waits for the GPU).
        storage = torch.zeros(blocks * self.capacity + 1, self.feature_dim, device=device, dtype=dtype)
        if hasattr(self, "_storage"):
            kept = min(len(self._storage), len(storage)) - 1
            storage[:kept] = self._storage[:kept]
        self._storage = storage
        self.blocks = storage[:-1].view(blocks, self.capacity, self.feature_dim)

    def __len__(self) -> int:
        return int(self.filled.sum())

    @property
    def features(self) -> torch.Tensor:
        """Every code's ring, ``[K, capacity, E]`` (a copy: the blocks are in order of first use)."""
        rings = self.blocks.new_zeros(self.num_codes, self.capacity, self.feature_dim)
        used = self._used_blocks()
        rings[self.code_of_block[:used]] = self.blocks[:used]
        return rings

    def _used_blocks(self) -> int:
        return int(self.blocks_used)

    def update(
        self,
        codes: torch.Tensor,
        teacher_features: torch.Tensor,
        random_keys: torch.Tensor | None = None,
    ) -> None:
        """Add a random half of each code's features.

        ``codes [N]`` are clusterbook indices and ``teacher_features [N, E]`` the teacher's
        projections of the same tokens. For each code, the tokens with the smallest
        ``random_keys`` (uniform draws by default) are kept, ``floor(n / 2)`` of them, and
        appended in that order.
        """
        codes = codes.reshape(-1).to(self.filled.device)
        features = F.normalize(teacher_features.reshape(codes.numel(), -1).detach().float(), dim=1)
        if random_keys is None:
            random_keys = torch.rand(codes.numel(), device=codes.device)
        random_keys = random_keys.reshape(-1).to(codes.device)

        by_key = torch.argsort(random_keys)
        order = by_key[torch.argsort(codes[by_key], stable=True)]  # grouped by code, then by key
        sorted_codes = codes[order]
        per_code = torch.bincount(codes, minlength=self.num_codes)
        group_start = torch.cumsum(per_code, 0) - per_code
        rank = torch.arange(codes.numel(), device=codes.device) - group_start[sorted_codes]
        kept_per_code = per_code // 2
        self._give_blocks(kept_per_code > 0)
        kept = kept_per_code[sorted_codes]
        # Of more than `capacity` new entries only the newest survive, so older ones are not written.
        write = (rank < kept) & (rank >= kept - self.capacity)
        slot = (self.next_slot[sorted_codes] + rank) % self.capacity
        nowhere = len(self._storage) - 1  # the spare row
        targets = torch.where(write, self.block_of_code[sorted_codes].clamp_min(0) * self.capacity + slot, nowhere)
        self._storage.index_copy_(0, targets, features[order].to(self._storage.dtype))

        self.next_slot = (self.next_slot + kept_per_code) % self.capacity
        self.filled = torch.clamp(self.filled + kept_per_code, max=self.capacity)

    def _give_blocks(self, keeping: torch.Tensor) -> None:
        """A block for every code that keeps entries now and had none, in code order."""
        new = keeping & (self.block_of_code < 0)
        numbers = self.blocks_used + torch.cumsum(new.long(), 0) - 1
        self.block_of_code = torch.where(new, numbers, self.block_of_code)
        codes = torch.arange(self.num_codes, device=new.device)
        self.code_of_block[torch.where(new, numbers, self.num_codes)] = codes
        self.blocks_used = self.blocks_used + new.sum()
        if self.grows and self._used_blocks() > len(self.blocks):
            wanted = min(self.num_codes, max(self._used_blocks(), 2 * len(self.blocks)))
            self._allocate(wanted, self._storage.dtype, self._storage.device)

    def entries(self, valid: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The stored features ``[N, E]`` and their codes ``[N]`` (order carries no meaning);
        ``valid`` is :meth:`valid_slots`, where the caller has it already."""
        valid = self.valid_slots() if valid is None else valid
        codes = self.code_of_block[: len(valid)].unsqueeze(1).expand_as(valid)
        return self.blocks[: len(valid)][valid], codes[valid]

    def by_code(self, code_vectors: torch.Tensor, compact: bool | None = None) -> BankByCode:
        """The bank as the loss reads it, with each code's normalised vector ``code_vectors
        [K, D]``: its blocks as they lie (on the CPU those in use, on GPUs all of them, with no
        copy and no host synchronisation), or ``compact``, its entries alone, each a group of
        one with its code. By default compact on the CPU while a tenth of the slots of the
        blocks in use or more are empty: an empty slot costs the loss as much as an entry,
        about ten times what copying an entry costs."""
        valid = self.valid_slots()
        if compact is None:
            compact = self.grows and 10 * len(self) < 9 * valid.numel()
        if compact:
            entries, codes = self.entries(valid)
            return BankByCode.of_entries(entries, code_vectors, codes)
        return BankByCode(self.blocks[: len(valid)], valid, code_vectors, group_codes=self.code_of_block[: len(valid)])

    def valid_slots(self) -> torch.Tensor:
        """``bool [blocks, capacity]``: the slots in use of the blocks read (a ring fills its
        slots in order; a block not given yet has none)."""
        blocks = self._used_blocks() if self.grows else len(self.blocks)
        given = torch.arange(blocks, device=self.filled.device) < self.blocks_used
        filled = torch.where(given, self.filled[self.code_of_block[:blocks]], 0)
        return torch.arange(self.capacity, device=self.filled.device) < filled.unsqueeze(1)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The slots in use only, code by code: a checkpoint's size follows what the bank
        holds, not the ``K x capacity x E`` it could (1.7 GB at the paper's sizes)."""
        used = self._used_blocks()
        in_code_order = torch.argsort(self.code_of_block[:used])
        block, slot = self.valid_slots()[:used][in_code_order].nonzero(as_tuple=True)
        entries = self.blocks[in_code_order[block], slot]
        return {"entries": entries, "filled": self.filled, "next_slot": self.next_slot}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        device, dtype = self._storage.device, self._storage.dtype
        self.filled = state["filled"].to(device)
        self.next_slot = state["next_slot"].to(device)
        holding = self.filled > 0  # the codes given blocks, in code order
        self.block_of_code = torch.where(holding, torch.cumsum(holding.long(), 0) - 1, -1)
        self.blocks_used = holding.sum()
        used = self._used_blocks()
        self.code_of_block = torch.zeros_like(self.code_of_block)
        self.code_of_block[:used] = torch.nonzero(holding).flatten()
        self._allocate(used if self.grows else self.num_codes, dtype, device)
        self.blocks.zero_()
        if "features" in state:  # a checkpoint of an earlier version: every slot of every ring
            self.blocks[:used] = state["features"].to(device, dtype)[holding]
            return
        slots = torch.arange(self.capacity, device=device) < self.filled[holding].unsqueeze(1)
        self.blocks[:used][slots] = state["entries"].to(device, dtype)
