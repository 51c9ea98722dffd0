"""The stream store: immutable Parquet segments + a DuckDB catalog (ids, quarantine, block plans)."""

from continual_kd.stream.ingest import ColumnMap
from continual_kd.stream.plan import BlockInfo, BlockPlan
from continual_kd.stream.store import IngestReport, StreamStore

__all__ = ["StreamStore", "ColumnMap", "IngestReport", "BlockPlan", "BlockInfo"]
