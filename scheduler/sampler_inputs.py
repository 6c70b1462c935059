"""The sampler's per-step indices (each row's slot, the rows that draw at random) in one host-to-device copy.

On CUDA the host buffer is pinned and the copy does not block; the buffer is rewritten only by the next step,
after this step's sampled tokens were copied back (which waits for everything queued before, this copy included).
"""
import torch


class SamplerInputs:
    def __init__(self, max_rows: int, device: torch.device) -> None:
        self.device = device
        self.max_rows = max_rows
        if device.type != "cpu":
            self._host = torch.zeros(2 * max_rows, dtype=torch.int64, pin_memory=device.type == "cuda")
            self._device = torch.zeros(2 * max_rows, dtype=torch.int64, device=device)

    def load(self, slots: list[int], sampled_rows: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """``slots`` [B] and ``sampled_rows`` [R] as int64 tensors on the device."""
        num_slots, num_sampled = len(slots), len(sampled_rows)
        if self.device.type == "cpu":
            packed = torch.tensor(slots + sampled_rows, dtype=torch.int64)
        else:
            if num_slots > self.max_rows:
                raise ValueError(f"{num_slots} rows to sample, more than the {self.max_rows} the sampler holds")
            self._host[: num_slots + num_sampled].copy_(torch.tensor(slots + sampled_rows, dtype=torch.int64))
            packed = self._device[: num_slots + num_sampled]
            packed.copy_(self._host[: num_slots + num_sampled], non_blocking=True)
        return packed[:num_slots], packed[num_slots:]
