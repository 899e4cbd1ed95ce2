"""pynetdicom's own ceiling: an SCP configured like the gateway's listener whose C-STORE
handler answers success at once and keeps nothing. bench_ingest.py runs it beside storescp
and the gateway to show how much of the gap is the DICOM library itself.

    .venv/bin/python benchmarks/noop_scp.py PORT [AE_TITLE]
"""

from __future__ import annotations

import sys

from pynetdicom import AE, evt
from pynetdicom.events import Event
from pynetdicom.presentation import AllStoragePresentationContexts, build_context

from gateway.receive.listener import TRANSFER_SYNTAXES
from gateway.settings import Settings


def main() -> None:
    port = int(sys.argv[1])
    ae = AE(ae_title=sys.argv[2] if len(sys.argv) > 2 else "NOOP")
    ae.maximum_associations = 32  # as bench_ingest.py gives the gateway
    ae.maximum_pdu_size = Settings().max_pdu_bytes
    ae.supported_contexts = [
        build_context(str(cx.abstract_syntax), TRANSFER_SYNTAXES)
        for cx in AllStoragePresentationContexts
    ]

    def on_store(event: Event) -> int:
        return 0x0000

    ae.start_server(("127.0.0.1", port), block=True, evt_handlers=[(evt.EVT_C_STORE, on_store)])


if __name__ == "__main__":
    main()
