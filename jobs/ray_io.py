"""Ray Data adapters: the manifest as a Datasource, the output as a Datasink.

The reading and writing themselves live in pipeline/ (no Ray there); these
classes only cut the work into Ray tasks.
"""

from __future__ import annotations

import pyarrow as pa
from ray.data.block import BlockMetadata
from ray.data.datasource import Datasink, Datasource, ReadTask

from pipeline.manifest import Manifest, ManifestFile, read_file_rows
from pipeline.rows import from_block
from pipeline.sink import SinkConfig, write_shard


class ManifestDatasource(Datasource):
    """One read task per manifest file, streamed in batches with row ordinals."""

    def __init__(self, manifest: Manifest):
        super().__init__()
        self.manifest = manifest

    def estimate_inmemory_data_size(self) -> int | None:
        return None

    def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None, data_context=None) -> list[ReadTask]:
        def read(url: str, f: ManifestFile):
            return lambda: read_file_rows(url, f)

        return [
            ReadTask(read(self.manifest.url_of(f), f),
                     BlockMetadata(num_rows=f.num_rows, size_bytes=None, exec_stats=None, input_files=(f.path,)))
            for f in self.manifest.files
        ]

    def get_name(self) -> str:
        return "Manifest"


class OutputDatasink(Datasink):
    """Each write task writes (and commits) one shard of >= rows_per_shard rows."""

    def __init__(self, cfg: SinkConfig, rows_per_shard: int):
        self.cfg, self.rows_per_shard = cfg, rows_per_shard

    @property
    def min_rows_per_write(self) -> int:
        return self.rows_per_shard

    def write(self, blocks, ctx) -> dict:
        rows = [r for block in blocks for r in from_block(pa.table(block) if isinstance(block, dict) else block)]
        return write_shard(rows, self.cfg)

    def get_name(self) -> str:
        return "GenfleetOutput"
