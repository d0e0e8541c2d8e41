"""``python -m derpd``: the derpd command, also how a --workers supervisor starts its workers."""

from derpd.cli import main
from derpd.ops.workers import adopt_inherited_sockets

adopt_inherited_sockets()  # a worker's inherited sockets; nothing for any other process
main()
