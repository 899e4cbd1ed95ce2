"""pynetdicom's own ceiling: an SCP configured like the gateway's listener whose C-STORE
handler answers success at once and keeps nothing. bench_ingest.py runs it beside storescp
and the gateway to show how much of the gap is the DICOM library itself.

    .venv/bin/python benchmarks/noop_scp.py PORT [AE_TITLE] [--events]

With ``--events`` each association gets the listener's event-driven loops and whole-PDU reads
(``gateway/receive/pynetdicom_events.install``), as ``cxr-gateway listen`` does; without it,
pynetdicom's stock loops.
"""

from __future__ import annotations

import sys

from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.events import Event
from pynetdicom.presentation import AllStoragePresentationContexts, build_context
from pynetdicom.transport import RequestHandler

from gateway.receive import pynetdicom_events
from gateway.receive.listener import TRANSFER_SYNTAXES
from gateway.settings import Settings


class EventHandler(RequestHandler):
    """A connection whose association waits on events, as the listener's do."""

    def _create_association(self) -> Association:
        assoc = super()._create_association()
        pynetdicom_events.install(assoc)
        return assoc


def main() -> None:
    args = [a for a in sys.argv[1:] if a != "--events"]
    port = int(args[0])
    ae = AE(ae_title=args[1] if len(args) > 1 else "NOOP")
    ae.maximum_associations = 32  # as bench_ingest.py gives the gateway
    ae.maximum_pdu_size = Settings().max_pdu_bytes
    ae.supported_contexts = [
        build_context(str(cx.abstract_syntax), TRANSFER_SYNTAXES)
        for cx in AllStoragePresentationContexts
    ]

    def on_store(event: Event) -> int:
        return 0x0000

    handlers = [(evt.EVT_C_STORE, on_store)]
    if "--events" in sys.argv:
        server = ae.make_server(
            ("127.0.0.1", port), evt_handlers=handlers, request_handler=EventHandler
        )
        server.serve_forever()
    else:
        ae.start_server(("127.0.0.1", port), block=True, evt_handlers=handlers)


if __name__ == "__main__":
    main()
