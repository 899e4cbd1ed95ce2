"""Start and read the MLLP receiver of tests.hl7_receiver (python-hl7's MLLP server) as a
separate process on a free loopback port."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import hl7

from tests.peers import ROOT, free_port, stop_process, wait_for_port


@dataclass
class MllpReceiver:
    port: int
    folder: Path
    options: tuple[str, ...] = ()
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    def start(self) -> MllpReceiver:
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tests.hl7_receiver",
                "--port",
                str(self.port),
                "--out",
                str(self.folder),
                *self.options,
            ],
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_for_port(self.port, timeout=20, process=self.process)
        return self

    def stop(self) -> None:
        if self.process is not None:
            stop_process(self.process)

    def messages(self) -> list[hl7.Message]:
        """What it received, in order, parsed by the hl7 package."""
        return [
            hl7.parse(path.read_bytes().decode("utf-8"))
            for path in sorted(self.folder.glob("*.hl7"))
        ]


def mllp_receiver(folder: Path, *options: str, port: int = 0, start: bool = True) -> MllpReceiver:
    """A receiver writing to ``folder`` (started unless ``start`` is False)."""
    receiver = MllpReceiver(port or free_port(), folder, tuple(options))
    return receiver.start() if start else receiver
