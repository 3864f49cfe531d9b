"""The package's small types and helpers, named as in ``mooncake.engine``."""
import enum
import os

from ._native import _available

class TransferOpcode(enum.IntEnum):
    """Transfer direction, as ``mooncake.engine.TransferOpcode`` (also ``TransferEngine.TransferOpcode``,
    and ``Read`` / ``Write`` at module level, as upstream's exported enum values)."""
    Read = 0
    Write = 1


Read = TransferOpcode.Read
Write = TransferOpcode.Write


class InnerTransferEngine:
    """What ``TransferEngine.get_engine()`` returns, as upstream's ``InnerTransferEngine``: the engine
    behind the Python object, to hand to other components. ``handle`` is the C API handle."""

    def __init__(self, outer):
        self._outer = outer

    @property
    def handle(self):
        """The C API handle (``transfer_engine_t``) as an integer, 0 when not initialized."""
        return self._outer.get_engine_ptr()

    def __repr__(self):
        return f"InnerTransferEngine(handle=0x{self.handle:x})"


class TransferNotify:
    """A notification sent after a transfer, as ``mooncake.engine.TransferNotify``."""

    def __init__(self, name="", msg=""):
        self.name = name
        self.msg = msg

    def __repr__(self):
        return f"TransferNotify(name={self.name!r}, msg={self.msg!r})"

    def __eq__(self, other):
        return isinstance(other, TransferNotify) and (self.name, self.msg) == (other.name, other.msg)


SUPPORT_EFA = bool(_available(b"efa"))
SUPPORT_HIP = bool(_available(b"hip"))
SUPPORT_MNNVL = bool(_available(b"nvlink"))
SUPPORT_INTRA_NVLINK = bool(_available(b"nvlink_intra"))
SUPPORT_MUSA = False
SUPPORT_CUDA = False


def _addresses_ok(*values):
    """Raises TypeError for a non-integer (as the official binding does); False for a negative value."""
    for value in values:
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"expected an integer address or length, got {type(value).__name__}")
        if value < 0:
            return False
    return True


def _timeout_seconds(length):
    # As upstream: MC_TRANSFER_TIMEOUT seconds (default 30, at least 5) plus 1 ns per byte.
    try:
        base = max(5, int(os.environ.get("MC_TRANSFER_TIMEOUT", "30")))
    except ValueError:
        base = 30
    return base + length / 1e9
