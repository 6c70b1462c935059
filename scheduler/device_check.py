"""After a failed forward: can the device still compute? A sticky device error (an illegal memory access, a
device-side assert) fails every later step, so the engine must die visibly rather than fail batch after batch."""
import torch

from scheduler.faults import InjectedFault, fault_number
from scheduler.outputs import EngineDeadError


class DeviceFaultError(EngineDeadError):
    """The device failed a check after a failed step: nothing can run on it until the process restarts."""


def check_device(device: torch.device) -> None:
    """Runs a tiny computation on ``device`` and reads it back; raises DeviceFaultError if that fails."""
    try:
        if fault_number("DEVICE_BROKEN"):
            raise InjectedFault("injected sticky device error")
        probe = torch.arange(4, device=device).sum()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if probe.item() != 6:
            raise RuntimeError(f"4-element sum gave {probe.item()}")
    except Exception as error:
        raise DeviceFaultError(f"the device {device} fails after a failed step: {error!r}") from error
