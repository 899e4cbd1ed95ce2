"""A real MLLP receiver for tests: python-hl7's asyncio MLLP server (``hl7.mllp``), run as its
own process by tests.hl7_peer.

Each message it reads is parsed by the hl7 package, written to ``--out`` (one file per
message, in arrival order) and answered with the package's ``create_ack`` using ``--ack``'s
code. ``--silent`` reads and never answers (a receiver that hangs); ``--tls-cert`` and
``--tls-key`` make it speak MLLP over TLS only; ``--ack-pad N`` makes each ACK N bytes longer;
``--ack-for ID`` acknowledges another message than the one received.

    python -m tests.hl7_receiver --port P --out DIR [--ack AA|AE|AR|CA|CE|CR] [--silent]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import ssl
from pathlib import Path

import hl7
from hl7.mllp import start_hl7_server
from hl7.mllp.exceptions import InvalidBlockError


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--ack", default="AA")
    parser.add_argument("--silent", action="store_true")
    parser.add_argument("--ack-pad", type=int, default=0, help="text of this length in MSA-3")
    parser.add_argument("--ack-for", default="", help="MSA-2 names this control ID instead")
    parser.add_argument("--tls-cert", type=Path)
    parser.add_argument("--tls-key", type=Path)
    return parser.parse_args()


def keep(folder: Path, message: hl7.Message) -> None:
    number = len(list(folder.glob("*.hl7")))
    tmp = folder / f".{number:04d}.part"
    tmp.write_text(str(message), encoding="utf-8")
    os.replace(tmp, folder / f"{number:04d}.hl7")


async def serve(args: argparse.Namespace) -> None:
    args.out.mkdir(parents=True, exist_ok=True)

    async def on_client(reader: hl7.mllp.HL7StreamReader, writer: hl7.mllp.HL7StreamWriter) -> None:
        try:
            while not writer.is_closing():
                message = await reader.readmessage()
                keep(args.out, message)
                if args.silent:
                    continue
                ack = message.create_ack(args.ack, application="RECEIVER")
                if args.ack_for:
                    ack.segment("MSA")[2] = ack.create_field([args.ack_for])
                if args.ack_pad:
                    ack.segment("MSA").append(ack.create_field(["x" * args.ack_pad]))
                writer.writemessage(ack)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError, ValueError):
            pass  # the peer went away, or sent something that is not MLLP
        except InvalidBlockError:
            pass
        finally:
            writer.close()

    context = None
    if args.tls_cert:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(str(args.tls_cert), str(args.tls_key))
    async with await start_hl7_server(
        on_client, host="127.0.0.1", port=args.port, encoding="utf-8", ssl=context
    ) as server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(serve(parse_args()))
