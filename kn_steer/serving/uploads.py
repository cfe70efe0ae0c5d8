"""Host-to-device copies that never stall the device stream.

On CUDA a copy from pageable host memory (``torch.from_numpy(a).to("cuda")``) synchronizes the
stream, which would throw away vLLM's async scheduling every steered step. Here every upload goes
through a pinned staging buffer with ``non_blocking=True``. Reusing the staging memory is safe
because all per-step uploads happen inside the model runner's input preparation, which vLLM
itself guards (it waits for the previous step's input copies before preparing the next step, the
same guarantee its own pinned ``CpuGpuBuffer`` relies on); uploads outside a step (start-up
self-check, wake-up) synchronize explicitly. On CPU a plain copy is used.
"""

from __future__ import annotations

import numpy as np
import torch


class Uploader:
    """Stage numpy arrays in pinned memory and copy them to ``device`` without blocking."""

    def __init__(self, device: torch.device | str):
        self.device = torch.device(device)
        self.pinned = self.device.type == "cuda"
        self._staging = torch.empty(0, dtype=torch.uint8, pin_memory=self.pinned)
        self._offset = 0
        self._retired: list[torch.Tensor] = []  # grown-out buffers kept alive until the next step

    def begin_step(self) -> None:
        """A new step: earlier copies have completed (see the module docstring)."""
        self._offset = 0
        self._retired.clear()

    def to_device(self, array: np.ndarray) -> torch.Tensor:
        array = np.ascontiguousarray(array)
        if not self.pinned or array.nbytes == 0:
            return torch.from_numpy(array.copy()).to(self.device)
        nbytes = array.nbytes
        aligned = (self._offset + 63) // 64 * 64
        if aligned + nbytes > self._staging.numel():
            self._retired.append(self._staging)
            size = max(2 * self._staging.numel(), aligned + nbytes, 1 << 16)
            self._staging = torch.empty(size, dtype=torch.uint8, pin_memory=True)
            aligned = 0
        host = self._staging[aligned:aligned + nbytes]
        host.numpy()[:] = array.view(np.uint8).reshape(-1)
        self._offset = aligned + nbytes
        return host.view(torch.from_numpy(array[:0]).dtype).view(array.shape).to(self.device, non_blocking=True)

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()
