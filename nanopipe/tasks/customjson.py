"""
Conversations from any JSONL file, e.g. identity conversations that teach the model who it is.

Each non-blank line is one conversation: either a JSON list of messages
    [{"role": "user", "content": "Who are you?"}, {"role": "assistant", "content": "I am nanopipe..."}]
or an object with a "messages" list (other keys are kept on the conversation). The whole file is
validated when the task is created; an error names the file and line. An http(s) URL is downloaded once into
NANOPIPE_HOME (nanopipe.remote) and read from there.
"""

from __future__ import annotations

import copy
from pathlib import Path

from nanopipe.remote import RemoteFileError, fetch_source
from nanopipe.tasks.base import Task, TaskDataError, checked_conversation
from nanopipe.tasks.sources import read_json_records


class CustomJSON(Task):
    """Every conversation of a JSONL file, in file order. Training data only."""

    def __init__(self, path: str | Path, **slicing: int | None):
        super().__init__(**slicing)
        try:
            self.path = fetch_source(path)
        except RemoteFileError as err:
            raise TaskDataError(str(err)) from None
        if not self.path.is_file():
            raise TaskDataError(f"conversation file {self.path} does not exist")
        if self.path.suffix != ".jsonl":
            raise TaskDataError(f"{self.path}: CustomJSON reads .jsonl files (one conversation per line)")
        records = read_json_records(self.path)
        self.conversations = []
        for record, (_, line) in zip(records.rows, records.origins):
            where = f"{self.path} line {line}"
            if isinstance(record, dict):
                if "messages" not in record:
                    raise TaskDataError(f"{where}: an object line needs a 'messages' list (has {sorted(record)})")
                extra = {k: v for k, v in record.items() if k != "messages"}
                self.conversations.append(checked_conversation(record["messages"], where, **extra))
            elif isinstance(record, list):
                self.conversations.append(checked_conversation(record, where))
            else:
                raise TaskDataError(f"{where}: expected a list of messages or an object with 'messages', "
                                    f"got {type(record).__name__}")
        if not self.conversations:
            raise TaskDataError(f"{self.path}: no conversations (the file is empty)")

    def num_examples(self) -> int:
        return len(self.conversations)

    def get_example(self, index: int) -> dict:
        return copy.deepcopy(self.conversations[index])  # callers may edit what they get
