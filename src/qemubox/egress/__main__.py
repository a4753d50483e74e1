"""The egress proxy's entry (``python -m qemubox.egress DIR LOG``): its control socket
listens before anything heavy is imported, so that QEMU, started as soon as the socket is
there, gets ready alongside the proxy (see ``proxy.py``)."""

import socket
import sys
from pathlib import Path

from qemubox.egress import CONTROL


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python -m qemubox.egress DIR LOG", file=sys.stderr)
        return 2
    directory = Path(argv[0])
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    (directory / CONTROL).unlink(missing_ok=True)
    listener.bind(str(directory / CONTROL))
    listener.listen(4)

    from qemubox.egress import proxy

    return proxy.main(directory, Path(argv[1]), listener)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
