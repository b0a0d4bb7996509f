"""The work folder of one day and model version: the pairs left to score cut into shards, each written
to its own parquet file, and the manifest that says which are done (see `jobs.scoring.run`, step 3)."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from schemas.storage import replace_file
from schemas.tables import RELEVANCE

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"


def fingerprint(pairs: pa.Table) -> str:
    digest = hashlib.sha256()
    for row in pairs.select(["query", "product_id", "product_content_hash"]).to_pylist():
        digest.update(json.dumps([row["query"], row["product_id"], row["product_content_hash"]]).encode())
    return digest.hexdigest()


def write_json_atomically(path: Path, value: dict) -> None:
    replace_file(path, lambda staging: staging.write_text(json.dumps(value, indent=2, default=str)))


class ShardManifest:
    """The work folder of one day and model version: shard files and the manifest that says which are done."""

    def __init__(self, folder: Path, pairs: pa.Table, shard_size: int, context: dict) -> None:
        self.folder = folder
        self.path = folder / MANIFEST
        pairs_fingerprint = fingerprint(pairs)
        if self.path.is_file():
            manifest = json.loads(self.path.read_text())
            if manifest["fingerprint"] == pairs_fingerprint and manifest["shard_size"] == shard_size:
                self.manifest = manifest
                return
            log.warning("%s: the pairs to score changed since the last attempt; starting the shards afresh", folder)
            for stale in folder.glob("shard-*.parquet"):
                stale.unlink()
        folder.mkdir(parents=True, exist_ok=True)
        n = pairs.num_rows
        self.manifest = {
            "fingerprint": pairs_fingerprint, "shard_size": shard_size, "pairs": n, **context,
            "shards": [{"shard": k, "start": start, "stop": min(start + shard_size, n), "attempts": 0, "done": False}
                       for k, start in enumerate(range(0, n, shard_size))],
        }
        self.save()

    def save(self) -> None:
        write_json_atomically(self.path, self.manifest)

    def file(self, shard: dict) -> Path:
        return self.folder / f"shard-{shard['shard']:05d}.parquet"

    def pending(self) -> list[dict]:
        return [shard for shard in self.manifest["shards"] if not (shard["done"] and self.file(shard).is_file())]

    def started(self, shard: dict) -> None:
        shard["attempts"] += 1
        shard["done"] = False
        self.save()

    def finished(self, shard: dict, rows: pa.Table, seconds: float) -> None:
        replace_file(self.file(shard), lambda staging: pq.write_table(RELEVANCE.conform(rows), staging))
        shard.update(done=True, rows=rows.num_rows, seconds=round(seconds, 3))
        self.save()

    def rows(self) -> pa.Table:
        parts = [pq.read_table(self.file(shard), schema=RELEVANCE.arrow_schema()) for shard in self.manifest["shards"]]
        return pa.concat_tables(parts) if parts else RELEVANCE.empty_arrow()

    def remove_shards(self) -> None:
        shutil.rmtree(self.folder)  # shards, manifest and any staging file a killed attempt left
