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
    """Ring buffers of L2-normalised teacher projections, one per clusterbook code."""

    def __init__(
        self,
        num_codes: int,
        feature_dim: int,
        capacity: int = 100,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        self.num_codes = num_codes
        self.capacity = capacity
        # One slot more than the ring buffers hold: writes that must not land go there, so an
        # update needs no boolean indexing (which waits for the GPU).
        self._storage = torch.zeros(num_codes * capacity + 1, feature_dim, device=device, dtype=dtype)
        self.features = self._storage[:-1].view(num_codes, capacity, feature_dim)
        self.filled = torch.zeros(num_codes, dtype=torch.long, device=device)
        self.next_slot = torch.zeros(num_codes, dtype=torch.long, device=device)

    def __len__(self) -> int:
        return int(self.filled.sum())

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
        kept = kept_per_code[sorted_codes]
        # Of more than `capacity` new entries only the newest survive, so older ones are not written.
        write = (rank < kept) & (rank >= kept - self.capacity)
        slot = (self.next_slot[sorted_codes] + rank) % self.capacity
        nowhere = self.num_codes * self.capacity  # the spare slot
        targets = torch.where(write, sorted_codes * self.capacity + slot, nowhere)
        self._storage.index_copy_(0, targets, features[order].to(self._storage.dtype))

        self.next_slot = (self.next_slot + kept_per_code) % self.capacity
        self.filled = torch.clamp(self.filled + kept_per_code, max=self.capacity)

    def entries(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The stored features ``[N, E]`` and their codes ``[N]`` (order carries no meaning)."""
        valid = self._valid()
        codes = torch.arange(self.num_codes, device=self.filled.device).unsqueeze(1).expand_as(valid)
        return self.features[valid], codes[valid]

    def by_code(self, code_vectors: torch.Tensor, compact: bool | None = None) -> BankByCode:
        """The bank as the loss reads it, with each code's normalised vector ``code_vectors
        [K, D]``.

        Not ``compact``, it is the ring buffer itself, every slot, with no copy and no host
        synchronisation: its cost is the same empty or full (the default on GPUs). ``compact``,
        it is the entries alone, each a group of one with its code: cheaper while most slots
        are empty (the default on the CPU while the bank is less than half full).
        """
        if compact is None:
            compact = self.features.device.type == "cpu" and 2 * len(self) < self.features.shape[0] * self.capacity
        if not compact:
            return BankByCode(self.features, self._valid(), code_vectors)
        entries, codes = self.entries()
        return BankByCode.of_entries(entries, code_vectors, codes)

    def _valid(self) -> torch.Tensor:
        """``bool [K, capacity]``: the slots in use (a code's ring fills its slots in order)."""
        return torch.arange(self.capacity, device=self.filled.device) < self.filled.unsqueeze(1)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The slots in use only: a checkpoint's size follows what the bank holds, not the
        ``K x capacity x E`` it could (1.7 GB at the paper's sizes)."""
        return {"entries": self.features[self._valid()], "filled": self.filled, "next_slot": self.next_slot}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.filled = state["filled"].to(self.filled.device)
        self.next_slot = state["next_slot"].to(self.next_slot.device)
        if "features" in state:  # a checkpoint of an earlier version: every slot
            self.features.copy_(state["features"])
            return
        self.features.zero_()
        self.features[self._valid()] = state["entries"].to(self.features.device, self.features.dtype)
