"""Delivery attempts of redelivered messages, kept on disk so they outlive a crash."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path


class DeliveryJournal:
    """How often each redelivered message was started and never settled, per queue.

    One small file per message under way (written and synced before its handler
    starts, removed once it is settled), so a count survives the process that dies
    with the message. Only redelivered messages are journaled: a fresh one has no
    history.
    """

    def __init__(self, directory: str | os.PathLike[str]):
        self.directory = Path(directory)

    @classmethod
    def for_namespace(cls, namespace: str) -> DeliveryJournal:
        """The journal under the temporary directory, one per namespace."""
        return cls(Path(tempfile.gettempdir()) / "pumpflow-deliveries" / namespace)

    def _path(self, queue: str, message_id: str) -> Path:
        name = hashlib.sha1(f"{queue}\0{message_id}".encode()).hexdigest()
        return self.directory / name

    def attempt(self, queue: str, message_id: str) -> int:
        """Count one more start of ``message_id`` on ``queue``; return the count."""
        path = self._path(queue, message_id)
        try:
            count = int(path.read_text() or 0) + 1
        except (FileNotFoundError, ValueError):
            count = 1
        self.directory.mkdir(parents=True, exist_ok=True)
        with open(path, "w") as file:
            file.write(str(count))
            file.flush()
            os.fsync(file.fileno())
        return count

    def settle(self, queue: str, message_id: str) -> None:
        """Forget a message that was handled (or dead-lettered)."""
        self._path(queue, message_id).unlink(missing_ok=True)

    def clear(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)
