"""What /proc says about processes: whether one still runs, its parent, its children and theirs."""
import os


def _stat_fields(pid: int) -> list[str] | None:
    """The fields of /proc/PID/stat after the command name (state first, then the parent's pid); None once gone."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()
    except OSError:
        return None


def is_running(pid: int) -> bool:
    """True while the process exists and is not a zombie."""
    fields = _stat_fields(pid)
    return fields is not None and fields[0] != "Z"


def parent_pid(pid: int) -> int:
    fields = _stat_fields(pid)
    if fields is None:
        raise ProcessLookupError(pid)
    return int(fields[1])


def child_pids(pid: int) -> list[int]:
    children = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (fields := _stat_fields(int(entry))) is not None and int(fields[1]) == pid:
            children.append(int(entry))
    return children


def descendants(pid: int) -> set[int]:
    children = set(child_pids(pid))
    return children | {grandchild for child in children for grandchild in descendants(child)}


def ignored_signals(pid: int) -> set[int]:
    """The signals the process ignores (SigIgn in /proc/PID/status)."""
    with open(f"/proc/{pid}/status") as status:
        mask = int(next(line for line in status if line.startswith("SigIgn:")).split()[1], 16)
    return {signum for signum in range(1, 65) if mask >> (signum - 1) & 1}
