"""Rows whose content changed since their pairs were committed (issue 11).

A pair is made once: a row edited in place under the same id is not made again (its old
outputs stay, exactly-once holds), so a resumed run reports such rows instead. Each
commit record carries its row's content hash (keys.content_hashes, stamped by Expand);
before the run starts the driver compares it with the manifest's rows. Only row groups
that the run reads anyway are compared (a fully committed row group of an unchanged file
stays unread; a rewritten file has a new identity, so none of its row groups is skipped),
in two bulk passes per file: the ids (which rows have pairs with a recorded content),
then the content columns of just the row groups holding such rows. The driver does this,
not the read tasks: a run with nothing left to do has no read tasks, and a report from
them would have to travel through every stage to the sink.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.keys import CONTENT_FIELDS, content_hashes
from pipeline.manifest import ORDINAL, Manifest, read_file_rows
from pipeline.validate import pair_keys

MAX_EXAMPLES = 5


@dataclass(frozen=True)
class Changes:
    """Rows with a committed pair that was made from other content than the row has now."""

    rows: int = 0
    examples: tuple[str, ...] = ()  # the first few ids, in manifest order


@dataclass(frozen=True)
class CommittedContent:
    """Done pairs (made, or failed for good) whose record holds their row's content hash."""

    keys: np.ndarray  # sorted pair keys
    contents: np.ndarray  # each key's content hash

    @classmethod
    def of(cls, log: pa.Table, retry_errors: bool = False) -> CommittedContent:
        """From the commit log's table (resume.LOG_SCHEMA). With --retry-errors the errors
        are made again, so only made pairs count."""
        statuses = pa.array(["ok"] if retry_errors else ["ok", "error"])
        done = log.filter(pc.and_(pc.is_in(log.column("status"), statuses), pc.is_valid(log.column("content"))))
        keys, first = np.unique(done.column("key").to_numpy(), return_index=True)
        return cls(keys, done.column("content").to_numpy()[first])

    def lookup(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Per key: is it here, and its content hash (meaningless where it is not)."""
        if not len(self.keys):
            return np.zeros(len(keys), bool), np.zeros(len(keys), np.uint64)
        pos = np.minimum(np.searchsorted(self.keys, keys), len(self.keys) - 1)
        return self.keys[pos] == keys, self.contents[pos]


def changed_rows(manifest: Manifest, skip: dict[str, frozenset[int]], duplicates: dict[int, int], log: pa.Table,
                 retry_errors: bool = False) -> Changes:
    """The rows, in the row groups not in `skip` (file identity -> row groups a run does not
    read), that have a pair committed in `log` (resume.LOG_SCHEMA) whose content hash
    differs from the row's now."""
    files = [f for f in manifest.files if len(skip.get(f.identity, ())) < len(f.row_groups)]
    if not files:  # (before the log is sorted: a re-run of unchanged files costs nothing here)
        return Changes()
    committed = CommittedContent.of(log, retry_errors)
    if not len(committed.keys):  # a first run, or a log of versions before content hashes
        return Changes()
    id_columns = manifest.key_columns
    columns = id_columns + [c for c in (*CONTENT_FIELDS, *manifest.input_columns) if c in manifest.schema.names and c not in id_columns]
    count, examples = 0, list[str]()
    for f in files:
        url, starts = manifest.url_of(f), f.first_ordinal + f.group_starts()
        groups = set()  # row groups holding a row with a recorded pair
        for table in read_file_rows(url, f, id_columns, skip_groups=skip.get(f.identity, frozenset()), mapping=manifest.columns):
            if table.num_rows and committed.lookup(pair_keys(table, duplicates)[0])[0].any():
                groups.add(int(np.searchsorted(starts, table.column(ORDINAL)[0].as_py(), side="right")) - 1)
        for table in read_file_rows(url, f, columns, skip_groups=frozenset(range(len(f.row_groups))) - groups,
                                    mapping=manifest.columns):
            if not table.num_rows:
                continue
            keys, first, counts = pair_keys(table, duplicates)
            found, old = committed.lookup(keys)
            now = np.repeat(content_hashes(table, manifest.input_columns), counts)
            changed = np.flatnonzero(np.logical_or.reduceat(found & (old != now), first))
            count += len(changed)
            examples += table.column("id").take(pa.array(changed[: MAX_EXAMPLES - len(examples)])).to_pylist()
    return Changes(count, tuple(examples))
